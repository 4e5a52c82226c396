# swapctl: `make test` sets everything up and runs every test; `make run` runs the example.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config.example.yaml

.PHONY: test lint pytest docker images browser registry hosts models run bench clean

test: lint pytest

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

pytest: $(VENV)/.installed docker images browser registry hosts
	$(BIN)/pytest

# A Docker engine (installed and started when absent) and the image the tests and example use.
docker:
	bash scripts/docker-engine.sh

images: docker
	bash scripts/build-llama-image.sh swapctl/llama-server:sid

# Debian's container registry, which the pull tests serve images from on 127.0.0.1.
registry:
	bash scripts/registry.sh

# Debian's sshd and iptables, for the second engine the tests run in a network namespace.
hosts:
	bash scripts/hosts.sh

# Chromium (Debian's package) for the browser test of the web page; Playwright drives it.
browser:
	bash scripts/browser.sh

# Three tiny offline models for the example (random weights, distinct seeds).
models: $(VENV)/.installed
	mkdir -p build/models
	$(BIN)/python scripts/tiny_gguf.py build/models/tiny-chat.gguf --seed 1
	$(BIN)/python scripts/tiny_gguf.py build/models/tiny-code.gguf --seed 2
	$(BIN)/python scripts/tiny_gguf.py build/models/tiny-big.gguf --seed 3

run: $(VENV)/.installed images models
	$(BIN)/swapctl up -c $(CONFIG)

bench: $(VENV)/.installed
	$(BIN)/python bench/solver_bench.py

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache .hypothesis
