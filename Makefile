# selfmoe: every pipeline target is one call of `python -m selfmoe <phase> key=value ...`.
# Variables: DOMAIN (knowledge|reasoning|math|coding|all), MODEL (configs/model/*.yaml),
# GPUS (unset: CPU; 1: one GPU; N>1: DDP on N GPUs), ARGS (extra key=value overrides).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DOMAIN ?= math
MODEL  ?= tiny
GPUS   ?=
ARGS   ?=

# Without a GPU, the CPU build of torch (small, fast to install); with one, PyPI's default
# CUDA build. Override with TORCH='torch==2.x.y' (or a --index-url of your choice in PIP_ARGS).
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
PIP_ARGS ?=

ifeq ($(strip $(GPUS)),)
TRAINER :=
else ifeq ($(strip $(GPUS)),1)
TRAINER := trainer=gpu
else
TRAINER := trainer=ddp trainer.devices=$(GPUS)
endif
RUN := $(PY) -m selfmoe
COMMON = model=$(MODEL) $(TRAINER) $(ARGS)
NAME ?= table1
# Code-executing benchmarks (HumanEval, MBPP, the smoke code task) run model-written code: they
# need both switches, which EVAL_UNSAFE=1 sets. Use a container or VM (README, "Reliability").
EVAL_UNSAFE ?=
UNSAFE = $(if $(filter 1,$(EVAL_UNSAFE)),HF_ALLOW_CODE_EVAL=1,)
UNSAFE_ARGS = $(if $(filter 1,$(EVAL_UNSAFE)),eval.confirm_run_unsafe_code=true,)
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo data expert experts router baselines eval report experiment bench bench-scaling bench-cpu test test-fast lint clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: DOMAIN=$(DOMAIN) MODEL=$(MODEL) GPUS=$(GPUS) ARGS=$(ARGS)"

install: $(STAMP) ## make .venv and install selfmoe with its dev tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -q $(PIP_ARGS) -e ".[dev]"
	@touch $@

# The demo opts in to running the tiny model's completions of the smoke suite's 8 toy functions
# (each in an isolated, time- and memory-limited subprocess).
demo: $(STAMP) ## the whole method on the built-in tiny model (offline, CPU): data, experts, router, baselines, eval, report
	$(RUN) experts model=tiny $(ARGS)
	$(RUN) router model=tiny $(ARGS)
	$(RUN) expert domain=all model=tiny $(ARGS)
	$(RUN) merge model=tiny $(ARGS)
	HF_ALLOW_CODE_EVAL=1 $(RUN) eval model=tiny eval.confirm_run_unsafe_code=true $(ARGS)
	$(RUN) report model=tiny $(ARGS)

data: $(STAMP) ## self-generate DOMAIN's training data
	$(RUN) generate domain=$(DOMAIN) $(COMMON)

expert: $(STAMP) ## train DOMAIN's LoRA expert (generates its data if missing; DOMAIN=all: instance merging)
	$(RUN) expert domain=$(DOMAIN) $(COMMON)

experts: $(STAMP) ## train every domain's expert
	$(RUN) experts $(COMMON)

router: $(STAMP) ## MiXSE: compose the experts and train the router (fails fast if an expert is missing)
	$(RUN) router $(COMMON)

baselines: $(STAMP) ## instance merging (the LoRA of DOMAIN=all) and the TIES/DARE weight merges of the experts
	$(RUN) expert domain=all $(COMMON)
	$(RUN) merge $(COMMON)

eval: $(STAMP) ## lm-eval over eval.targets on eval.suite -> outputs/<model>/eval/summary.md (EVAL_UNSAFE=1: code tasks)
	$(UNSAFE) $(RUN) eval $(COMMON) $(UNSAFE_ARGS)

report: $(STAMP) ## results tables + routing figures + provenance -> outputs/<model>/report/report.md
	$(RUN) report $(COMMON)

experiment: $(STAMP) ## a paper table/figure end to end: NAME=table1|table2|table3|table4|fig5|table8|variance
	$(UNSAFE) $(RUN) experiment experiment=$(NAME) $(COMMON) $(UNSAFE_ARGS)

bench: $(STAMP) ## GPU throughput benchmarks E1-E5 (Llama-3-8B + Gemma-7B shapes, random weights) -> outputs/bench/
	$(PY) -m benchmarks --out outputs/bench/results.json

bench-scaling: $(STAMP) ## multi-GPU scaling of router/expert training and sharded generation (1, 2, 4, 8 GPUs as present)
	$(PY) -m benchmarks.scaling --gpus 1,2,4,8 --out outputs/bench/scaling.json

bench-cpu: $(STAMP) ## CPU regression benchmark: MiXSE ÷ base forward (hidden 1024, 8 layers)
	$(PY) -m benchmarks.cpu --out outputs/bench/cpu.json

test: $(STAMP) ## the offline test suite (unit, integration, slow)
	$(PY) -m pytest -q

test-fast: $(STAMP) ## the test suite without the slow tier
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff lint + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs lightning_logs .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
