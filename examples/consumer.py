#!/usr/bin/env python3
"""A consumer of an outbox-cdc stream that handles every event exactly once.

JetStream delivers at least once, and outbox-cdc can re-send an event (see docs/messages.md).
So the consumer keeps, in its own database, the `Nats-Msg-Id` of every event it handled, and
records that id in the same transaction as the event's effect; it acks only after that
transaction committed. A redelivery or a second copy of an event then finds its id and is acked
without doing anything. It also checks the order: within the stream, events carry increasing
(`Outbox-Commit-Lsn`, `Outbox-Row-Index`) positions (backfilled events have none, and a row
`backfill` dead-lettered has `0/0`).

Two ways to read the stream:
  --durable NAME  a durable pull consumer on the server, explicit acks (resumes where it acked)
  --ordered       an ordered consumer, no acks: it resumes after the last stream sequence its
                  own database recorded, in the same transaction as the effects

Each event handled or skipped is printed as a JSON line, then a summary; with --follow it keeps
waiting for new events, else it returns once it has read everything the stream holds.

    python3 -m venv .venv && .venv/bin/pip install -r examples/requirements.txt
    .venv/bin/python examples/consumer.py --stream OUTBOX --durable billing --store billing.db

The "effect" here is a row in the `events` table of the SQLite store; a real handler writes its
business change in that same transaction.
"""

import argparse
import asyncio
import json
import sqlite3
import sys

import nats
from nats.js import api
from nats.errors import TimeoutError as NatsTimeout


def lsn_number(text):
    """`X/Y` as a number, so that positions compare."""
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class Store:
    """The consumer's own database: the effects, the ids handled, the last position."""

    def __init__(self, path):
        self.db = sqlite3.connect(path)
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS handled (msg_id TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS events (
                msg_id TEXT, subject TEXT, stream_seq INTEGER, payload BLOB);
            CREATE TABLE IF NOT EXISTS position (
                one INTEGER PRIMARY KEY CHECK (one = 1), stream_seq INTEGER,
                commit_lsn INTEGER, row_index INTEGER);
            INSERT OR IGNORE INTO position VALUES (1, 0, NULL, NULL);
            """
        )
        self.db.commit()

    def last_stream_seq(self):
        return self.db.execute("SELECT stream_seq FROM position").fetchone()[0]

    def handle(self, msg):
        """Applies `msg` once: returns (what happened, its position was in order)."""
        headers = msg.headers or {}
        msg_id = headers.get("Nats-Msg-Id")
        seq = msg.metadata.sequence.stream
        lsn = headers.get("Outbox-Commit-Lsn")
        index = headers.get("Outbox-Row-Index")
        with self.db:  # one transaction: the effect, the id, the position
            self.db.execute("UPDATE position SET stream_seq = ?", (seq,))
            if msg_id is None:
                return "no_id", True
            if self.db.execute("SELECT 1 FROM handled WHERE msg_id = ?", (msg_id,)).fetchone():
                return "duplicate", True
            in_order = True
            if lsn is not None and index is not None and lsn != "0/0":  # 0/0: backfilled
                here = (lsn_number(lsn), int(index))
                last = self.db.execute("SELECT commit_lsn, row_index FROM position").fetchone()
                in_order = last[0] is None or here > tuple(last)
                if in_order:
                    self.db.execute("UPDATE position SET commit_lsn = ?, row_index = ?", here)
            self.db.execute("INSERT INTO handled VALUES (?)", (msg_id,))
            self.db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?)", (msg_id, msg.subject, seq, msg.data)
            )
            return "handled", in_order


def report(msg, action, in_order):
    headers = msg.headers or {}
    print(
        json.dumps(
            {
                "action": action,
                "id": headers.get("Nats-Msg-Id"),
                "stream_seq": msg.metadata.sequence.stream,
                "subject": msg.subject,
                "commit_lsn": headers.get("Outbox-Commit-Lsn"),
                "row_index": headers.get("Outbox-Row-Index"),
                "backfill": headers.get("Outbox-Backfill") == "true",
                "error_kind": headers.get("Outbox-Error-Kind"),
                "in_order": in_order,
            }
        ),
        flush=True,
    )


async def durable(js, args, store, counts):
    """A durable pull consumer: the server remembers what was acked."""
    sub = await js.pull_subscribe(
        args.subject,
        durable=args.durable,
        stream=args.stream,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=30),
    )
    while True:
        try:
            msgs = await sub.fetch(batch=100, timeout=1)
        except (NatsTimeout, asyncio.TimeoutError):
            info = await sub.consumer_info()
            if not args.follow and info.num_pending == 0 and info.num_ack_pending == 0:
                return
            continue
        for msg in msgs:
            action, in_order = store.handle(msg)
            count(counts, action, in_order)
            report(msg, action, in_order)
            await msg.ack()  # after the transaction committed


async def ordered(js, args, store, counts):
    """An ordered consumer: the consumer's own database says where to resume."""
    start = store.last_stream_seq() + 1
    info = await js.stream_info(args.stream)
    if not args.follow and info.state.last_seq < start:
        return
    done = asyncio.Event()

    async def on_message(msg):
        action, in_order = store.handle(msg)
        count(counts, action, in_order)
        report(msg, action, in_order)
        if not args.follow and msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        args.subject,
        stream=args.stream,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        config=api.ConsumerConfig(opt_start_seq=start),
        cb=on_message,
    )
    await done.wait()
    await sub.unsubscribe()


def count(counts, action, in_order):
    counts[action] = counts.get(action, 0) + 1
    if not in_order:
        counts["out_of_order"] = counts.get("out_of_order", 0) + 1


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222",
                        help="comma-separated servers")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--subject", default=">", help="filter subject of the consumer")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--durable", help="durable pull consumer of this name")
    mode.add_argument("--ordered", action="store_true", help="ordered consumer, no acks")
    parser.add_argument("--store", required=True, help="the SQLite file of handled ids")
    parser.add_argument("--follow", action="store_true", help="keep waiting for events")
    args = parser.parse_args()

    store = Store(args.store)
    nc = await nats.connect(servers=args.nats_url.split(","))
    js = nc.jetstream()
    counts = {}
    try:
        await (ordered if args.ordered else durable)(js, args, store, counts)
    finally:
        await nc.close()
    print(json.dumps({"summary": counts}), flush=True)
    return 1 if counts.get("out_of_order") else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
