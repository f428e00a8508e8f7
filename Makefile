# The two commands the README starts with: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# sslyze pins an older cryptography than acme: it gets its own venv.
SSLYZE_VENV := .venv-sslyze

.PHONY: run test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(SSLYZE_VENV)/.installed:
	$(PYTHON) -m venv $(SSLYZE_VENV)
	$(SSLYZE_VENV)/bin/pip install -q sslyze
	touch $@

# The demo: a backend on 127.0.0.1:8000 and port443 in front of it (https 8443, http 8080)
# with a certificate for localhost from the built-in local CA.
run: $(VENV)/.installed
	@$(PY) -m proxy.demo --port 8000 & backend=$$!; trap 'kill $$backend' EXIT INT TERM; \
	echo "try: curl --cacert certs/local/root.pem https://localhost:8443/"; \
	$(PY) -m proxy run -c config/port443.toml

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check proxy tests bench container
	$(VENV)/bin/ruff format --check proxy tests bench container
	$(VENV)/bin/mypy

test: $(VENV)/.installed $(SSLYZE_VENV)/.installed lint
	$(PY) -m pytest -q

# Writes docs/benchmarks.md and its figures (port443 against nginx, HAProxy, Caddy; ~6-9 min).
# Needs haproxy, caddy, nginx-light, nghttp2-client (.ci/apt-packages.txt). BENCH_ARGS=--quick
# port443 runs on the distribution's python3 (built with PGO and LTO, as in the container
# image), in its own venv: a Python compiled without them (pyenv's default) costs port443
# about 20% more CPU per request (measured: 291 against 237 us for HTTP/1.1).
BENCH_PYTHON ?= $(firstword $(wildcard /usr/bin/python3) $(PYTHON))
BENCH_VENV := .venv-bench

$(BENCH_VENV)/.installed: pyproject.toml
	$(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q -e .
	touch $@

bench: $(VENV)/.installed $(BENCH_VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/run.py --python $(BENCH_VENV)/bin/python $(BENCH_ARGS)
