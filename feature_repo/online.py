"""The online store's layout, owned here: a fast writer and the scorer's read path, both in Feast's format.

Feast keeps one Redis hash per entity key: the key is the serialized entity key followed by the project
name, each feature is a field named by the 4-byte murmur3 hash of ``<view>:<feature>`` holding a protobuf
``Value``, and ``_ts:<view>`` holds the view's event time. :class:`OnlineWriter` writes exactly that (tests
read it back with ``get_online_features``), so real-time rows are visible to any Feast client.

:class:`OnlineReader` serves one ranking request (one user, hundreds of candidate ads) in a few ms:

- per-ad and per-advertiser features are held in memory (decoded once into a table) and re-read from
  Redis every ``refresh_s`` in a background thread: a value served is at most ``refresh_s`` plus one refresh
  cycle older than the store (``staleness_s``: two periods while a cycle stays within one);
- the user's rows (user views and user x category crosses) are read on every request: one pipeline.

Its answer holds the same values ``get_online_features`` returns for the same keys (``to_feast_dict``). Given the
request's time (``as_of_ms``), it applies the rule training applies (``batch_jobs.training_set``): a view's row older
than the view's TTL (``feature_repo.features.TTL``) is absent. Every key written also expires (``KEY_TTL_S``, the
longest TTL; Feast's ``key_ttl_seconds`` for what ``feast materialize`` writes), so Redis does not keep rows of
entities that went quiet for ever.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import mmh3
import numpy as np
from feast.protos.feast.types.Value_pb2 import DoubleList, Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from google.protobuf.timestamp_pb2 import Timestamp

from infra.settings import Settings
from schemas.features import BY_VIEW, FeatureRow

# A view's rows are served for this long after their timestamp (training joins with the same TTL); the views'
# Feast definitions carry the same numbers (feature_repo/features.py imports them from here).
TTL_S = {False: 2 * 86_400, True: 86_400}  # gold views, real-time views
KEY_TTL_S = max(TTL_S.values())

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


def view_ttl_ms(view: str) -> int:
    return TTL_S[BY_VIEW[view].REALTIME] * 1000


def stamp_ms(raw: bytes | None) -> int:
    """Epoch ms of a stored ``_ts:<view>`` (Feast's protobuf Timestamp); -1 when the view has no row."""
    if raw is None:
        return -1
    t = Timestamp.FromString(raw)
    return t.seconds * 1000 + t.nanos // 1_000_000


def timestamp_bytes(ts: datetime) -> bytes:
    stamp = Timestamp()
    stamp.FromDatetime(ts.astimezone(UTC).replace(tzinfo=None))
    return stamp.SerializeToString()


# Writes a row only if it is not older than the row stored (Feast's own writer skips older timestamps too), so
# a fenced zombie's last batch or a replay never overwrites a newer row, and sets the key's expiry with the write.
# ``_tsms:<view>`` holds the row's time in epoch ms next to Feast's protobuf ``_ts:<view>`` (Feast reads only the
# fields it knows). ``_v:<view>`` counts the writes: a late event changes a real-time row without moving its time,
# and the read path's cache must still see the change. KEYS[1]: entity key; ARGV[1]: the key's TTL in s, ARGV[2]:
# the ms field, ARGV[3]: the row's ms, ARGV[4]: the version field, ARGV[5..]: field, value pairs.
_WRITE_IF_NOT_OLDER = """
local stored = redis.call('HGET', KEYS[1], ARGV[2])
if stored and tonumber(stored) > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3], unpack(ARGV, 5))
redis.call('HINCRBY', KEYS[1], ARGV[4], 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class OnlineWriter:
    """Writes feature rows into Redis in Feast's layout (one pipeline per call), never over a newer row."""

    def __init__(self, settings: Settings):
        self.client = settings.redis.client()
        self.project = settings.feast_project
        self._fields = {t.VIEW: [(n, field_key(t.VIEW, n)) for n in t.feature_names()] for t in BY_VIEW.values()}
        self._script = self.client.register_script(_WRITE_IF_NOT_OLDER)
        self.skipped_older = 0

    def write(self, table: type[FeatureRow], rows: Iterable[dict]) -> int:
        """Set each row's features and ``_ts:<view>`` on its entity key unless the stored row is newer; return the
        rows written (the others are counted in ``skipped_older``)."""
        fields, ts_field = self._fields[table.VIEW], f"_ts:{table.VIEW}".encode()
        ms_field, version_field = f"_tsms:{table.VIEW}".encode(), f"_v:{table.VIEW}".encode()
        pipe, n = self.client.pipeline(transaction=False), 0
        for row in rows:
            ts = row["event_timestamp"]
            args = [KEY_TTL_S, ms_field, int(ts.timestamp() * 1000), version_field, ts_field, timestamp_bytes(ts)]
            for name, key in fields:
                args += [key, to_value(row[name]).SerializeToString()]
            self._script(keys=[entity_key({k: row[k] for k in table.ENTITIES}, self.project)], args=args,
                         client=pipe)
            n += 1
        written = sum(pipe.execute())
        self.skipped_older += n - written
        return written


AD_VIEWS = ("ad_features", "ad_realtime")
ADVERTISER_VIEWS = ("advertiser_features", "advertiser_realtime")
USER_VIEWS = ("user_features", "user_realtime")
CROSS_VIEW = "user_category_features"
REFRESH_S = 2.0  # how often the read path's cache re-reads the written ad-side rows (after a cycle ends)
# The documented ad-side staleness: a row is checked at most one period plus one refresh cycle before the read,
# and a cycle must itself stay within a period (the reader says so when one does not).
STALENESS_BOUND_S = 2 * REFRESH_S
READ_SIDES = ("ad", "advertiser")  # the ad-side rows the read path holds, each with its read time


def wall_ms() -> int:
    """The wall clock in epoch ms: when a read happened (compared with when feature rows were written)."""
    return int(time.time() * 1000)


def view_fields(views: Sequence[str]) -> list[tuple[str, bytes, type]]:
    """(``view__feature``, hash field, Python type) of every feature of ``views``, in order."""
    return [(f"{v}__{n}", field_key(v, n), BY_VIEW[v].model_fields[n].annotation)
            for v in views for n in BY_VIEW[v].feature_names()]


class AdTable:
    """Ad-side features of known ads as columns: ``values[name]`` (int64 or float64) and ``present[name]``
    (False where the store had no value), each view's row time ``stamps[view]`` (epoch ms, -1: no row), and when
    each row was read from Redis, ``read_ms["ad"]`` and ``read_ms["advertiser"]`` (wall-clock epoch ms taken just
    before the read; -1: unknown); rows sorted by ``ad_ids``. Immutable: a refresh builds a new one."""

    def __init__(self, ad_ids, values: dict[str, np.ndarray], present: dict[str, np.ndarray],
                 stamps: dict[str, np.ndarray], read_ms: dict[str, np.ndarray] | None = None):
        ids = np.asarray(ad_ids, dtype=np.int64)
        if read_ms is None:
            read_ms = {side: np.full(len(ids), -1, dtype=np.int64) for side in READ_SIDES}
        order = np.argsort(ids, kind="stable")
        if not np.array_equal(order, np.arange(len(ids))):
            ids = ids[order]
            values = {n: v[order] for n, v in values.items()}
            present = {n: p[order] for n, p in present.items()}
            stamps = {n: p[order] for n, p in stamps.items()}
            read_ms = {n: p[order] for n, p in read_ms.items()}
        self.ad_ids, self.values, self.present, self.stamps, self.read_ms = ids, values, present, stamps, read_ms

    def rows(self, ad_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(row of each ad, whether the table has it)."""
        wanted = np.asarray(ad_ids, dtype=np.int64)
        rows = np.minimum(np.searchsorted(self.ad_ids, wanted), max(len(self.ad_ids) - 1, 0))
        found = self.ad_ids[rows] == wanted if len(self.ad_ids) else np.zeros(len(wanted), bool)
        return rows, found

    @classmethod
    def load(cls, client, project: str, ad_ids: list[int], chunk: int = 2048) -> AdTable:
        """Read ``ad_ids``' ad and advertiser hashes (pipelines of ``chunk`` keys) and decode them."""
        ad_fields, adv_fields = view_fields(AD_VIEWS), view_fields(ADVERTISER_VIEWS)
        ad_keys = [k for _, k, _ in ad_fields] + [f"_ts:{v}".encode() for v in AD_VIEWS]
        adv_keys = [k for _, k, _ in adv_fields] + [f"_ts:{v}".encode() for v in ADVERTISER_VIEWS]
        rows: list[list] = []
        ad_read: list[int] = []
        for i in range(0, len(ad_ids), chunk):
            pipe = client.pipeline(transaction=False)
            for ad in ad_ids[i:i + chunk]:
                pipe.hmget(entity_key({"ad_id": ad}, project), ad_keys)
            now = wall_ms()
            rows += [_decoded(reply, len(ad_fields)) for reply in pipe.execute()]
            ad_read += [now] * len(ad_ids[i:i + chunk])
        adv_pos = [n for n, _, _ in ad_fields].index("ad_features__ad_advertiser_id")
        advertisers = sorted({r[adv_pos] for r in rows} - {None})
        by_adv: dict[int, list] = {}
        adv_read: dict[int, int] = {}
        for i in range(0, len(advertisers), chunk):
            pipe = client.pipeline(transaction=False)
            for adv in advertisers[i:i + chunk]:
                pipe.hmget(entity_key({"advertiser_id": adv}, project), adv_keys)
            now = wall_ms()
            for adv, reply in zip(advertisers[i:i + chunk], pipe.execute(), strict=True):
                by_adv[adv], adv_read[adv] = _decoded(reply, len(adv_fields)), now
        n_ad = len(ad_fields) + len(AD_VIEWS)
        none = [None] * len(adv_fields) + [-1] * len(ADVERTISER_VIEWS)
        full = [r + by_adv.get(r[adv_pos], none) for r in rows]
        values, present, stamps = {}, {}, {}
        for j, (name, _, kind) in enumerate(ad_fields):
            values[name], present[name] = _column([r[j] for r in full], kind)
        for j, (name, _, kind) in enumerate(adv_fields):
            values[name], present[name] = _column([r[n_ad + j] for r in full], kind)
        for j, view in enumerate(AD_VIEWS):
            stamps[view] = np.array([r[len(ad_fields) + j] for r in full], dtype=np.int64)
        for j, view in enumerate(ADVERTISER_VIEWS):
            stamps[view] = np.array([r[n_ad + len(adv_fields) + j] for r in full], dtype=np.int64)
        # An ad without a stored advertiser has no advertiser row read: its time stays unknown (-1).
        read_ms = {"ad": np.array(ad_read, dtype=np.int64),
                   "advertiser": np.array([adv_read.get(r[adv_pos], -1) for r in rows], dtype=np.int64)}
        return cls(list(ad_ids), values, present, stamps, read_ms)

    def merged(self, other: AdTable) -> AdTable:
        """This table with ``other``'s ads added (or replaced)."""
        keep = ~np.isin(self.ad_ids, other.ad_ids)
        ids = np.concatenate([self.ad_ids[keep], other.ad_ids])
        values = {n: np.concatenate([v[keep], other.values[n]]) for n, v in self.values.items()}
        present = {n: np.concatenate([v[keep], other.present[n]]) for n, v in self.present.items()}
        stamps = {n: np.concatenate([v[keep], other.stamps[n]]) for n, v in self.stamps.items()}
        read_ms = {n: np.concatenate([v[keep], other.read_ms[n]]) for n, v in self.read_ms.items()}
        return AdTable(ids, values, present, stamps, read_ms)


def _decoded(reply: list, n_values: int) -> list:
    """An HMGET reply of ``n_values`` feature fields then ``_ts`` fields: values decoded, stamps in ms."""
    return [from_value(x) for x in reply[:n_values]] + [stamp_ms(x) for x in reply[n_values:]]


def _column(column: list, kind: type) -> tuple[np.ndarray, np.ndarray]:
    present = np.array([v is not None for v in column], dtype=bool)
    dtype = np.int64 if kind is int else np.float64
    return np.array([0 if v is None else v for v in column], dtype=dtype), present


def _stamps(client, project: str, keys: list[bytes], views: Sequence[str], chunk: int = 4096) -> list[tuple]:
    """The ``_ts:<view>`` and ``_v:<view>`` fields of each key: what changes whenever a row is written (the
    time for ``feast materialize`` and the bulk loader, which write a new day; the count for the real-time
    writer, whose late events change a row without moving its time)."""
    fields = [f"{f}:{v}".encode() for v in views for f in ("_ts", "_v")]
    out: list[tuple] = []
    for i in range(0, len(keys), chunk):
        pipe = client.pipeline(transaction=False)
        for key in keys[i:i + chunk]:
            pipe.hmget(key, fields)
        out += [tuple(reply) for reply in pipe.execute()]
    return out


def _refresher(settings: Settings, conn) -> None:
    """The refresh process. Sent the known ad ids, it reads only the rows' timestamps, reloads the ads whose
    row (or whose advertiser's row) was written since it last looked, and answers with those rows only."""
    client = settings.redis.client()
    project = settings.feast_project
    seen_ads: dict[int, tuple] = {}
    seen_advs: dict[int, tuple] = {}
    advertiser_of: dict[int, int] = {}
    adv_name = "ad_features__ad_advertiser_id"
    while True:
        ad_ids = conn.recv()
        if ad_ids is None:
            return
        checked_ms = wall_ms()  # every known ad's cached rows are the store's as of now, or reloaded below
        stamps = _stamps(client, project, [entity_key({"ad_id": a}, project) for a in ad_ids], AD_VIEWS)
        changed = {a for a, s in zip(ad_ids, stamps, strict=True) if seen_ads.get(a) != s}
        advs = sorted(set(advertiser_of.values()))
        adv_stamps = _stamps(client, project, [entity_key({"advertiser_id": v}, project) for v in advs],
                             ADVERTISER_VIEWS)
        moved = {v for v, s in zip(advs, adv_stamps, strict=True) if seen_advs.get(v) != s}
        changed |= {a for a in ad_ids if advertiser_of.get(a) in moved}
        seen_ads.update(zip(ad_ids, stamps, strict=True))
        seen_advs.update(zip(advs, adv_stamps, strict=True))
        table = AdTable.load(client, project, sorted(changed))
        for a, v, ok in zip(table.ad_ids.tolist(), table.values[adv_name].tolist(), table.present[adv_name].tolist(),
                            strict=True):
            if ok:
                advertiser_of[a] = v
        conn.send((table.ad_ids, table.values, table.present, table.stamps, table.read_ms, checked_ms))


class RequestFeatures:
    """The features of one request: the user's (one value each) and the candidates' (one row per ad).

    ``ad_values``/``ad_present``: arrays, row i = candidate i; ``user``: the user's values by name;
    ``cross_values``: per cross feature, one value per candidate (by the candidate's category)."""

    def __init__(self, user_id: int, ad_ids: Sequence[int], ad_values: dict, ad_present: dict, user: dict,
                 cross: dict[str, list], read_ms: dict[str, np.ndarray] | None = None):
        self.user_id, self.ad_ids = user_id, list(ad_ids)
        self.ad_values, self.ad_present, self.user, self.cross = ad_values, ad_present, user, cross
        # When each candidate's ad row and advertiser row were read (``AdTable.read_ms``; -1: unknown).
        self.read_ms = read_ms if read_ms is not None else {
            side: np.full(len(self.ad_ids), -1, dtype=np.int64) for side in READ_SIDES}

    def to_feast_dict(self) -> dict[str, list]:
        """The shape of ``get_online_features(..., full_feature_names=True).to_dict()`` for the rows
        ``{user_id, ad_id, advertiser_id, category_id}`` of each candidate (-1: unknown advertiser or
        category, for an ad without a row)."""
        n = len(self.ad_ids)

        def known(name: str) -> list:
            return [v if ok else UNKNOWN for v, ok in zip(self.ad_values[name].tolist(),
                                                          self.ad_present[name].tolist(), strict=True)]

        out: dict[str, list] = {"user_id": [self.user_id] * n, "ad_id": list(self.ad_ids),
                                "advertiser_id": known("ad_features__ad_advertiser_id"),
                                "category_id": known("ad_features__ad_category_id")}
        for name, value in self.user.items():
            out[name] = [value] * n
        for name, values in self.ad_values.items():
            out[name] = [v if ok else None for v, ok in zip(values.tolist(), self.ad_present[name].tolist(),
                                                             strict=True)]
        out.update(self.cross)
        return out


class OnlineReader:
    """The scorer's read path (see the module docstring). ``refresh_s`` bounds the ad-side staleness.

    The ad table is reloaded by a separate process (so decoding it never holds this process's GIL while a
    request waits) and swapped in whole; an ad seen for the first time is read during its request."""

    def __init__(self, settings: Settings, refresh_s: float = REFRESH_S, ad_cache: bool = True):
        """``ad_cache=False``: every request reads its candidates' ad and advertiser rows from Redis (no staleness,
        storage reads on the request's path; ``make bench-online`` measures both)."""
        self.settings, self.ad_cache = settings, ad_cache
        self.client = settings.redis.client()
        self.project, self.refresh_s = settings.feast_project, refresh_s
        self._user_fields = view_fields(USER_VIEWS)
        self._cross_fields = view_fields((CROSS_VIEW,))
        self._adv_fields = view_fields(ADVERTISER_VIEWS)
        self._adv_keys = [k for _, k, _ in self._adv_fields] + [f"_ts:{v}".encode() for v in ADVERTISER_VIEWS]
        self._names_of = {v: [n for n, _, _ in view_fields((v,))] for v in AD_VIEWS + ADVERTISER_VIEWS}
        # What one request reads (computed once): the features, then each view's _ts field.
        self._user_keys = [k for _, k, _ in self._user_fields] + [f"_ts:{v}".encode() for v in USER_VIEWS]
        self._cross_keys = [k for _, k, _ in self._cross_fields] + [f"_ts:{CROSS_VIEW}".encode()]
        self._user_view = [USER_VIEWS.index(n.split("__", 1)[0]) for n, _, _ in self._user_fields]
        self.table = AdTable.load(self.client, self.project, [])
        self._lock = threading.Lock()  # serializes swaps (a request reads ``self.table`` once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = None
        self.refreshed_at = 0.0
        self.checked_ms = -1  # when the last refresh found every cached ad-side row still the store's
        self.refreshes = 0  # reloads completed by the background refresh

    @property
    def staleness_s(self) -> float:
        """How old an ad-side value may be relative to the store: the refresh period plus one refresh cycle
        (the cycle waits the period after the previous one ended), at most two periods while a cycle stays
        within one (the demo measured p99 2.3 s, max 3.1 s against 4 s)."""
        return 2 * self.refresh_s if self.ad_cache else 0.0

    def _fill_advertisers(self, values: dict, present: dict, given: np.ndarray, unnamed: np.ndarray,
                          replies: dict[int, list], as_of_ms: int | None) -> None:
        """Advertiser features of the ``unnamed`` candidates from their request-given advertiser's row."""
        n = len(self._adv_fields)
        rows = {adv: _decoded(reply, n) for adv, reply in replies.items()}
        for i in np.flatnonzero(unnamed):
            row = rows[int(given[i])]
            for j, (name, _, _) in enumerate(self._adv_fields):
                view = name.split("__", 1)[0]
                stamp = row[n + ADVERTISER_VIEWS.index(view)]
                fresh = as_of_ms is None or stamp >= as_of_ms - view_ttl_ms(view)
                if row[j] is not None and fresh:
                    values[name][i], present[name][i] = row[j], True

    def _add(self, table: AdTable) -> None:
        with self._lock:
            self.table = self.table.merged(table)

    def refresh(self) -> None:
        """Reload every known ad in this process (the background refresh uses a child process)."""
        self._add(AdTable.load(self.client, self.project, self.table.ad_ids.tolist()))
        self.refreshed_at = time.monotonic()

    def start(self) -> OnlineReader:
        """Reload the ad table every ``refresh_s`` in a child process."""
        if not self.ad_cache:
            raise ValueError("start() refreshes the ad cache: a reader with ad_cache=False has none to refresh")
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        here, there = ctx.Pipe()
        self._process = ctx.Process(target=_refresher, args=(self.settings, there), daemon=True,
                                    name="online-reader-refresh")
        self._process.start()

        def loop() -> None:
            while not self._stop.wait(self.refresh_s):
                began = time.monotonic()
                here.send(self.table.ad_ids.tolist())
                ids, values, present, stamps, read_ms, checked_ms = here.recv()  # waits without the GIL
                if (took := time.monotonic() - began) > self.refresh_s:
                    print(f"online reader: a cache refresh took {took:.1f} s, over its {self.refresh_s:g} s "
                          f"period: ad-side rows may be staler than the documented {self.staleness_s:g} s",
                          flush=True)
                if len(ids):
                    self._add(AdTable(ids, values, present, stamps, read_ms))  # only the ads whose rows were written
                self.checked_ms = checked_ms
                self.refreshed_at = time.monotonic()
                self.refreshes += 1
            here.send(None)

        self._thread = threading.Thread(target=loop, name="online-reader-refresh", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._process is not None:
            self._process.join(timeout=10)

    def features(self, user_id: int, ad_ids: Sequence[int], as_of_ms: int | None = None,
                 category_ids: Sequence[int] | None = None,
                 advertiser_ids: Sequence[int] | None = None) -> RequestFeatures:
        """Every feature of the ranker's service for ``user_id`` and each candidate in ``ad_ids``; with the request's
        time ``as_of_ms``, a view's row older than its TTL is absent (training's rule). ``category_ids``, the
        candidates' categories as the request names them (the catalog's, as the training set joins), choose the
        user x category rows; without them (or where one is negative) the ad's stored category does, so an ad
        without a gold row yet still gets its user x category features when the request knows its category.
        Likewise ``advertiser_ids`` give the advertiser rows of candidates whose ad has no stored advertiser."""
        if not self.ad_cache:  # storage reads: this request's candidates, read now and not kept
            table = AdTable.load(self.client, self.project, list(dict.fromkeys(np.asarray(ad_ids).tolist())))
            rows, found = table.rows(ad_ids)
        else:
            table = self.table
            rows, found = table.rows(ad_ids)
        if not found.all():  # a new candidate: read it now, then keep it fresh with the others
            missing = list(dict.fromkeys(np.asarray(ad_ids)[~found].tolist()))
            self._add(AdTable.load(self.client, self.project, missing))
            table = self.table
            rows, _ = table.rows(ad_ids)
        values = {n: v[rows] for n, v in table.values.items()}
        present = {n: p[rows] for n, p in table.present.items()}
        read_ms = {n: p[rows] for n, p in table.read_ms.items()}
        # Known to be the store's rows as of: their read, or the last refresh that found them unchanged.
        read_ms["checked"] = np.maximum(read_ms["ad"], self.checked_ms)
        if as_of_ms is not None:
            for view in AD_VIEWS + ADVERTISER_VIEWS:
                fresh = table.stamps[view][rows] >= as_of_ms - view_ttl_ms(view)
                for name in self._names_of[view]:
                    present[name] = present[name] & fresh
        cats = values["ad_features__ad_category_id"]
        has_cat = present["ad_features__ad_category_id"]
        if category_ids is not None:
            given = np.asarray(category_ids, dtype=np.int64)
            cats = np.where(given >= 0, given, cats)
            has_cat = has_cat | (given >= 0)
        categories = sorted(set(cats[has_cat].tolist()))
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(entity_key({"user_id": user_id}, self.project), self._user_keys)
        for c in categories:
            pipe.hmget(entity_key({"user_id": user_id, "category_id": c}, self.project), self._cross_keys)
        by_request: list[int] = []  # advertisers named by the request for ads with no stored advertiser
        if advertiser_ids is not None:
            given = np.asarray(advertiser_ids, dtype=np.int64)
            unnamed = ~present["ad_features__ad_advertiser_id"] & (given >= 0)
            by_request = sorted(set(given[unnamed].tolist()))
            for adv in by_request:
                pipe.hmget(entity_key({"advertiser_id": adv}, self.project), self._adv_keys)
        now = wall_ms()
        replies = pipe.execute()
        if by_request:
            self._fill_advertisers(values, present, given, unnamed, dict(zip(by_request, replies[-len(by_request):],
                                                                             strict=True)), as_of_ms)
            read_ms["advertiser"] = np.where(unnamed, now, read_ms["advertiser"])
            replies = replies[:-len(by_request)]
        n_user = len(self._user_fields)
        user_row = _decoded(replies[0], n_user)
        user_fresh = [as_of_ms is None or user_row[n_user + j] >= as_of_ms - view_ttl_ms(v)
                      for j, v in enumerate(USER_VIEWS)]
        user = {n: (value if user_fresh[j] else None)
                for (n, _, _), value, j in zip(self._user_fields, user_row, self._user_view, strict=False)}
        n_cross = len(self._cross_fields)
        cross_rows = []
        for reply in replies[1:]:
            row = _decoded(reply, n_cross)
            fresh = as_of_ms is None or row[n_cross] >= as_of_ms - view_ttl_ms(CROSS_VIEW)
            cross_rows.append(row[:n_cross] if fresh else [None] * n_cross)
        slot = {c: i for i, c in enumerate(categories)}
        pos = np.array([slot[c] if ok else len(categories) for c, ok in zip(cats.tolist(), has_cat.tolist(),
                                                                            strict=True)], dtype=np.int64)
        cross = {}
        for j, (name, _, _) in enumerate(self._cross_fields):
            by_slot = np.array([r[j] for r in cross_rows] + [None], dtype=object)
            cross[name] = by_slot[pos].tolist()
        return RequestFeatures(user_id, ad_ids, values, present, user, cross, read_ms)
