# Two commands: `make demo` and `make test`. Each creates .venv when missing, installs
# torch==2.13.0 first (a bare torch requirement would pull GBs of CUDA wheels), then
# qcompile with the extras it needs. A stamp keyed on pyproject.toml makes reruns install nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qcompile-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
TORCH  := torch==2.13.0

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[tvm,onnx,npu,peers,models,plot,dev,placement]"
	rm -f $(VENV)/.qcompile-*
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m qcompile.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check qcompile passes backends tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info
