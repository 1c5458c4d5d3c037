# agentd: the two set-up commands are `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=
# Three test processes, each file's tests in one (its servers and fixtures stay together):
# most tests wait on servers and scrapes, so even two cores run the suite in about half the
# time (measured: docs/testing.md).
TEST_WORKERS ?= 3
# What the tests start or call: a real Prometheus and node_exporter, fio, openssl (TLS
# certificates), systemd-analyze (the unit's checks), VictoriaMetrics (the cluster queries
# against the store users outgrow Prometheus into) and Alertmanager (alerts end to end).
TEST_TOOLS := prometheus prometheus-node-exporter fio openssl systemd-analyze victoria-metrics \
	prometheus-alertmanager
TEST_PACKAGES := prometheus prometheus-node-exporter fio openssl systemd victoria-metrics \
	prometheus-alertmanager
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-packages bench docs dashboards rules golden clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/agentd run $(ARGS)

test-packages:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for:$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null \
		|| { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null; }; \
	fi

test: $(BIN)/.installed test-packages
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/daemon_overhead.py

docs: $(BIN)/.installed
	$(BIN)/agentd catalog --markdown > docs/metrics.md

dashboards: $(BIN)/.installed
	$(BIN)/agentd dashboards --out grafana/dashboards

rules: $(BIN)/.installed
	$(BIN)/agentd rules --out rules/agentd.rules.yml

golden: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests/test_exporter.py --update-golden

clean:
	rm -rf $(VENV) build *.egg-info
