"""The topics, with explicit partitions, retention and cleanup policies; ``ensure_topics`` creates the
missing ones and raises partition counts that are too low (it never lowers them)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from infra.settings import Settings, TopicSettings

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Raw events outlive the conversion window (plus a week of margin for replays and backfills);
    matured labels are compacted by impression id, the campaign catalog by campaign id; dead letters are
    kept for a month."""
    t, p = settings.topics, settings.kafka.default_partitions
    window_ms = int(settings.windows.conversion_window_s * 1000)
    raw = {"cleanup.policy": "delete", "retention.ms": str(window_ms + 7 * DAY_MS),
           "message.timestamp.type": "CreateTime"}
    return [
        TopicSpec(t.impressions, p, raw),
        TopicSpec(t.clicks, p, raw),
        TopicSpec(t.conversions, p, raw),
        TopicSpec(t.negative_feedback, p, raw),
        TopicSpec(t.campaigns, 1, {"cleanup.policy": "compact"}),
        TopicSpec(t.prediction_log, p, {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)}),
        TopicSpec(t.training_examples, p, {"cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)}),
        TopicSpec(t.matured_labels, p, {"cleanup.policy": "compact,delete",
                                        "retention.ms": str(window_ms + 30 * DAY_MS)}),
        TopicSpec(t.realtime_entity_events, p, {"cleanup.policy": "delete", "retention.ms": str(2 * DAY_MS)}),
        TopicSpec(t.realtime_features, p, {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)}),
        TopicSpec(t.dead_letters, 1, {"cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)}),
    ]


def with_topic_prefix(settings: Settings, prefix: str, create: bool = True) -> Settings:
    """A copy of ``settings`` whose topics are named ``<prefix>-<topic>`` (created unless told not to):
    for tests and benchmarks that must not share topics."""
    topics = TopicSettings(**{k: f"{prefix}-{v}" for k, v in settings.topics.model_dump().items()})
    copy = settings.model_copy(update={"topics": topics})
    if create:
        ensure_topics(copy)
    return copy


REPARTITION_HELP = ("a stateful processor's keys would move to other partitions in the middle of its state; to "
                    "repartition, see the README (Repartitioning): new topics with the new count, a replay into "
                    "them, and new consumer groups")


class PartitionMismatch(RuntimeError):
    """Topics that must be co-partitioned are not (or differ from the settings): nothing is changed in place."""


def ensure_topics(settings: Settings) -> list[str]:
    """Create missing topics; return the names created. An existing topic whose partition count differs from the
    settings is an error (:class:`PartitionMismatch`), never grown in place."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(**settings.kafka.client_config())
    try:
        existing = set(admin.list_topics())
        specs = topic_specs(settings)
        new = [NewTopic(s.name, s.partitions, settings.kafka.replication_factor, topic_configs=s.config)
               for s in specs if s.name not in existing]
        if new:
            admin.create_topics(new)
        wrong = []
        for meta in admin.describe_topics([s.name for s in specs if s.name in existing]):
            want = next(s.partitions for s in specs if s.name == meta["name"])
            if len(meta["partitions"]) != want:
                wrong.append(f"{meta['name']} has {len(meta['partitions'])} partitions, the settings say {want}")
        if wrong:
            raise PartitionMismatch(f"{'; '.join(wrong)}: not changed, since {REPARTITION_HELP}")
        return [n.name for n in new]
    finally:
        admin.close()


def ensure_changelog(settings: Settings, name: str, inputs: list[str]) -> None:
    """Create a processor's compacted changelog topic with as many partitions as its inputs (if missing)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**settings.kafka.client_config())
    try:
        counts: dict[str, int] = {}
        for _ in range(60):  # a topic created a moment ago may not have its partitions in the metadata yet
            counts = {m["topic"] if "topic" in m else m["name"]: len(m["partitions"] or [])
                      for m in admin.describe_topics(inputs)}
            if all(counts.get(t, 0) > 0 for t in inputs):
                break
            time.sleep(0.5)
        if not all(counts.get(t, 0) > 0 for t in inputs):
            raise RuntimeError(f"{name}: the inputs {inputs} have no partitions in the broker's metadata after 30 s")
        if len(set(counts.values())) > 1:
            raise PartitionMismatch(f"{name}: the inputs are not co-partitioned ({counts}): partition p of each "
                                    f"input must hold the same keys; {REPARTITION_HELP}")
        partitions = next(iter(counts.values()))
        if name in set(admin.list_topics()):
            (meta,) = admin.describe_topics([name])
            if len(meta["partitions"] or []) != partitions:
                raise PartitionMismatch(f"{name} has {len(meta['partitions'] or [])} partitions, its inputs "
                                        f"{partitions}: the state of task p lives in changelog partition p; "
                                        f"{REPARTITION_HELP}")
            return
        try:
            admin.create_topics([NewTopic(name, partitions, settings.kafka.replication_factor,
                                          topic_configs={"cleanup.policy": "compact",
                                                         "min.compaction.lag.ms": str(3600 * 1000)})])
        except TopicAlreadyExistsError:  # another worker of the group created it first
            pass
    finally:
        admin.close()


def topic_counts(settings: Settings, names: list[str] | None = None) -> dict[str, int]:
    """Messages currently held per topic (end offset minus beginning offset, over partitions)."""
    from kafka import KafkaConsumer, TopicPartition

    names = names or [s.name for s in topic_specs(settings)]
    consumer = KafkaConsumer(**settings.kafka.client_config())
    try:
        counts = {}
        for name in names:
            parts = [TopicPartition(name, p) for p in (consumer.partitions_for_topic(name) or ())]
            if not parts:
                counts[name] = 0
                continue
            begin, end = consumer.beginning_offsets(parts), consumer.end_offsets(parts)
            counts[name] = sum(end[tp] - begin[tp] for tp in parts)
        return counts
    finally:
        consumer.close()


def group_lag(settings: Settings, group_id: str, names: list[str]) -> tuple[int, int]:
    """(messages the consumer group has committed, messages in the topics) over ``names``' partitions."""
    from kafka import KafkaConsumer, TopicPartition

    # A consumer that never subscribes does not join the group; it only reads the group's offsets.
    consumer = KafkaConsumer(**settings.kafka.client_config(), group_id=group_id, enable_auto_commit=False)
    try:
        parts = [TopicPartition(n, p) for n in names for p in (consumer.partitions_for_topic(n) or ())]
        begin, end = consumer.beginning_offsets(parts), consumer.end_offsets(parts)
        committed = {tp: consumer.committed(tp) for tp in parts}
        done = sum(max(c - begin[tp], 0) for tp, c in committed.items() if c is not None)
        return done, sum(end[tp] - begin[tp] for tp in parts)
    finally:
        consumer.close()


def read_topic(settings: Settings, topic: str, timeout_s: float = 60.0) -> list:
    """Every record now in ``topic`` (up to the end offsets at the time of the call), all partitions."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**settings.kafka.client_config(), group_id=None, enable_auto_commit=False,
                             isolation_level="read_committed")
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not parts:
            return []
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        records, deadline = [], time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: could not read up to the end offsets in {timeout_s}s")
            for tp, batch in consumer.poll(timeout_ms=500).items():
                records.extend(r for r in batch if r.offset < end[tp])
        return records
    finally:
        consumer.close()
