# The two README commands: `make demo` and `make test`. Everything runs from a local .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEMO := out/demo

.PHONY: install demo test

install: $(VENV)/.installed

# The package (editable) with the annotation stage and the test tools, in ONE pip command so pip
# never swaps the torch build.
$(VENV)/.installed: pyproject.toml requirements.txt requirements-test.txt annotate/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[annotate,test]'
	touch $@

# The whole method on CPU: synthetic figures -> heuristic annotation -> zoom-in and figure-only
# training (3 seeds) -> retrieval at three levels -> open_clip export, verified -> results table.
demo: install
	$(PY) -m zoomin_jax.demo --out $(DEMO)

# No JAX_COMPILATION_CACHE_DIR: it halved the suite's time, but with jax 0.10.2 an executable
# loaded from it on 8 virtual CPU devices deadlocked in its all-gather (rendezvous timeout, abort).
test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q --durations=25 tests
