# promptsweep: `make demo` pretrains the project's mini CLIP once (cached) and runs an offline sweep on it,
# `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch as this machine allows: the local wheels are capped at 2.14.1 / 0.29.1.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup pretrain demo lint format test test-fast clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# the demo's backbone (promptsweep-mini, tag promptsweep): built once into the cache, minutes on a CPU
pretrain: setup
	$(PY) -m methods pretrain --eval

demo: setup
	$(PY) -m methods pretrain
	RAY_AUTH_MODE=disabled $(PY) -m orchestrator.sweep search_spaces/demo.yaml

# the linter (ruff: lint + format check, settings in pyproject.toml); `make format` applies both
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup lint
	RAY_AUTH_MODE=disabled $(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
