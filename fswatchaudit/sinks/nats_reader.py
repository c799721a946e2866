"""Reading a fleet's records back from NATS JetStream (what ``NatsSink`` published),
for ``search --nats URL [--host H]``.

``iter_stream`` yields every record of the messages of the stream that match the
filter, oldest first, as a ``StreamRecord`` (host, key, the record's own message id,
stream sequence and the record's map, the one serialised form with its ``"t"`` tag,
names as surrogateescape strings as ``LogReader`` gives them); ``iter_records`` yields
only the maps.  A message holds one or more records (their maps one after the other,
see ``nats``); the record ``i`` places after a message's first has the id
``<host>:<boot id>:<start>:<n + i>``.  It reads what the
stream holds when it starts (a snapshot: messages stored later are not waited for),
through an ephemeral pull consumer that needs no acknowledgements and is deleted at
the end.  A record id seen twice (a duplicate stored after the stream's duplicate
window had passed) is given once.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from .encode import as_text
from .nats import (
    DEFAULT_PREFIX,
    DEFAULT_STREAM,
    NO_KEY,
    finish_loop,
    subject_token,
    token_text,
)


@dataclass(slots=True)
class StreamRecord:
    host: str | None          # from the subject
    key: str | None           # the subject's key token (None: no key)
    msg_id: str | None        # the record's id: host:boot_id:start:n
    seq: int                  # the stream sequence
    record: dict[str, Any]


def filter_subject(prefix: str = DEFAULT_PREFIX, host: str | None = None,
                   key: str | None = None, no_key: bool = False) -> str:
    """The subject filter for a host and/or a key (None: any; ``no_key``: only the
    records without a key, as the audit's own markers)."""
    key_tok = NO_KEY if no_key else "*" if key is None else subject_token(key)
    return f"{prefix}.{'*' if host is None else subject_token(host)}.{key_tok}"


def message_records(msg: Any) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """The records of one message: (the record's id, its map), in order."""
    msg_id = (msg.headers or {}).get("Nats-Msg-Id")
    base, first = None, 0
    if msg_id is not None:
        base, _, number = msg_id.rpartition(":")
        try:
            first = int(number)
        except ValueError:
            base = None
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(msg.data)
    for i, data in enumerate(unpacker):
        rid = msg_id if i == 0 or msg_id is None else \
            f"{base}:{first + i}" if base is not None else f"{msg_id}+{i}"
        yield rid, as_text(data)


def iter_stream(servers: str | list[str], host: str | None = None, *,
                key: str | None = None, stream: str = DEFAULT_STREAM,
                prefix: str = DEFAULT_PREFIX, no_key: bool = False, batch: int = 512,
                timeout: float = 10.0) -> Iterator[StreamRecord]:
    """Every record of ``stream`` (of ``host``, with ``key``, when given), in stream
    order.  Raises the nats-py error when the servers cannot be reached or the stream
    does not exist."""
    import nats
    import nats.errors
    from nats.js import api

    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    urls = [servers] if isinstance(servers, str) else list(servers)
    async def quiet(exc: Exception) -> None:
        """The error is raised to the caller: no traceback printed by the client."""

    nc = run(nats.connect(servers=urls, allow_reconnect=False, connect_timeout=timeout,
                          max_reconnect_attempts=1, reconnect_time_wait=0.05,
                          error_cb=quiet))
    try:
        js = nc.jetstream(timeout=timeout)
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL,
                                    ack_policy=api.AckPolicy.NONE,
                                    inactive_threshold=300.0)
        subject = filter_subject(prefix, host, key, no_key)
        end = time.monotonic() + 3 * timeout
        while True:
            # a cluster that just lost a node may take a few seconds to answer
            try:
                sub = run(js.pull_subscribe(subject, stream=stream, config=config))
                info = run(sub.consumer_info())
                break
            except nats.errors.TimeoutError:
                if time.monotonic() > end:
                    raise
        remaining = info.num_pending or 0
        seen: set[str] = set()
        plen = len(prefix) + 1
        while remaining > 0:
            msgs = run(sub.fetch(min(batch, remaining), timeout=timeout))
            for msg in msgs:
                remaining -= 1
                meta = msg.metadata
                host_tok, _, key_tok = msg.subject[plen:].partition(".")
                host_text, key_text = token_text(host_tok), token_text(key_tok)
                for msg_id, data in message_records(msg):
                    if msg_id is not None:
                        if msg_id in seen:
                            continue
                        seen.add(msg_id)
                    yield StreamRecord(host_text, key_text, msg_id, meta.sequence.stream,
                                       data)
                if meta.num_pending == 0:
                    remaining = 0
        try:
            run(sub.unsubscribe())
            run(js.delete_consumer(stream, info.name))
        except Exception:
            pass            # the consumer expires by itself (inactive_threshold)
    finally:
        try:
            run(nc.close())
        finally:
            finish_loop(loop)


def iter_records(servers: str | list[str], host: str | None = None,
                 **options: Any) -> Iterator[dict[str, Any]]:
    """The records' maps only (see ``iter_stream`` for the options)."""
    for item in iter_stream(servers, host, **options):
        yield item.record
