"""Live tests: real PostgreSQL, real pgveil, real clients."""
