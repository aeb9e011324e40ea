"""Helpers for tests and benchmarks: multi-process gloo runs and global views of sharded models."""
