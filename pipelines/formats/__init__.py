"""Reading ImageNet sources and writing, reading and checking the converted formats (.beton, webdataset)."""
