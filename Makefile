# vault — developer entry points. `make help` lists them.
CARGO ?= cargo
JOBS  ?= 2
export CARGO_BUILD_JOBS ?= $(JOBS)

.PHONY: help build test lint fmt fuzz faults chaos demo bench tansu up down build-deps python-deps prometheus-deps chromium-deps rules k8s-deps k8s compose-deps compose

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

build: build-deps ## Build the vault binary (release)
	$(CARGO) build --release --bin vault

# Tests are built with failpoints (see src/failpoint.rs); a release build never has them.
TEST_FEATURES := --features vault/failpoints

test: build-deps python-deps chromium-deps rules k8s compose ## Unit and integration tests (in-process Kafka mock cluster and CQL stand-in; no servers needed), with a short chaos run
	$(CARGO) test --workspace --all-targets $(TEST_FEATURES)

python-deps: ## The Python driver (scylla-driver, cqlsh's base) for the CQL stand-in conformance test
	@python3 -c 'import cassandra' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check scylla-driver

build-deps: ## OpenSSL headers and pkg-config (librdkafka and the ScyllaDB driver link OpenSSL), installed when missing
	@dpkg -s libssl-dev pkg-config >/dev/null 2>&1 || { \
	  echo "installing libssl-dev and pkg-config"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends libssl-dev pkg-config >/dev/null; }

# Debian's prometheus package: promtool for the rule tests, the server for the scrape test;
# prometheus-alertmanager: amtool and the server, for the Alertmanager configuration's tests.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
prometheus-deps: ## Prometheus, promtool, Alertmanager and amtool (Debian's packages), installed when missing
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v amtool >/dev/null && command -v prometheus-alertmanager >/dev/null || { \
	  echo "installing Debian's prometheus and prometheus-alertmanager packages (for the tests)"; \
	  $(SUDO) apt-get update -qq && \
	  RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null; }

# Debian's chromium: the headless browser that drives the timeline page of `vault api` in the tests.
chromium-deps: ## Chromium (Debian's package, headless), installed when missing
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium package (the headless browser for the page test)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

rules: prometheus-deps ## Check the Prometheus and Alertmanager configs and the alert rules, and run their unit tests
	promtool check config deploy/prometheus/prometheus.yml
	promtool test rules deploy/prometheus/alerts.test.yml
	amtool check-config deploy/alertmanager/alertmanager.yml

# kubernetes-validate ships the Kubernetes JSON schemas, so the check needs no network or cluster.
# The KEDA and Prometheus Operator objects (CRDs) have no schema there: tests/it/deploy.rs checks
# them structurally.
K8S_VERSIONS := 1.29.0 1.37.0
k8s-deps: ## kubernetes-validate (PyPI; the Kubernetes schemas, offline), installed when missing
	@python3 -c 'import kubernetes_validate' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'

# Without kubectl (whose kustomize renders deploy/k8s) the files are validated as they are.
k8s: k8s-deps ## Render deploy/k8s (kubectl kustomize) and validate it, strictly, against the Kubernetes schemas
	@f=$$(mktemp --suffix=.yaml); \
	  if command -v kubectl >/dev/null; then kubectl kustomize deploy/k8s > "$$f"; \
	  else echo "make k8s: no kubectl; validating deploy/k8s's files unrendered"; \
	    for m in deploy/k8s/*.yaml; do [ "$$m" = deploy/k8s/kustomization.yaml ] || { echo "---"; cat "$$m"; }; done > "$$f"; fi && \
	  python3 -m kubernetes_validate --strict --quiet --no-warn $(addprefix -k ,$(K8S_VERSIONS)) "$$f"; \
	  rc=$$?; rm -f "$$f"; [ $$rc -eq 0 ] && echo "deploy/k8s: valid for Kubernetes $(K8S_VERSIONS) (strict)"; exit $$rc

# Debian's docker-compose (1.29, Python) validates a file against the Compose specification
# without a Docker engine; `docker compose` (v2) is what `make up` runs.
compose-deps: ## docker-compose (Debian's package, for the offline check), installed when missing
	@command -v docker-compose >/dev/null || { \
	  echo "installing Debian's docker-compose package (the Compose file check)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; }

compose: compose-deps ## Validate docker-compose.yml against the Compose specification (offline)
	docker-compose -f docker-compose.yml config -q && echo "docker-compose.yml: valid"

lint: build-deps ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --workspace --all-targets $(TEST_FEATURES) -- -D warnings

fuzz: ## Property tests of event decoding with many cases (PROPTEST_CASES, default 200000)
	PROPTEST_CASES=$${PROPTEST_CASES:-200000} $(CARGO) test --release --lib event::properties

faults: ## The fault suite with more kill -9 iterations (VAULT_FAULT_ITERATIONS, default 50)
	VAULT_FAULT_ITERATIONS=$${VAULT_FAULT_ITERATIONS:-50} $(CARGO) test $(TEST_FEATURES) --test it faults -- --nocapture

chaos: build-deps ## A long seeded chaos run with a read-back audit (VAULT_CHAOS_STEPS, default 60; VAULT_CHAOS_SEED, default random)
	VAULT_CHAOS_STEPS=$${VAULT_CHAOS_STEPS:-60} VAULT_CHAOS_SEED=$${VAULT_CHAOS_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')} \
	  $(CARGO) test $(TEST_FEATURES) --test it chaos -- --nocapture

fmt: ## Format the code
	$(CARGO) fmt --all

demo: build-deps ## The whole pipeline on this machine: sandbox, two vault processes, 100K events, verify, report
	bash scripts/demo.sh

bench: build-deps ## Benchmarks: vault vs a raw rdkafka consumer and direct CQL inserts (BENCH_SCALE=0.1 for a quick run); with tansu installed (`make tansu`), also against a slow-answering broker
	$(CARGO) bench --bench throughput

# tansu: a Kafka-compatible broker that answers each fetch after fetch.wait.max.ms, like a remote
# or loaded one; the bench's slow-answering-broker run uses it when it is on PATH. About 12
# minutes to build on 2 cores, so neither CI nor `make test` needs it.
tansu: ## Install tansu (cargo install, when missing), the bench's slow-answering broker
	@command -v tansu >/dev/null || $(CARGO) install tansu --locked --features dynostore

# --wait: returns once every service is healthy (vault: ready and alive) or has completed, and
# fails if one does not get there.
up: ## docker compose: Kafka, ScyllaDB, 3 vault replicas, Prometheus, Alertmanager, Grafana (needs a Docker engine); waits until healthy
	VAULT_GIT_COMMIT=$$(git rev-parse HEAD 2>/dev/null || echo unknown) docker compose up -d --build --wait --wait-timeout 600
	@echo "Grafana http://127.0.0.1:3000  Prometheus http://127.0.0.1:9090  Alertmanager http://127.0.0.1:9093  load: docker compose --profile load up producer"

down: ## Stop the docker compose stack and remove its volumes
	docker compose --profile load down -v
