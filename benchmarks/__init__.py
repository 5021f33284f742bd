"""Benchmarks: figures are medians of repeats, measured side by side in one run, with the hardware, the
library versions and the git commit recorded beside them (benchmarks/results/*.json)."""
import os

# FFCV's writer draws a tqdm bar per .beton into the benchmark logs; tqdm reads this when it is imported.
os.environ.setdefault("TQDM_DISABLE", "1")
