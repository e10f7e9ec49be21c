"""Benchmarks behind ``kvlink bench``; each measures its physical baseline in the same run."""
