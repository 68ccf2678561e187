# Fresh-machine entry points: `make verify` (the main job) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build; numpy<2.4 keeps the
# Triton 3.6 interpreter's range loops working
PINS    := torch==2.13.0 triton==3.6.0 "numpy<2.4"
TOOLS   := "lark>=1.1" "jinja2>=3.1" "sympy>=1.12" pytest hypothesis ruff hatchling editables

.PHONY: setup verify test lint clean

$(BIN)/.ready: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PINS) $(TOOLS)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(BIN)/.ready

# compile every example and check it against the interpreter (GPU if present, else CPU)
verify: $(BIN)/.ready
	$(BIN)/attngen verify examples

test: $(BIN)/.ready
	$(BIN)/python -m pytest -q

lint: $(BIN)/.ready
	$(BIN)/ruff check attngen tests benchmarks

clean:
	rm -rf $(VENV) build dist .pytest_cache
