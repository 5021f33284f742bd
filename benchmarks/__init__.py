"""Benchmarks: figures are medians of repeats, measured side by side in one run, with the hardware, the
library versions and the git commit recorded beside them (benchmarks/results/*.json)."""
