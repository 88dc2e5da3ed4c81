# One place that builds the environment: README, .ci/run and developers all use these targets.
# torch from the registry with its matching torchvision: the CPU wheel in the machine's local
# folder has no matching torchvision, and timm imports torchvision.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := "torch===2.13.0" "torchvision==0.28.0"

.PHONY: test test-quick demo lint format venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-quick: $(STAMP)  # the inner loop: everything but the multi-process / end-to-end runs
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
