#!/usr/bin/env bash
# Installs what outbox-cdc's tests, demo and CI need and a fresh machine may lack:
# PostgreSQL server binaries (initdb, pg_ctl, pg_recvlogical), nats-server, promtool, valgrind,
# and the rustfmt/clippy/nextest tools. Idempotent: installs only what is missing.
set -euo pipefail

have_pg_bin() {
  command -v "$1" >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/$1" >/dev/null
}

apt_packages=()
if ! have_pg_bin initdb || ! have_pg_bin pg_ctl || ! have_pg_bin pg_recvlogical; then
  apt_packages+=(postgresql)
fi
command -v psql >/dev/null 2>&1 || apt_packages+=(postgresql-client)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || apt_packages+=(nats-server)
# promtool checks and unit-tests the alert rules in deploy/prometheus (make lint).
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
# valgrind counts the hot path's instructions (scripts/hot-path-instructions.sh, make bench-smoke).
command -v valgrind >/dev/null 2>&1 || apt_packages+=(valgrind)

if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "installing ${apt_packages[*]} from Debian's packages" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # The package's own cluster is not needed: tests start throwaway servers.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}"
fi

if command -v rustup >/dev/null 2>&1; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
