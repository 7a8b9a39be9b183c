# Two entry points for a fresh machine:
#   make demo   set up, pretrain MAE on Fashion-MNIST (~12 min on 2 CPU cores), probe, draw reconstructions
#   make test   set up, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_RUN ?= runs/demo-mae

.PHONY: setup data demo test clean

$(BIN)/leanmim: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/leanmim

data:
	@[ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ] || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

demo: setup data
	$(BIN)/leanmim pretrain --config configs/demo.yaml --out $(DEMO_RUN)
	$(BIN)/leanmim probe $(DEMO_RUN) --pool tokens --linear-epochs 30
	$(BIN)/leanmim probe $(DEMO_RUN) --pool tokens --linear-epochs 30 --baseline random
	$(BIN)/leanmim probe $(DEMO_RUN) --baseline raw
	$(BIN)/leanmim reconstruct $(DEMO_RUN) --out $(DEMO_RUN)/reconstruction.png --overwrite
	@echo "summary: $(DEMO_RUN)/summary.json  picture: $(DEMO_RUN)/reconstruction.png"

test: setup data
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
