"""The conversion job: finding ImageNet (sources.py), the holdout split (split.py), one image's preparation
(images.py), the job that writes both formats (job.py), and a generated sample tree (sample.py). The formats
themselves are read and written by ../formats/."""
