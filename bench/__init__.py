"""Benchmarks: the in-process limit of a model against the service under closed-loop load."""
