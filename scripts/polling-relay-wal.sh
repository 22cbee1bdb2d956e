#!/usr/bin/env bash
# The WAL a polling relay adds to an outbox, beside outbox-cdc, which adds none (it only reads the
# WAL; docs/benchmarks.md). On a throwaway PostgreSQL (Debian's binaries, or OUTBOX_CDC_PG_BIN):
#
#   A  N rows inserted into the recommended table (sql/outbox.sql), in transactions of 100:
#      what outbox-cdc needs;
#   B  the same rows inserted into the table a relay needs (a `published_at` column and a partial
#      index of unsent rows to poll), then marked sent as a relay does: one UPDATE per poll of
#      100 rows (`FOR UPDATE SKIP LOCKED`), or one UPDATE and commit per row.
#
# WAL bytes are `pg_current_wal_lsn()` deltas around each step, after a CHECKPOINT, with
# autovacuum off: the vacuum the updates' dead rows need later writes more, not counted here.
#
#   bash scripts/polling-relay-wal.sh [N]      (N = 100000 by default)
set -euo pipefail

rows=${1:-100000}
bin=${OUTBOX_CDC_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$bin/initdb" ] || { echo "no PostgreSQL binaries (set OUTBOX_CDC_PG_BIN)" >&2; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
  # initdb and postgres refuse to run as root.
  chown postgres "$dir"
  as_pg=(runuser -u postgres --)
fi
cleanup() {
  "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
# The postgres user may not be able to enter the checkout (a private clone directory): work
# from the directory it owns, or every psql warns "could not change directory".
cd "$dir"

"${as_pg[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
"${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -o \
  "-c listen_addresses='' -c unix_socket_directories=$dir -c wal_level=logical \
   -c autovacuum=off -c checkpoint_timeout=1h -c max_wal_size=10GB" start >/dev/null
sql() { "${as_pg[@]}" "$bin/psql" -h "$dir" -U postgres -X -q -At -v ON_ERROR_STOP=1 "$@"; }

# Statements are piped in: the postgres user may not be able to read the checkout.
sql < "$root/sql/outbox.sql"
sql <<'SQL'
-- The table a relay polls, twice: one per way of marking rows sent.
CREATE TABLE relay_poll (LIKE outbox INCLUDING ALL);
ALTER TABLE relay_poll ADD COLUMN published_at timestamptz;
CREATE INDEX relay_poll_unsent ON relay_poll (created_at) WHERE published_at IS NULL;
CREATE TABLE relay_row (LIKE relay_poll INCLUDING ALL);

CREATE PROCEDURE insert_rows(tbl regclass, total int) LANGUAGE plpgsql AS $$
BEGIN
  FOR lo IN 1..total BY 100 LOOP
    EXECUTE format(
      'INSERT INTO %s (aggregate_type, aggregate_id, event_type, payload, headers)
       SELECT ''order'', g::text, ''paid'', jsonb_build_object(''order_id'', g, ''amount'', 1999),
              jsonb_build_object(''trace-id'', md5(g::text))
         FROM generate_series($1, $2) g', tbl)
      USING lo, least(lo + 99, total);
    COMMIT;
  END LOOP;
END $$;

-- A relay's poll: lock up to 100 unsent rows, (publish them,) mark them sent, commit.
CREATE PROCEDURE mark_per_poll() LANGUAGE plpgsql AS $$
BEGIN
  LOOP
    WITH batch AS (
      SELECT id FROM relay_poll WHERE published_at IS NULL
       ORDER BY created_at LIMIT 100 FOR UPDATE SKIP LOCKED)
    UPDATE relay_poll o SET published_at = now() FROM batch WHERE o.id = batch.id;
    EXIT WHEN NOT FOUND;
    COMMIT;
  END LOOP;
END $$;

-- A relay that marks each row as it is acked: one UPDATE and commit per row.
CREATE PROCEDURE mark_per_row() LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT id FROM relay_row WHERE published_at IS NULL ORDER BY created_at LOOP
    UPDATE relay_row SET published_at = now() WHERE id = r.id;
    COMMIT;
  END LOOP;
END $$;
SQL

# WAL bytes written by one statement, after a checkpoint.
wal_of() {
  sql -c "CHECKPOINT" >/dev/null
  local before after
  before=$(sql -c "SELECT pg_current_wal_lsn()")
  sql -c "$1" >/dev/null
  after=$(sql -c "SELECT pg_current_wal_lsn()")
  sql -c "SELECT pg_wal_lsn_diff('$after', '$before')::bigint"
}

per() { awk -v b="$1" -v n="$rows" 'BEGIN { printf "%.0f", b / n }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

plain=$(wal_of "CALL insert_rows('outbox', $rows)")
relay_insert=$(wal_of "CALL insert_rows('relay_poll', $rows)")
poll=$(wal_of "CALL mark_per_poll()")
relay_insert_2=$(wal_of "CALL insert_rows('relay_row', $rows)")
each=$(wal_of "CALL mark_per_row()")

echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}'), $rows rows in transactions of 100, $(date -u +%F)"
echo "| | WAL bytes per event | × outbox-cdc |"
echo "|---|---|---|"
echo "| outbox-cdc: the inserts, nothing else | $(per "$plain") | 1.00 |"
echo "| polling relay: the inserts (with published_at and a partial index of unsent rows) | $(per "$relay_insert") | $(ratio "$relay_insert" "$plain") |"
echo "| polling relay: inserts + one UPDATE per poll of 100 rows | $(per $((relay_insert + poll))) | $(ratio $((relay_insert + poll)) "$plain") |"
echo "| polling relay: inserts + one UPDATE and commit per row | $(per $((relay_insert_2 + each))) | $(ratio $((relay_insert_2 + each)) "$plain") |"
