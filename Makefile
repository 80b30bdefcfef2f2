# NexMDM. `make run` serves the API; `make test` runs the suite but the slow scenarios (`make test-faults`). Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: run test test-faults lint bench bench-ingest venv clean-var
.PHONY: promtool pgbouncer cluster-packages drill-cluster

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

test: $(STAMP) promtool pgbouncer
	$(PY) -m pytest -q -m "not slow"

# The slow tests (fault and overload scenarios, a few minutes); prints the fault table at the end.
# Includes the short PostgreSQL failover drill (Patroni + etcd + HAProxy), hence cluster-packages,
# and the live Prometheus drill, hence promtool (Debian's prometheus package).
test-faults: $(STAMP) cluster-packages promtool
	$(PY) -m pytest -q -m slow

# The full multi-node drill: etcd, Patroni (primary + synchronous standby + async replica),
# 3 API nodes, HAProxy; the simulator through HAProxy while an API node and then the primary are
# SIGKILLed. Prints the table; stops every process it started (by PID), also on failure.
drill-cluster: $(STAMP) cluster-packages
	$(PY) -m bench.drill $(DRILL_ARGS)

# promtool and prometheus (Debian's prometheus package) run the alert-rule tests and the live
# Prometheus drill (make test-faults). Installed when missing and
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

# Debian packages installed when missing and this is root with apt-get (CI starts from a fresh
# machine), as for promtool: $(call apt_install,<command or path to test>,<packages>,<what skips>)
define apt_install
	@command -v $(1) >/dev/null 2>&1 || test -x $(1) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(2) (Debian) ..."; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        $(2) >/dev/null; } || echo "$(2) could not be installed: $(3)"; \
	  else \
	    echo "$(1) not found (needs root and apt-get to install $(2)): $(3)"; \
	  fi; }
endef

# PgBouncer 1.18 (Debian 12) for the transaction-pooling tests (tests/db/test_pgbouncer.py).
pgbouncer:
	$(call apt_install,pgbouncer,pgbouncer,the PgBouncer tests will skip)

# What the cluster drill runs: HAProxy, etcd, Patroni, and Debian's PostgreSQL 15 (the version
# Debian 12's Patroni 3.0.2 supports; see docs/SCALING.md).
cluster-packages:
	$(call apt_install,haproxy,haproxy,the cluster drill cannot run)
	$(call apt_install,etcd,etcd-server etcd-client,the cluster drill cannot run)
	$(call apt_install,patroni,patroni,the cluster drill cannot run)
	$(call apt_install,/usr/lib/postgresql/15/bin/postgres,postgresql-15,the cluster drill cannot run)

.PHONY: console
console: $(STAMP)
	$(PY) -m console $(CONSOLE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-ingest: $(STAMP)
	$(PY) -m bench.ingest

# The performance suite, then the per-tier figures of docs/SCALING.md (one and two API nodes).
bench: $(STAMP)
	$(PY) -m bench.suite
	$(PY) -m bench.tiers

# History tiers at 10,000 devices x 90 days: bytes per heartbeat hot and cold, nightly s per
# million rows, read latency by range (~13 GB under var/bench-storage while it runs).
# Keep the dataset, then re-measure only the reads on it (~20 s on a quiet machine):
#   make bench-storage BENCH_STORAGE_ARGS="--keep --dir /some/where"
#   make bench-storage BENCH_STORAGE_ARGS="--reads-only --dir /some/where"
.PHONY: bench-storage
bench-storage: $(STAMP)
	$(PY) -m bench.storage $(BENCH_STORAGE_ARGS)

clean-var:
	$(PY) -m db remove || true
	rm -rf var

# A carrier outage at 150,000 devices: one events run must record the 15,000 device_offline
# events in < 5 s; a webhook on 127.0.0.1 receives them in batches (own cluster, var/bench-events).
.PHONY: bench-events
bench-events: $(STAMP)
	$(PY) -m bench.events

.PHONY: bench-simulator
bench-simulator: $(STAMP)
	$(PY) -m simulator.bench
