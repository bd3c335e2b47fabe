"""Benchmarks of the harness against peer implementations (see run_all.py)."""
