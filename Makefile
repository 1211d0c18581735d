# The two README commands: `make demo` and `make test`. Everything runs from a local .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEMO := out/demo

.PHONY: install demo test test-quick

install: $(VENV)/.installed

# The package (editable) with the annotation stage, the test tools and the compile check's libtpu and
# CUDA plugin, in ONE pip command so pip never swaps the torch build.
$(VENV)/.installed: pyproject.toml requirements.txt requirements-test.txt requirements-aot.txt annotate/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[annotate,test,aot]'
	touch $@

# JAX on its CPU backend only: the venv holds libtpu and the CUDA plugin (for python -m zoomin_jax.aot),
# which JAX would otherwise try to start on a machine without their devices.
CPU_ONLY := JAX_PLATFORMS=cpu

# The whole method on CPU: synthetic figures -> heuristic annotation -> zoom-in and figure-only
# training (3 seeds) -> retrieval at three levels -> open_clip export, verified -> results table.
demo: install
	$(CPU_ONLY) $(PY) -m zoomin_jax.demo --out $(DEMO)

# 8 virtual XLA devices for the sharding tests; two pytest-xdist workers, a test file each (JAX's
# compiles are mostly single-threaded, and many tests wait on subprocesses); one persistent
# compilation cache for every test process and the programs they start (absolute: some tests run
# commands from other directories), so the many runs of the same tiny steps compile once.
# The files with slow tests go first (tests/conftest.py; xdist would otherwise start the files with
# the most tests first); tests/README.md lists the slow tests and what each alone covers; test-quick
# runs the rest.
TEST_ENV := $(CPU_ONLY) XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test: install
	$(TEST_ENV) $(PYTEST) tests

test-quick: install
	$(TEST_ENV) $(PYTEST) -m "not slow" tests
