# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs the CPU build of torch first (a bare `torch` requirement makes pip
# choose a multi-GB CUDA build), then Adaptory with its test extras (dev, and eval: lm-eval).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# On a Linux machine pip's default index serves the multi-GB CUDA build of that pin; for the CPU
# build: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-gpu soak quality mutation lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev,eval]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Everything CI runs: fast and slow tests, not the long soak.
test: $(STAMP)
	$(PY) -m pytest -q -m "not soak"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not soak"

# The suite with CUDA as every base's device (fp32 numerics); CPU-only promises are skipped
# with their reason (tests/conftest.py). benchmarks/gpu.sh runs this first.
test-gpu: $(STAMP)
	ADAPTORY_TEST_DEVICE=cuda $(PY) -m pytest -q -m "not soak"

# The long reliability runs (kill loops, 30 s of concurrent writers, 2,000-request load test).
soak: $(STAMP)
	$(PY) -m pytest -q -s -m soak
	$(PY) benchmarks/soak.py --out soak.json

# Adapter quality (not in CI; about an hour on 2 cores): adapters trained with the defaults on
# 3 classification and 3 generation domains, 5 seeds each, scored on held-out data against the
# base alone (docs/BENCHMARKS.md, "Quality"). The work folder caches the generation base.
QUALITY_ARGS ?=
quality: $(STAMP)
	nice -n 10 $(PY) -m adaptory.cli.main bench quality --workdir build/quality \
		--json build/quality/quality.json $(QUALITY_ARGS)

# Mutation testing (not in CI; hours on 2 cores): cosmic-ray, one module at a time, each mutant
# running its module's fast tests, on a copy of the tree (pyproject's [tool.adaptory.mutation],
# docs/TESTING.md). One module: make mutation MODULES=registry/refs.py
# Mutants run MUTATION_WORKERS at once (one per core by default), each on its own tree copy.
MODULES ?=
MUTATION_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
mutation: $(STAMP)
	nice -n 19 $(PY) tests/mutation/run.py --workers $(MUTATION_WORKERS) $(MODULES)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
