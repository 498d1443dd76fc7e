# make test      — CPU checks from nothing: venv, install, ruff, mypy --strict, pytest.
# make gpu-test  — on a GPU machine whose Python already has CuPy (no registry needed).
# make demo      — the main job: overlap, priority and memory, on the GPU or the host backend.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint gpu-test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[cuda12,test]'
	touch $(STAMP)

lint: $(STAMP)
	$(VPY) -m ruff check cupystreams adapters tests examples scripts
	$(VPY) -m mypy

test: lint
	CUPYSTREAMS_REQUIRE_GPU= $(VPY) -m pytest -q

gpu-test:
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	CUPYSTREAMS_REQUIRE_GPU=$${CUPYSTREAMS_REQUIRE_GPU:-1} $(PYTHON) -m pytest -q -rs

demo: $(STAMP)
	$(VPY) -m cupystreams demo

bench: $(STAMP)
	$(VPY) -m cupystreams bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
