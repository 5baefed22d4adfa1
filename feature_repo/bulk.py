"""Bulk loading of feature rows into Redis in Feast's layout, at hundreds of thousands of rows a second.

``feast materialize`` builds a protobuf message per value and a redis-py command per row (about 6k rows/s
here). This loader encodes whole columns at once (doubles with numpy; integers through a table of small
varints) into the Redis protocol (RESP) and streams the commands over a plain socket, in ``processes``
processes at once. Redis holds exactly what Feast's writer would have written (the tests read it back
with ``get_online_features``), and every key expires after ``KEY_TTL_S``, as the other writers set it. Last
write wins: load a view's rows in time order (gold is loaded per day, newest last), since unlike Feast's
writer this one does not compare with the stored ``_ts``.
"""

from __future__ import annotations

import socket
import struct
from datetime import UTC
from itertools import repeat

import numpy as np
import pandas as pd

from feature_repo.online import KEY_TTL_S, field_key
from infra.settings import Settings
from schemas.features import FeatureRow

DOUBLE_TAG, INT64_TAG = 0x29, 0x20  # protobuf tags of Value.double_val (5, fixed64) and Value.int64_val (4)
_SMALL = [bytes([INT64_TAG]) + (bytes([v]) if v < 128 else bytes([(v & 0x7F) | 0x80, v >> 7]))
          for v in range(16384)]


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _int64_value(v: int) -> bytes:
    if 0 <= v < 16384:
        return _SMALL[v]
    u, out = v & 0xFFFFFFFFFFFFFFFF, bytearray([INT64_TAG])  # negative: ten bytes, as protobuf does
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def encode_column(values: pd.Series, kind: type) -> list[bytes]:
    """Each value as a RESP bulk string holding its serialized protobuf ``Value``."""
    if kind is float:
        packed = np.empty(len(values), dtype=[("tag", "u1"), ("v", "<f8")])
        packed["tag"], packed["v"] = DOUBLE_TAG, values.to_numpy(dtype=np.float64)
        raw = packed.tobytes()
        return [b"$9\r\n" + raw[i:i + 9] + b"\r\n" for i in range(0, len(raw), 9)]
    if kind is int:
        return [_bulk(_int64_value(v)) for v in values.to_numpy(dtype=np.int64).tolist()]
    from feature_repo.online import to_value

    return [_bulk(to_value(list(v)).SerializeToString()) for v in values]


def encode_rows(table: type[FeatureRow], frame: pd.DataFrame, project: str) -> list[bytes]:
    """Per row, ``HSET <entity key> <field> <value> ... _ts:<view> <timestamp>`` then ``EXPIRE <entity key>
    <KEY_TTL_S>`` (the key TTL every writer of this store sets), RESP encoded: two replies per element."""
    from google.protobuf.timestamp_pb2 import Timestamp

    names = table.feature_names()
    header = b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * (len(names) + 1))
    fields = [_bulk(field_key(table.VIEW, n)) for n in names]
    columns = [encode_column(frame[n], table.model_fields[n].annotation) for n in names]
    keys = sorted(table.ENTITIES)
    head = struct.pack("<I", len(keys)) + b"".join(struct.pack("<II", 2, len(k)) + k.encode() for k in keys)
    ids = [frame[k].to_numpy(dtype=np.int64).tolist() for k in keys]
    tail = project.encode()
    entity = [_bulk(head + b"".join(struct.pack("<IIq", 4, 8, v) for v in vals) + tail)
              for vals in zip(*ids, strict=True)]
    ts_field = _bulk(f"_ts:{table.VIEW}".encode())
    stamps = pd.to_datetime(frame["event_timestamp"], utc=True)
    cache: dict = {}

    def stamp(t) -> bytes:
        if t not in cache:
            ts = Timestamp()
            ts.FromDatetime(t.tz_convert(UTC).tz_localize(None).to_pydatetime())
            cache[t] = _bulk(ts.SerializeToString())
        return cache[t]

    stamp_col = [stamp(t) for t in stamps] if stamps.nunique() > 1 else repeat(stamp(stamps.iat[0]), len(frame))
    interleaved = [c for f, col in zip(fields, columns, strict=True) for c in (repeat(f, len(frame)), col)]
    # Each command is its columns' pieces side by side: zip + join run in C, row after row.
    expire = [b"*3\r\n$6\r\nEXPIRE\r\n" + e + ttl for e, ttl in zip(entity, repeat(_bulk(b"%d" % KEY_TTL_S)),
                                                                      strict=False)]
    return list(map(b"".join, zip(repeat(header, len(frame)), entity, *interleaved, repeat(ts_field, len(frame)),
                                  stamp_col, expire, strict=False)))


