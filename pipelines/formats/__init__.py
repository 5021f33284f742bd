"""The on-disk formats the converter writes and the loaders read: where things live (layout.py), the manifest,
crash-safe files, webdataset shards and their index, the FFCV .beton, and the check of an output (verify.py)."""
