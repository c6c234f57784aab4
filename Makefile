# longcat: the two set-up commands are `make train` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# The lock pins every package `make venv` installs (torch too); `make lock` re-resolves it.
TORCH_SPEC ?= torch==$(or $(shell sed -n "s/^torch==//p" $(LOCK) 2>/dev/null),2.13.0)
EXTRAS := test,dev
NPROC ?= 2
TRAIN_ARGS ?=
PYTEST_ARGS ?=

BENCH_ARGS ?=

.PHONY: venv lock lint corpus train test bench bench-gpu pipeline plots clean help

help:
	@echo "make train   - install into $(VENV), prepare the corpus, train the tiny model on CPU"
	@echo "make test    - install into $(VENV) and run the test suite"
	@echo "make lint    - ruff, the import-layer contract (import-linter) and mypy on src/"
	@echo "make bench   - run the benchmark suite (writes benchmarks/results/*.json and docs/benchmarks.md)"
	@echo "make bench-gpu - bf16 MFU of a ~1B-active training step on one CUDA GPU (needs a CUDA torch)"
	@echo "make pipeline - pre-train -> mid-train -> long context -> agentic SFT on the embedded default"
	@echo "make corpus  - prepare (and cache) the embedded standard-library corpus"
	@echo "make lock    - re-resolve $(LOCK) to the newest versions setup.py allows (then make test, commit)"

# Every package comes from the lock (-c): an upstream release cannot change what a fresh clone runs.
# torch first, alone, so pip takes the CPU build this machine keeps on disk rather than a CUDA one.
$(VENV)/.installed: setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PY) tools/check_lock.py --lock $(LOCK)
	touch $@

venv: $(VENV)/.installed

corpus: venv
	$(PY) tools/prepare_corpus.py

# The default run on $(NPROC) processes, experts split over them (ep = NPROC; the README has the command).
train: corpus
	$(PY) -m longcat.torchrun --nproc-per-node $(NPROC) -m longcat.train recipe=pretrain parallel.ep=$(NPROC) $(TRAIN_ARGS)
	$(PY) tools/plot_metrics.py --metrics runs/pretrain/metrics.jsonl --output runs/pretrain/plots

# Re-resolve the lock in a scratch venv: newest versions within setup.py's ranges (torch stays at
# TORCH_SPEC's version unless you pass e.g. TORCH_SPEC=torch==2.14.0).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	.venv-lock/bin/python tools/check_lock.py --write $(LOCK)
	rm -rf .venv-lock
	@echo "$(LOCK) re-resolved: run make test (a fresh venv: rm -rf $(VENV)), then commit setup.py and $(LOCK)"

plots: venv
	$(PY) tools/plot_metrics.py --metrics runs/pretrain/metrics.jsonl --output runs/pretrain/plots

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: venv
	$(VENV)/bin/ruff check src tools tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy --config-file mypy.ini src/longcat

bench: venv
	$(PY) tools/bench.py $(BENCH_ARGS)

bench-gpu: venv
	$(PY) tools/bench_gpu.py --output benchmarks/results
	$(PY) tools/bench_gpu.py --compile --output benchmarks/results
	$(PY) tools/bench.py --report-only

pipeline: corpus
	$(PY) tools/run_pipeline.py --pipeline pipeline --out runs/pipeline $(TRAIN_ARGS)

clean:
	rm -rf runs .cache .pytest_cache .venv-lock
