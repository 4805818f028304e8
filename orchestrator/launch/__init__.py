"""The driver side: preflight checks, storage and Ray runtime, and the Ray Train launch."""
