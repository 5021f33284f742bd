"""Input pipelines. The loaders (DALI, FFCV, torchvision, synthetic) arrive with the pipelines issue;
`pipelines.formats` holds the on-disk formats the converter writes and the loaders read."""
