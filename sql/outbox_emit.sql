-- The table-less outbox, for `outbox-cdc run --message-prefix outbox`.
--
-- outbox_emit(…) writes an event into the WAL inside the caller's transaction, with no row: no
-- table to vacuum, no clean-up job. The event exists only if the transaction commits; outbox-cdc
-- publishes it in its place in commit order, mapped like a row whose columns are the object's
-- members (aggregate_type, aggregate_id, event_type, payload, headers, id).
--
--   BEGIN;
--     UPDATE orders SET status = 'paid' WHERE id = 42;
--     SELECT outbox_emit('order', '42', 'paid', '{"order_id": 42}');
--   COMMIT;
--
-- The event id: `<commit LSN>:<index>` by default; run with --id-column id to use the `id`
-- member (a random UUID unless given).

CREATE OR REPLACE FUNCTION outbox_emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT NULL,
    id             uuid  DEFAULT gen_random_uuid(),
    prefix         text  DEFAULT 'outbox'
) RETURNS pg_lsn
LANGUAGE sql VOLATILE
AS $$
    SELECT pg_logical_emit_message(true, prefix, jsonb_build_object(
        'id', id,
        'aggregate_type', aggregate_type,
        'aggregate_id', aggregate_id,
        'event_type', event_type,
        'payload', payload,
        'headers', headers)::text)
$$;

-- outbox_annotate(…) attaches headers to every event its transaction publishes after it, rows
-- and messages alike, for `outbox-cdc run --annotation-prefix outbox-annotations`: W3C trace
-- context without a column. Call it first in the transaction.
--
--   BEGIN;
--     SELECT outbox_annotate('{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
--     INSERT INTO outbox (…) VALUES (…);
--   COMMIT;
--
-- A member whose name JetStream or outbox-cdc gives meaning to (`Nats-…`, `Outbox-…`) makes the
-- annotation a poison row (`--on-error`).

CREATE OR REPLACE FUNCTION outbox_annotate(
    headers jsonb,
    prefix  text DEFAULT 'outbox-annotations'
) RETURNS pg_lsn
LANGUAGE sql VOLATILE
AS $$
    SELECT pg_logical_emit_message(true, prefix, headers::text)
$$;
