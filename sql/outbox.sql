-- The recommended outbox table and its publication for outbox-cdc.
--
-- Services insert one row per event in the same transaction as their business change.
-- outbox-cdc reads the inserts from the WAL (logical replication, pgoutput) and publishes them
-- to NATS JetStream in commit order. It never reads or updates the table itself.

CREATE TABLE IF NOT EXISTS outbox (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),  -- becomes Nats-Msg-Id
    aggregate_type text        NOT NULL,                               -- fills {aggregate_type}
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,                               -- fills {event_type}
    payload        jsonb       NOT NULL,                               -- the message body
    headers        jsonb,                                              -- extra NATS headers (a JSON object)
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Only inserts matter: publishing updates and deletes would only add WAL for outbox-cdc to skip.
CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert');

-- Keeping the table small (pick one):
--
-- 1. Delete in the same transaction, right after the insert. The WAL still carries the insert,
--    so the event is published, and the table stays empty:
--
--      BEGIN;
--        UPDATE orders SET status = 'paid' WHERE id = 42;
--        INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload)
--          VALUES ('0b9f6a52-3f4c-4c39-9a53-7c1b2f0e8d11', 'order', '42', 'paid', '{"id":42}');
--        DELETE FROM outbox WHERE id = '0b9f6a52-3f4c-4c39-9a53-7c1b2f0e8d11';
--      COMMIT;
--
--    (Two statements: a DELETE in a WITH clause of the INSERT would not see the new row.)
--
-- 2. A periodic delete job, keeping recent rows for inspection or re-publishing:
--
--      DELETE FROM outbox WHERE created_at < now() - interval '7 days';
