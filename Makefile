# NexMDM. `make run` serves the API; `make test` runs the whole suite. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.PHONY: run test lint bench bench-ingest venv clean-var

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "NexMDM needs Python 3.11+"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) -m api serve

test: $(STAMP)
	$(PY) -m pytest -q

.PHONY: console
console: $(STAMP)
	$(PY) -m console $(CONSOLE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-ingest: $(STAMP)
	$(PY) -m bench.ingest

bench: $(STAMP)
	$(PY) -m bench.suite

clean-var:
	$(PY) -m db stop || true
	rm -rf var

.PHONY: bench-simulator
bench-simulator: $(STAMP)
	$(PY) -m simulator.bench
