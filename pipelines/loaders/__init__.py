"""The four loaders behind the contract (../contract.py), one module each; DALI's graph (dali_graph.py) and
what the host feeds it (dali_source.py) live apart from its wrapper (dali.py). Each build() starts with the
same prelude (prelude.py): options, manifest, split, files checked, batches per epoch, workers."""
