"""Benchmarks of the hot paths (submit, claim, deliver, report): `python -m benchmarks`."""
