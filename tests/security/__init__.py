"""Bypass attempts against the live proxy: every test tries to read or infer protected data."""
