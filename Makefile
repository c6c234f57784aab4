# longcat: the two set-up commands are `make train` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
TRAIN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv corpus train test test-fast bench plots clean help

help:
	@echo "make train   - install into $(VENV), prepare the corpus, train the tiny model on CPU"
	@echo "make test    - install into $(VENV) and run the test suite"
	@echo "make bench   - run the benchmark suite (writes benchmarks/results/*.json)"
	@echo "make corpus  - prepare (and cache) the embedded standard-library corpus"

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

corpus: venv
	$(PY) tools/prepare_corpus.py

# The default run on $(NPROC) processes, experts split over them (ep = NPROC; the README has the command).
train: corpus
	$(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m longcat.train recipe=pretrain parallel.ep=$(NPROC) $(TRAIN_ARGS)
	$(PY) tools/plot_metrics.py --metrics runs/pretrain/metrics.jsonl --output runs/pretrain/plots

plots: venv
	$(PY) tools/plot_metrics.py --metrics runs/pretrain/metrics.jsonl --output runs/pretrain/plots

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: venv
	$(PY) tools/bench.py

clean:
	rm -rf runs .cache .pytest_cache
