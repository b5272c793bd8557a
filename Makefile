# ext-authz developer commands. `make test` builds the environment from nothing and runs every check.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test tools lint typecheck imports unit protos venv run bench soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -rf ext_authz.egg-info  # setuptools' build leftover; the installed metadata is in the venv
	touch $(STAMP)

test: $(STAMP) tools lint typecheck imports unit

# System tools the tests run (Debian packages; CI and the developers' machines run as root), as
# command:package pairs; only the packages of missing commands are installed. faketime moves the
# machine's clock for tests/unit/test_fixed_clock.py; chromium and chromedriver drive a headless
# browser (tests/support/browser.py).
TOOLS := faketime:faketime chromium:chromium chromedriver:chromium-driver nginx:nginx caddy:caddy promtool:prometheus
tools:
	@missing=""; for t in $(TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check ext_authz tests
	$(VENV)/bin/ruff format --check ext_authz tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The import boundaries of the layout table (README: Development), from [tool.importlinter].
imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

unit: $(STAMP)
	$(PY) -m pytest

# Benchmarks: ratios measured in one run (never part of `make test`). tests/bench/suite.py runs every
# scenario of issue 6 through a real Envoy (E0-E2, X1-X4), the in-process micro-benchmarks and
# bench_rules.py, and writes BENCH_REPORT (about 3 minutes on 2 cores). Installs what it needs: wrk
# and h2load (Debian's wrk and nghttp2-client; root) and py-spy (into the venv, for the profile).
BENCH_REPORT ?= tests/bench/REPORT.md
# The soak (issue 18): the whole stack under load with overlapping faults for SOAK_SECONDS, its
# verdict and tests/soak/REPORT.md with plots. Never part of `make test`.
SOAK_SECONDS ?= 1800
soak: $(STAMP)
	$(PY) -m tests.soak.run --seconds $(SOAK_SECONDS) --report tests/soak/REPORT.md

bench: $(STAMP)
	@command -v wrk >/dev/null && command -v h2load >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client; }
	@test -x $(VENV)/bin/py-spy || $(PY) -m pip install --quiet py-spy
	$(PY) -m tests.bench.suite --report $(BENCH_REPORT)

# Regenerates ext_authz/_proto from protos/ (a test checks the committed files match).
protos: $(STAMP)
	$(PY) protos/generate.py .

# The local stack: dev issuer, echo backend, ext-authz (deploy/local/ext-authz.yaml) and a gateway in
# front: GATEWAY=envoy (the default: Envoy, envoy.yaml, gRPC Check), envoy-http (Envoy,
# deploy/envoy/envoy-http.yaml, http_service), nginx (deploy/nginx/nginx.conf) or caddy
# (deploy/caddy/Caddyfile), the last two rendered with the stack's ports into a temporary directory
# and installed if missing (Debian's nginx, caddy; root). With a gateway that asks over HTTP,
# ext-authz also runs its HTTP listener (--listen-http). Prints curl commands with fresh tokens, sent
# to the gateway; Ctrl-C stops it all. Ports default to the gateway config's; override with RUN_HOST,
# RUN_ENVOY_PORT (the gateway's port, whichever it is), RUN_ENVOY_ADMIN_PORT, RUN_AUTHZ_PORT (gRPC),
# RUN_AUTHZ_HTTP_PORT (HTTP, default 9003), RUN_BACKEND_PORT, RUN_ISSUER_PORT (and RUN_KEY_DIR),
# e.g. `make run GATEWAY=nginx RUN_ENVOY_PORT=18000`.
GATEWAY ?= envoy
run: $(STAMP)
	@case "$(GATEWAY)" in nginx|caddy) command -v $(GATEWAY) >/dev/null || test -x /usr/sbin/$(GATEWAY) || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y -qq $(GATEWAY) >/dev/null; };; esac
	$(PY) -m ext_authz.dev stack --gateway $(GATEWAY) --config deploy/local/ext-authz.yaml

clean:
	rm -rf $(VENV) ext_authz.egg-info  # caches live in $(VENV)/cache

# Coverage-guided fuzzing with atheris (never part of `make test`): token parsing and verification,
# then serialized CheckRequests through the adapter and the pipeline, FUZZ_SECONDS each. Installs
# atheris into the venv if missing. A crash (an exception other than a denial, or a forged token
# allowed) fails the target and leaves the input under FUZZ_DIR; the corpus there grows run by run.
FUZZ_SECONDS ?= 30
FUZZ_DIR ?= /tmp/ext-authz-fuzz
.PHONY: fuzz
fuzz: $(STAMP)
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet atheris
	mkdir -p $(FUZZ_DIR)
	$(PY) -m tests.fuzz.fuzz_tokens -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 \
		-artifact_prefix=$(FUZZ_DIR)/tokens- $(FUZZ_DIR)/corpus-tokens
	$(PY) -m tests.fuzz.fuzz_check_request -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 \
		-artifact_prefix=$(FUZZ_DIR)/check- $(FUZZ_DIR)/corpus-check
