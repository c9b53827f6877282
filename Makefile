# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs the CPU build of torch first (a bare `torch` requirement makes pip
# choose a multi-GB CUDA build), then Adaptory with its test extras.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast soak lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Everything CI runs: fast and slow tests, not the long soak.
test: $(STAMP)
	$(PY) -m pytest -q -m "not soak"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not soak"

# The long reliability runs (kill loops, 30 s of concurrent writers, 2,000-request load test).
soak: $(STAMP)
	$(PY) -m pytest -q -s -m soak
	$(PY) benchmarks/soak.py --out soak.json

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
