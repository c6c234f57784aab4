# longcat: the two set-up commands are `make train` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
TRAIN_ARGS ?=
PYTEST_ARGS ?=

BENCH_ARGS ?=

.PHONY: venv corpus train test bench bench-gpu pipeline plots clean help

help:
	@echo "make train   - install into $(VENV), prepare the corpus, train the tiny model on CPU"
	@echo "make test    - install into $(VENV) and run the test suite"
	@echo "make bench   - run the benchmark suite (writes benchmarks/results/*.json and docs/benchmarks.md)"
	@echo "make bench-gpu - bf16 MFU of a ~1B-active training step on one CUDA GPU (needs a CUDA torch)"
	@echo "make pipeline - pre-train -> mid-train -> long context -> agentic SFT on the embedded default"
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
	$(PY) tools/bench.py $(BENCH_ARGS)

bench-gpu: venv
	$(PY) tools/bench_gpu.py --output benchmarks/results
	$(PY) tools/bench.py --report-only

pipeline: corpus
	$(PY) tools/run_pipeline.py --pipeline pipeline --out runs/pipeline $(TRAIN_ARGS)

clean:
	rm -rf runs .cache .pytest_cache
