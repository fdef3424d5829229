# Private GPT: the one entry point for people and CI.
#   make run    set everything up and serve http://127.0.0.1:8000
#   make test   install the dev tools and run the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test train install install-dev chromium caddy lint format migrate lock clean

run: $(VENV)/.installed
	$(BIN)/python -m app serve

test: $(VENV)/.installed-dev chromium caddy
	$(BIN)/ruff check app training tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

# Fine-tune an adapter: make train CONFIG=training/configs/tiny-cpu.yaml [ARGS="--max_steps 50"]
CONFIG ?= training/configs/tiny-cpu.yaml
train: $(VENV)/.installed
	$(BIN)/python -m training $(CONFIG) $(ARGS)

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11 or newer is needed" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml requirements.lock scripts/install-torch | $(BIN)/python
	scripts/install-torch $(BIN)/pip
	$(BIN)/pip install --quiet -c requirements.lock -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

# Rewrite the lock from the current environment, after changing pyproject.toml and testing.
lock: $(VENV)/.installed-dev
	{ head -n 2 requirements.lock; $(BIN)/pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# Test tools from Debian: Chromium drives the browser tests (browser downloads are not possible
# here), Caddy parses deploy/Caddyfile in tests/deploy.
chromium caddy:
	@command -v $@ >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $@ >/dev/null; \
	  else echo "Install $@ for the tests (Debian/Ubuntu: sudo apt-get install $@)"; exit 1; fi; }

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check app training tests bench
	$(BIN)/ruff format --check app training tests bench
	$(BIN)/mypy

format: $(VENV)/.installed-dev
	$(BIN)/ruff format app training tests bench
	$(BIN)/ruff check --fix app training tests bench

migrate: $(VENV)/.installed
	$(BIN)/python -m app migrate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
