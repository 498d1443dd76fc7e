# make test      — CPU checks from nothing: venv, install, ruff, mypy --strict, the manual
#                  (built with warnings as errors, its examples run), pytest.
# make docs      — the manual, docs/ -> docs/_build/html (Sphinx; warnings are errors).
# make doctest   — run the manual's examples on the host backend.
# make gpu-test  — on a GPU machine whose Python already has CuPy, setuptools>=77 and the
#                  test extra (pytest, hypothesis, rich, matplotlib): no registry needed.
# make demo      — the main job: overlap, priority and memory, on the GPU or the host backend.
#                  Installs only the cli extra, and CuPy for CUDA 12 where nvidia-smi
#                  finds a GPU (make demo GPU_EXTRA=,cuda13 for CUDA 13).

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
GPU_EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo ,cuda12)

# Warnings are errors, all of them reported; every reference must resolve.
SPHINX := $(VPY) -m sphinx -W --keep-going -n -q

.PHONY: test lint docs doctest gpu-test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[cuda12,test]'
	touch $(STAMP)

# The demo's own stamp in the same venv: no test tools, no CUDA wheel without a GPU.
$(DEMO_STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet -e '.[cli$(GPU_EXTRA)]'
	touch $(DEMO_STAMP)

lint: $(STAMP)
	$(VPY) -m ruff check cupystreams adapters tests examples scripts docs
	$(VPY) -m mypy

docs: $(STAMP)
	$(SPHINX) -E -b html -d docs/_build/doctrees docs docs/_build/html

doctest: $(STAMP)
	$(SPHINX) -E -b doctest -d docs/_build/doctrees-doctest docs docs/_build/doctest

test: lint docs doctest
	CUPYSTREAMS_REQUIRE_GPU= $(VPY) -m pytest -q

gpu-test:
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	CUPYSTREAMS_REQUIRE_GPU=$${CUPYSTREAMS_REQUIRE_GPU:-1} $(PYTHON) -m pytest -q -rs

demo: $(DEMO_STAMP)
	$(VPY) -m cupystreams demo

bench: $(DEMO_STAMP)
	$(VPY) -m cupystreams bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis docs/_build