def send(settings: Settings, commands, chunk: int = 4096, replies_each: int = 2) -> int:
    """Stream RESP commands (a list, or an iterable of lists: the next batch is encoded while Redis
    executes the last) over one connection, reading every reply (``replies_each`` per element: an
    ``encode_rows`` element is two commands); raise on the first error reply. Returns the elements sent."""
    batches = [commands[i:i + chunk] for i in range(0, len(commands), chunk)] if isinstance(commands, list) \
        else commands
    r = settings.redis
    sent = 0
    with _connect(r) as sock:
        if r.password:  # as the ACL user when there is one (redis-py does the same)
            auth = [b"AUTH", *([r.username.encode()] if r.username else []), r.password.encode()]
            sock.sendall(b"*%d\r\n" % len(auth) + b"".join(map(_bulk, auth)))
            if not sock.recv(64).startswith(b"+OK"):
                raise ConnectionError("Redis refused the credentials")
        pending, buf, window = 0, b"", 0
        for batch in batches:
            sock.sendall(b"".join(batch))
            replies = replies_each * len(batch)
            pending, sent, window = pending + replies, sent + len(batch), max(window, replies)
            while pending > window:  # at most about two batches in flight
                buf, pending = _read_replies(sock, buf, pending)
        while pending:
            buf, pending = _read_replies(sock, buf, pending)
    return sent


def _connect(r) -> socket.socket:
    """A connection to the configured Redis (TLS with its CA and host check when ``r.tls``), with timeouts: a
    hung Redis fails the load instead of stopping it for good."""
    sock = socket.create_connection((r.host, r.port), timeout=r.socket_connect_timeout_s)
    if (context := r.ssl_context()) is not None:
        try:
            sock = context.wrap_socket(sock, server_hostname=r.host)
        except OSError:
            sock.close()
            raise
    sock.settimeout(r.socket_timeout_s)
    return sock


def _read_replies(sock: socket.socket, buf: bytes, pending: int) -> tuple[bytes, int]:
    data = sock.recv(1 << 20)
    if not data:
        raise ConnectionError("Redis closed the connection")
    buf += data
    lines = buf.split(b"\r\n")
    buf = lines.pop()
    for line in lines:
        if line.startswith(b"-"):
            raise RuntimeError(f"Redis error: {line.decode(errors='replace')}")
    return buf, pending - len(lines)


def load(settings: Settings, table: type[FeatureRow], frame: pd.DataFrame, chunk_rows: int = 20_000) -> int:
    """Encode and send ``frame`` a chunk at a time on one connection (encoding overlaps Redis's work)."""
    project = settings.feast_project
    return send(settings, (encode_rows(table, frame.iloc[i:i + chunk_rows], project)
                           for i in range(0, len(frame), chunk_rows)))


def _load_part(args: tuple) -> int:
    return load(*args)


def bulk_write(settings: Settings, table: type[FeatureRow], frame: pd.DataFrame, processes: int = 2) -> int:
    """Load ``frame``'s rows of ``table`` into the online store; return the rows written."""
    if processes <= 1 or len(frame) < 50_000:
        return load(settings, table, frame)
    import multiprocessing as mp

    parts = np.array_split(np.arange(len(frame)), processes)
    with mp.get_context("fork").Pool(processes) as pool:
        return sum(pool.map(_load_part, [(settings, table, frame.iloc[p]) for p in parts]))


def newer_than_stored(settings: Settings, table: type[FeatureRow], frame: pd.DataFrame,
                      chunk: int = 10_000) -> pd.DataFrame:
    """``frame``'s rows whose ``event_timestamp`` is after what the store holds for their entity in ``table``'s
    view (Feast's writer rule: an older or same-instant row is skipped), so a backfill never overwrites newer
    values. One pipelined HMGET of ``_ts:<view>`` per ``chunk`` rows."""
    from feature_repo.online import entity_key, stamp_ms

    if frame.empty:
        return frame
    client, project, ts_field = settings.redis.client(), settings.feast_project, f"_ts:{table.VIEW}"
    ids = [frame[k].to_numpy(dtype=np.int64).tolist() for k in table.ENTITIES]
    stored: list[int] = []
    for start in range(0, len(frame), chunk):
        pipe = client.pipeline(transaction=False)
        for vals in zip(*(col[start:start + chunk] for col in ids), strict=True):
            pipe.hget(entity_key(dict(zip(table.ENTITIES, vals, strict=True)), project), ts_field)
        stored += [stamp_ms(raw) for raw in pipe.execute()]
    new_ms = pd.to_datetime(frame["event_timestamp"], utc=True).astype("int64").to_numpy() // 1_000_000
    return frame[new_ms > np.asarray(stored, dtype=np.int64)]
