# The two commands a newcomer needs: `make serve` and `make test`.
# Everything else is a step they call.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for torch, e.g. TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu130
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.aotiserve-setup

.PHONY: setup serve test lint format proto proto-check bench clean image-test

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py requirements-dev.txt $(wildcard runner_ext/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	deploy/build_deps.sh
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

serve: setup
	$(VENV)/bin/aotiserve serve $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (pinned in requirements-dev.txt; configured in pyproject.toml): lint and format check.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Sorts imports and formats every file (re-run it to resolve formatting conflicts).
format: setup
	$(VENV)/bin/ruff check --select I --fix .
	$(VENV)/bin/ruff format .

proto: setup
	$(PY) proto/generate.py

proto-check: setup
	$(PY) proto/generate.py --check

bench: setup
	$(PY) -m bench.run_all $(ARGS)

clean:
	rm -rf build *.egg-info runner_ext/_C*.so runner_ext/_build_info.py .cache

# Builds the CPU container image with podman and smoke-tests it: gRPC health,
# an inference on the demo model, SIGTERM -> exit 0 (docs/deploy.md).
# Minutes the first time (base image, torch layer); cached after that.
image-test: setup
	AOTISERVE_IMAGE_PYTHON=$(abspath $(PY)) deploy/image_test.sh
