# NexMDM. `make run` serves the API; `make test` runs the suite but the slow scenarios (`make test-faults`). Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: run test test-faults lint bench bench-ingest venv clean-var
.PHONY: promtool

# The development environment: runtime requirements (requirements.txt) plus the test tools
# (requirements-dev.txt); a production host installs the package alone (`pip install .`).
$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "NexMDM needs Python 3.11+"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) -m api serve

test: $(STAMP) promtool
	$(PY) -m pytest -q -m "not slow"

# The slow tests (fault and overload scenarios, a few minutes); prints the fault table at the end.
test-faults: $(STAMP)
	$(PY) -m pytest -q -m slow

# promtool (Debian's prometheus package) runs the alert-rule tests. Installed when missing and
# this is root with apt-get; otherwise those tests skip and say why.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing promtool (Debian package prometheus) ..."; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        prometheus >/dev/null; } || echo "promtool could not be installed: the alert-rule tests will skip"; \
	  else \
	    echo "promtool not found (needs root and apt-get to install): the alert-rule tests will skip"; \
	  fi; }

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
