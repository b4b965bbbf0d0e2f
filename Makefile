PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEVICE ?= cpu
DEMO_DIR ?= demo_out
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install install-gpu test test-all test-gpu lint fmt typecheck demo demo-continuous bench bench-full clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): requirements/cpu.txt requirements/nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP) ## build .venv (CPU, pinned); quick when nothing changed

install-gpu: ## build .venv with the CUDA builds of the same release line (needs an NVIDIA GPU)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements/gpu.txt
	$(BIN)/pip install -q --no-deps -r requirements/nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP) ## fast tests (not slow, not gpu)
	$(BIN)/pytest -q

test-all: $(STAMP) ## every test, slow ones included
	$(BIN)/pytest -q -m ""

test-gpu: $(STAMP) ## tests that need CUDA (they skip themselves without it)
	$(BIN)/pytest -q -m gpu

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP) ## format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP) ## mypy over recsys_mtl (and what it imports); CI runs it
	$(BIN)/mypy

demo: $(STAMP) ## the main job on the default synthetic world: data, texts, MMoE + single-task baselines, report, scores
	$(BIN)/recsys-mtl synth --out $(DEMO_DIR)/raw --overwrite --quiet
	$(BIN)/recsys-mtl prepare $(DEMO_DIR)/raw --out $(DEMO_DIR)/dataset --overwrite
	$(BIN)/recsys-mtl encode-text $(DEMO_DIR)/dataset --quiet
	touch $(DEMO_DIR)/dataset/.bench-ready
	rm -rf $(DEMO_DIR)/runs
	$(BIN)/recsys-mtl train --config configs/demo.toml --out $(DEMO_DIR)/runs/mmoe --quiet
	for task in ctr rating reads; do \
	  $(BIN)/recsys-mtl train --config configs/demo.toml --out $(DEMO_DIR)/runs/single_$$task --quiet \
	    --set "tasks=[{name=\"$$task\"}]" --set 'train.early_stop_metric=""' || exit 1; done
	$(BIN)/recsys-mtl train --config configs/demo.toml --out $(DEMO_DIR)/runs/single_cvr --quiet \
	  --set 'tasks=[{name="cvr", after="ctr", esmm=false}]' --set 'train.early_stop_metric=""'
	for task in ctr cvr rating reads; do \
	  $(BIN)/recsys-mtl evaluate $(DEMO_DIR)/runs/single_$$task --split test > /dev/null || exit 1; done
	$(BIN)/recsys-mtl evaluate $(DEMO_DIR)/runs/mmoe --split test --baselines $(DEMO_DIR)/runs/single_*
	$(BIN)/recsys-mtl score $(DEMO_DIR)/runs/mmoe $(DEMO_DIR)/dataset --split test --out $(DEMO_DIR)/scores --overwrite --quiet
	@echo "report: $(DEMO_DIR)/runs/mmoe/report_test.md, scores: $(DEMO_DIR)/scores"

demo-continuous: $(STAMP) ## training on tomorrow's data: a drifting world replayed day by day (frozen, incremental, retrain)
	rm -rf $(DEMO_DIR)/continuous
	$(BIN)/python benchmarks/bench_continuous.py --days 10 --first-week 4 --impressions 200000 --users 5000 \
	  --items 1500 --seeds 0 --keep $(DEMO_DIR)/continuous --out continuous_demo
	@echo "results: benchmarks/results/continuous_demo.md (.json, .png); datasets and runs: $(DEMO_DIR)/continuous"

BENCH_DATA := $(DEMO_DIR)/dataset/.bench-ready

$(BENCH_DATA): | $(STAMP)
	$(BIN)/recsys-mtl synth --out $(DEMO_DIR)/raw --overwrite --quiet
	$(BIN)/recsys-mtl prepare $(DEMO_DIR)/raw --out $(DEMO_DIR)/dataset --overwrite
	$(BIN)/recsys-mtl encode-text $(DEMO_DIR)/dataset --quiet
	touch $(BENCH_DATA)

bench: $(STAMP) $(BENCH_DATA) ## quick benchmark suite, about 7 min here (DEVICE=cpu|cuda): json + md under benchmarks/results/
	$(BIN)/python benchmarks/bench_kernels.py --device $(DEVICE) --quick
	$(BIN)/python benchmarks/bench_scaling.py --device $(DEVICE) --sizes 1e5,1e6,1e7 --batches 1024,4096 --steps 6
	$(BIN)/python benchmarks/bench_scale.py --device $(DEVICE) --steps 120
	$(BIN)/python benchmarks/bench_reader.py --device $(DEVICE) --impressions 1000000 --repeats 2
	$(BIN)/python benchmarks/bench_health.py --device $(DEVICE)
	$(BIN)/python benchmarks/bench_peers.py --quick --datasets default,ali

bench-full: $(STAMP) $(BENCH_DATA) ## every benchmark at full size (about an hour on 2 cores): the README's tables
	$(BIN)/python benchmarks/bench_kernels.py --device $(DEVICE)
	$(BIN)/python benchmarks/bench_scaling.py --device $(DEVICE)
	$(BIN)/python benchmarks/bench_scale.py --device $(DEVICE)
	$(BIN)/python benchmarks/bench_reader.py --device $(DEVICE)
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_synth.py --device $(DEVICE)
	$(BIN)/python benchmarks/bench_text.py --device $(DEVICE)
	$(BIN)/python benchmarks/bench_quality.py --device $(DEVICE)
	$(BIN)/python benchmarks/bench_peers.py

clean: ## remove build outputs and demo data (keeps .venv)
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache build *.egg-info
