# outbox-cdc developer commands. `make test` is what CI runs (through .ci/run).
.PHONY: deps build demo test lint bench-smoke bench clean

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
