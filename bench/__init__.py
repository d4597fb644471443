"""`duet bench`: seconds per step, tokens per second and peak memory on named workloads (a script, not a test)."""
