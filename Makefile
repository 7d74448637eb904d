# `make book` builds the rendered book (executing every chapter); `make test` runs the suite.
# Both create the virtual environment .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: book test test-fast bench browser-deps clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	touch $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

# Debian's Chromium for the browser test: installed when missing and we are root.
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); \
	  else \
	    echo "The browser test needs Debian's Chromium. Run: sudo apt-get install -y chromium"; exit 1; \
	  fi; \
	fi

# Unit tests first (fast), then the slow ones (book build, notebooks, browser, training).
test: $(STAMP) browser-deps
	$(PY) -m pytest -q -m "not slow" tests
	$(PY) -m pytest -q -m slow tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m ddetr_minimal benchmark

clean:
	rm -rf _build
