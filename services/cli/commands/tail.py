"""``bastion tail STREAM [-n N] [--follow]``: a stream's messages, decoded, one JSON line each.

STREAM is a short name (``bars``, ``intents``, ``orders``, ``order-events``, ``alerts``,
``rejections``, ``dead-letter``, ``bars:3``) or a full key. Read-only: it joins no consumer
group, so watching never takes a message from a service.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from services.cli._context import Context
from shared.bus import codec
from shared.errors import CodecError

__all__ = ["entry", "register", "render"]


def register(subparsers: Any) -> None:
    """Add the ``tail`` subcommand."""
    parser = subparsers.add_parser("tail", help="print a stream's newest messages, decoded")
    parser.add_argument("stream", help="bars, intents, orders, order-events, alerts, rejections, dead-letter")
    parser.add_argument("-n", type=int, default=10, help="how many of the newest messages (default 10)")
    parser.add_argument("--follow", action="store_true", help="keep printing new messages until Ctrl-C")
    parser.set_defaults(func=run)


def entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One entry, JSON-ready: the decoded message, or the raw fields if it is not a message."""
    ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    try:
        message = codec.decode(fields)
        return {"entry_id": ident, "type": message.TYPE, **message.model_dump(mode="json")}
    except CodecError:
        raw = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
        return {"entry_id": ident, **raw}


def render(entry_id: bytes | str, fields: dict[bytes, bytes]) -> str:
    """One entry as a JSON line (:func:`entry`)."""
    return json.dumps(entry(entry_id, fields))


def run(args: argparse.Namespace) -> int:
    ctx = Context.load()
    key = args.stream if args.stream.startswith(f"{ctx.keys.prefix}:") else ctx.keys.stream(args.stream)
    if not ctx.redis.exists(key):
        print(f"bastion: no stream {key!r}")
        return 1
    entries: Any = ctx.redis.xrevrange(key, count=max(args.n, 0)) if args.n > 0 else []
    last = "$"
    for entry_id, fields in reversed(entries):
        print(render(entry_id, fields), flush=True)
        last = entry_id
    if not args.follow:
        return 0
    try:
        while True:
            reply: Any = ctx.redis.xread({key: last}, block=1000, count=100)
            for _, batch in reply or []:
                for entry_id, fields in batch:
                    print(render(entry_id, fields), flush=True)
                    last = entry_id
    except KeyboardInterrupt:
        return 0
