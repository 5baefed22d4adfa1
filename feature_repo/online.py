"""The online store's layout, owned here: a fast writer and the scorer's read path, both in Feast's format.

Feast keeps one Redis hash per entity key: the key is the serialized entity key followed by the project
name, each feature is a field named by the 4-byte murmur3 hash of ``<view>:<feature>`` holding a protobuf
``Value``, and ``_ts:<view>`` holds the view's event time. :class:`OnlineWriter` writes exactly that (tests
read it back with ``get_online_features``), so real-time rows are visible to any Feast client.

:class:`OnlineReader` serves one ranking request (one user, hundreds of candidate ads) in a few ms:

- per-ad and per-advertiser features are held in memory (decoded once into a table) and re-read from
  Redis every ``refresh_s`` in a background thread: a value served is at most ``refresh_s`` plus the
  writer's delay older than the store (``staleness_s``);
- the user's rows (user views and user x category crosses) are read on every request: one pipeline.

Its answer holds the same values ``get_online_features`` returns for the same keys (``to_feast_dict``).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import mmh3
from feast.protos.feast.types.Value_pb2 import DoubleList, Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from infra.settings import Settings
from schemas.features import BY_VIEW, FeatureRow

STRING, INT64 = 2, 4  # Feast ValueType numbers used in serialized entity keys
UNKNOWN = -1  # entity id of an advertiser or category that a candidate without features cannot name


def entity_key(keys: dict[str, int], project: str) -> bytes:
    """Feast's Redis key (entity key serialization v3) of int64 join keys, followed by the project."""
    names = sorted(keys)
    out = [struct.pack("<I", len(names))]
    for name in names:
        raw = name.encode()
        out.append(struct.pack("<II", STRING, len(raw)) + raw)
    for name in names:
        out.append(struct.pack("<IIq", INT64, 8, keys[name]))
    return b"".join(out) + project.encode()


def field_key(view: str, feature: str) -> bytes:
    """The hash field of one feature: murmur3 (x86, 32 bit, unsigned) of ``view:feature``, little endian."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def to_value(value: object) -> ValueProto:
    if isinstance(value, bool):
        raise TypeError("no boolean features")
    if isinstance(value, int):
        return ValueProto(int64_val=value)
    if isinstance(value, float):
        return ValueProto(double_val=value)
    if isinstance(value, list | tuple):
        if all(isinstance(v, int) for v in value):
            return ValueProto(int64_list_val=Int64List(val=value))
        return ValueProto(double_list_val=DoubleList(val=[float(v) for v in value]))
    raise TypeError(f"no feature value type for {type(value).__name__}")


def from_value(raw: bytes | None) -> object:
    """The Python value Feast's ``to_dict`` returns for a stored ``Value`` (None when absent)."""
    if raw is None:
        return None
    v = ValueProto.FromString(raw)
    kind = v.WhichOneof("val")
    if kind is None:
        return None
    if kind in ("int64_list_val", "double_list_val"):
        return list(getattr(v, kind).val)
    return getattr(v, kind)


def timestamp_bytes(ts: datetime) -> bytes:
    stamp = Timestamp()
    stamp.FromDatetime(ts.astimezone(UTC).replace(tzinfo=None))
    return stamp.SerializeToString()


class OnlineWriter:
    """Writes feature rows into Redis in Feast's layout (one pipeline per call)."""

    def __init__(self, settings: Settings):
        import redis

        r = settings.redis
        self.client = redis.Redis(host=r.host, port=r.port, password=r.password)
        self.project = settings.feast_project
        self._fields = {t.VIEW: [(n, field_key(t.VIEW, n)) for n in t.feature_names()] for t in BY_VIEW.values()}

    def write(self, table: type[FeatureRow], rows: Iterable[dict]) -> int:
        """HSET each row's features and ``_ts:<view>`` on its entity key; return the rows written."""
        fields, ts_field = self._fields[table.VIEW], f"_ts:{table.VIEW}".encode()
        pipe, n = self.client.pipeline(transaction=False), 0
        for row in rows:
            mapping = {key: to_value(row[name]).SerializeToString() for name, key in fields}
            mapping[ts_field] = timestamp_bytes(row["event_timestamp"])
            pipe.hset(entity_key({k: row[k] for k in table.ENTITIES}, self.project), mapping=mapping)
            n += 1
        pipe.execute()
        return n


class RequestFeatures:
    """The features of one request: the user's (one value each) and the candidates' (one per ad)."""

    def __init__(self, user_id: int, ad_ids: Sequence[int], columns: dict[str, list]):
        self.user_id, self.ad_ids, self.columns = user_id, list(ad_ids), columns

    def to_feast_dict(self) -> dict[str, list]:
        """The shape of ``get_online_features(..., full_feature_names=True).to_dict()`` for the rows
        ``{user_id, ad_id, advertiser_id, category_id}`` of each candidate."""
        return self.columns


