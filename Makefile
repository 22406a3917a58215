# Two commands for a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Install torch 2.13.0 (the CPU wheel on this kind of machine) before anything asks for "torch".
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all venv install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (unless one is already importable), then the package itself.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test,serve,eval]"
	touch $@

venv install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# The shipped English→French translator, offline, in seconds.
demo: $(VENV)/.installed
	$(BIN)/mistral-torch generate --max-new-tokens 40 "Translate: English → French\nEnglish: Hello, how are you?\nFrench:"
	printf 'I like cats.\nWhere is the train station?\nThe weather is nice today.\n' | $(BIN)/mistral-torch translate

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow" --timeout=900

test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q --timeout=1800

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
