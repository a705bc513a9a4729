"""Live-test harness: a throwaway PostgreSQL (cluster.py) and `pgveil serve` subprocesses
(pgveil_proc.py). Plain modules, importable without pytest (bench/run.py uses them)."""
