"""Decodes NATS messages as CloudEvents with the official CloudEvents SDK for Python.

Reads a JSON list of messages ({"headers": {name: value}, "body_hex": "..."}) on stdin —
as a Rust test read them from a JetStream stream — and prints, per message, the event the SDK
decodes (binary or structured mode, as the SDK detects it from the headers), as JSON lines.
The NATS binding and the HTTP binding lay headers out alike (`ce-*`, `content-type`), so the
SDK's HTTP decoder is the NATS one. Exit 1 when the SDK refuses a message.
"""

import base64
import json
import sys

from cloudevents.http import from_http


def main() -> int:
    messages = json.load(sys.stdin)
    for message in messages:
        body = bytes.fromhex(message["body_hex"])
        event = from_http(message["headers"], body)
        data = event.get_data()
        if isinstance(data, (bytes, bytearray)):
            data = {"bytes_base64": base64.b64encode(data).decode()}
        print(
            json.dumps(
                {
                    "specversion": event["specversion"],
                    "id": event["id"],
                    "source": event["source"],
                    "type": event["type"],
                    "time": event.get("time"),
                    "subject": event.get("subject"),
                    "datacontenttype": event.get("datacontenttype"),
                    "data": data,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
