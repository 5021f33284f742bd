# `make demo` and `make test` set everything up themselves on a fresh Debian machine, and a second run
# reinstalls nothing: the venv is rebuilt only when pyproject.toml or this Makefile changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# FFCV 1.0.2 compiles its C part against these at install time.
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO := build/demo

.PHONY: setup test test-fast demo bench bench-convert clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || { \
	  echo "installing $(APT_PACKAGES)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES) >/dev/null; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch 2.14.1 with torchvision 0.29.1: timm cannot import beside the CPU-only torch 2.13.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dali,ffcv,dev]'
	@touch $@

test: setup
	$(PY) -m pytest -q --durations=15

# The fast tier (the tests marked `fast` in tests/conftest.py): every module of pipelines/, training/,
# benchmarks/ and tools/ exercised at least once, in under 3 minutes on 2 cores.
test-fast: setup
	$(PY) -m pytest -q -m fast --durations=15

# The main job end to end on generated data: sample tree (with quirky and broken files), conversion to
# both formats, a full re-read of the output against its manifest, then a small ViT trained on it with the
# DALI loader on the CPU (the tiny_cpu preset, about a minute on 2 cores).
demo: setup
	@test -d $(DEMO)/sample || $(PY) tools/make_sample_imagenet.py $(DEMO)/sample --quirks
	$(PY) tools/convert_imagenet.py $(DEMO)/sample $(DEMO)/converted
	$(PY) tools/verify_dataset.py $(DEMO)/converted
	rm -rf $(DEMO)/runs/tiny_cpu-dali
	$(PY) training/run.py --preset tiny_cpu --loader dali --data $(DEMO)/converted --out $(DEMO)/runs \
	  --name tiny_cpu-dali
	# The second example: DeiT's augmentation at toy scale (RandAugment in DALI's graph, mixup/cutmix and
	# erasing on the batch, drop path, an EMA, a 24 -> 32 px resolution ramp), 3-5 minutes on 2 cores.
	rm -rf $(DEMO)/runs/tiny_cpu_deit-dali
	$(PY) training/run.py --preset tiny_cpu_deit --loader dali --data $(DEMO)/converted --out $(DEMO)/runs \
	  --name tiny_cpu_deit-dali
	@echo "demo output: $(DEMO)/converted (the converted dataset), $(DEMO)/runs/tiny_cpu-dali and" \
	  "$(DEMO)/runs/tiny_cpu_deit-dali (the runs)"

# The CPU benchmark suite (about 23 minutes on 2 cores, 1.5 of them building its data in build/bench), what a
# ViT-B/16 checkpoint costs training (about a minute), then the report:
# benchmarks/report.md, its charts, and the README's headline table.
bench: setup
	$(PY) -m benchmarks.run --suite cpu
	$(PY) -m benchmarks.checkpoint
	$(PY) -m benchmarks.report --readme README.md

bench-convert: setup
	$(PY) -m benchmarks.convert

clean:
	rm -rf build .pytest_cache
