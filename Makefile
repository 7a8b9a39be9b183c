# Two entry points for a fresh machine:
#   make demo   set up, pretrain MAE on Fashion-MNIST (<= 15 min on 2 CPU cores), probe, draw reconstructions
#   make test   set up, run the test suite (what CI runs: .ci/run)
# and one check: make check-install (a venv holding torch 2.13 CPU: `pip install -e .` installs no torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_RUN ?= runs/demo-mae
# The torch this project's machines test against. pyproject.toml declares ranges (torch>=2.13), so a
# torch already in the venv is kept; the README's set-up is these same two pip commands.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The demo recipe follows the precision `--precision auto` picks on this machine: bf16 (CPU with
# AVX512-BF16/AMX, or a GPU) runs configs/demo.yaml, fp32 the shorter configs/demo-fp32.yaml, so both
# fit 15 minutes on 2 cores. Override: make demo DEMO_CONFIG=configs/demo.yaml
DEMO_CONFIG ?= $(shell $(BIN)/python -c 'from leanmim.train.precision import bf16_supported; \
  print("configs/demo.yaml" if bf16_supported() else "configs/demo-fp32.yaml")')

.PHONY: setup data demo test check-install clean

$(BIN)/leanmim: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/leanmim

data:
	@[ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

demo: setup data
	@echo "demo recipe: $(DEMO_CONFIG) (chosen by the precision this machine runs; override with DEMO_CONFIG=...)"
	$(BIN)/leanmim pretrain --config $(DEMO_CONFIG) --out $(DEMO_RUN)
	$(BIN)/leanmim probe $(DEMO_RUN) --pool tokens --linear-epochs 30
	$(BIN)/leanmim probe $(DEMO_RUN) --pool tokens --linear-epochs 30 --baseline random
	$(BIN)/leanmim probe $(DEMO_RUN) --baseline raw
	$(BIN)/leanmim reconstruct $(DEMO_RUN) --out $(DEMO_RUN)/reconstruction.png --overwrite
	@echo "summary: $(DEMO_RUN)/summary.json  picture: $(DEMO_RUN)/reconstruction.png"

test: setup data
	$(BIN)/python -m pytest tests

# A throwaway venv with torch 2.13.0 CPU (the file pip finds on this machine kind's disk) and
# torchvision 0.28.0 (metadata only: --no-deps, never imported): a dry run of `pip install -e .`
# must plan no torch, torchvision, nvidia-* or triton. Downloads only torchvision's wheel (~8 MB).
CHECK_VENV ?= /tmp/leanmim-check-install
check-install:
	rm -rf $(CHECK_VENV) && $(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/pip install --quiet torch==2.13.0
	$(CHECK_VENV)/bin/pip install --quiet --no-deps torchvision==0.28.0
	$(CHECK_VENV)/bin/pip install --dry-run --quiet --report $(CHECK_VENV)/report.json -e .
	$(CHECK_VENV)/bin/python -c 'import json, sys; \
	  names = [p["metadata"]["name"].lower() for p in json.load(open("$(CHECK_VENV)/report.json"))["install"]]; \
	  bad = [n for n in names if n in ("torch", "torchvision", "triton") or n.startswith(("nvidia", "cuda"))]; \
	  print("check-install: pip install -e . would install", len(names), "packages, torch among them:", bad or "none"); \
	  sys.exit(1 if bad else 0)'
	rm -rf $(CHECK_VENV)

clean:
	rm -rf $(VENV) runs