class OnlineReader:
    """The scorer's read path (see the module docstring). ``refresh_s`` bounds the ad-side staleness."""

    AD_VIEWS = ("ad_features", "ad_realtime")
    ADVERTISER_VIEWS = ("advertiser_features", "advertiser_realtime")
    USER_VIEWS = ("user_features", "user_realtime")
    CROSS_VIEW = "user_category_features"

    def __init__(self, settings: Settings, refresh_s: float = 2.0):
        import redis

        r = settings.redis
        self.client = redis.Redis(host=r.host, port=r.port, password=r.password)
        self.project, self.refresh_s = settings.feast_project, refresh_s
        self._fields = {v: [(n, field_key(v, n)) for n in BY_VIEW[v].feature_names()] for v in BY_VIEW}
        self._ads: dict[int, dict[str, object]] = {}  # ad id -> every ad and advertiser feature, decoded
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refreshed_at = 0.0

    @property
    def staleness_s(self) -> float:
        """How old an ad-side value may be relative to the store (the refresh period)."""
        return self.refresh_s

    def _hmget(self, pipe, key: bytes, views: Sequence[str]) -> None:
        pipe.hmget(key, [k for v in views for _, k in self._fields[v]])

    def _decode(self, values: list, views: Sequence[str]) -> dict[str, object]:
        out, i = {}, 0
        for v in views:
            for name, _ in self._fields[v]:
                out[f"{v}__{name}"] = from_value(values[i])
                i += 1
        return out

    def _load_ads(self, ad_ids: Sequence[int]) -> None:
        """Read and decode the ad-side features of ``ad_ids`` (two pipelines: ads, then their advertisers)."""
        if not ad_ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for ad in ad_ids:
            self._hmget(pipe, entity_key({"ad_id": ad}, self.project), self.AD_VIEWS)
        ads = {ad: self._decode(vals, self.AD_VIEWS) for ad, vals in zip(ad_ids, pipe.execute(), strict=True)}
        advertisers = sorted({a["ad_features__ad_advertiser_id"] for a in ads.values()} - {None})
        pipe = self.client.pipeline(transaction=False)
        for adv in advertisers:
            self._hmget(pipe, entity_key({"advertiser_id": adv}, self.project), self.ADVERTISER_VIEWS)
        by_adv = {a: self._decode(vals, self.ADVERTISER_VIEWS)
                  for a, vals in zip(advertisers, pipe.execute(), strict=True)}
        empty = self._decode([None] * sum(len(self._fields[v]) for v in self.ADVERTISER_VIEWS), self.ADVERTISER_VIEWS)
        for feats in ads.values():
            feats.update(by_adv.get(feats["ad_features__ad_advertiser_id"], empty))
        with self._lock:
            self._ads.update(ads)

    def refresh(self, chunk: int = 512) -> None:
        """Re-read every cached ad, a chunk at a time."""
        known = list(self._ads)
        for i in range(0, len(known), chunk):
            self._load_ads(known[i:i + chunk])
        self.refreshed_at = time.monotonic()

    def start(self) -> OnlineReader:
        """Refresh the ad cache in the background every ``refresh_s``."""
        def loop() -> None:
            while not self._stop.wait(self.refresh_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="online-reader-refresh", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def features(self, user_id: int, ad_ids: Sequence[int]) -> RequestFeatures:
        """Every feature of the ranker's service for ``user_id`` and each candidate in ``ad_ids``."""
        missing = [a for a in dict.fromkeys(ad_ids) if a not in self._ads]
        if missing:  # a new candidate: read it now, then keep it fresh with the others
            self._load_ads(missing)
        with self._lock:
            ads = [self._ads[a] for a in ad_ids]
        categories = sorted({a["ad_features__ad_category_id"] for a in ads} - {None})
        pipe = self.client.pipeline(transaction=False)
        self._hmget(pipe, entity_key({"user_id": user_id}, self.project), self.USER_VIEWS)
        for c in categories:
            self._hmget(pipe, entity_key({"user_id": user_id, "category_id": c}, self.project), (self.CROSS_VIEW,))
        replies = pipe.execute()
        user = self._decode(replies[0], self.USER_VIEWS)
        cross = {c: self._decode(vals, (self.CROSS_VIEW,)) for c, vals in zip(categories, replies[1:], strict=True)}
        no_cross = self._decode([None] * len(self._fields[self.CROSS_VIEW]), (self.CROSS_VIEW,))
        n = len(ad_ids)
        columns: dict[str, list] = {
            "user_id": [user_id] * n, "ad_id": list(ad_ids),
            # -1: the ad has no row, so its advertiser and category are unknown (Feast cannot look up None).
            "advertiser_id": [UNKNOWN if a["ad_features__ad_advertiser_id"] is None
                              else a["ad_features__ad_advertiser_id"] for a in ads],
            "category_id": [UNKNOWN if a["ad_features__ad_category_id"] is None
                            else a["ad_features__ad_category_id"] for a in ads],
        }
        for name, value in user.items():
            columns[name] = [value] * n
        for name in ads[0] if ads else ():
            columns[name] = [a[name] for a in ads]
        crosses = [cross.get(a["ad_features__ad_category_id"], no_cross) for a in ads]
        for name in no_cross:
            columns[name] = [c[name] for c in crosses]
        return RequestFeatures(user_id, ad_ids, columns)
