"""Partition counts are never changed under a stateful processor (real broker): a topic whose count differs from
the settings, inputs that are not co-partitioned, or a changelog with another count than its inputs stop a
worker's start with a clear error, instead of keys moving in the middle of the state."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from infra.topics import PartitionMismatch, ensure_changelog, ensure_topics, with_topic_prefix


def create(settings, counts: dict[str, int]) -> None:
    admin = KafkaAdminClient(**settings.kafka.client_config())
    try:
        admin.create_topics([NewTopic(name, n, 1) for name, n in counts.items()])
    finally:
        admin.close()


def test_an_existing_topic_with_another_partition_count_is_not_grown(kafka_settings):
    settings = with_topic_prefix(kafka_settings, f"t{uuid.uuid4().hex[:8]}", create=False)
    create(settings, {settings.topics.clicks: 2})
    with pytest.raises(PartitionMismatch, match=rf"{settings.topics.clicks} has 2 partitions, the settings say 4"):
        ensure_topics(settings)
    admin = KafkaAdminClient(**settings.kafka.client_config())
    try:
        (meta,) = admin.describe_topics([settings.topics.clicks])
        assert len(meta["partitions"]) == 2  # left as it was
    finally:
        admin.close()


def test_inputs_and_changelog_must_be_co_partitioned(kafka_settings):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    a, b, changelog = f"{prefix}-a", f"{prefix}-b", f"{prefix}-group-changelog"
    create(kafka_settings, {a: 4, b: 3})
    with pytest.raises(PartitionMismatch, match="not co-partitioned"):
        ensure_changelog(kafka_settings, changelog, [a, b])

    c = f"{prefix}-c"
    create(kafka_settings, {c: 4, changelog: 2})
    with pytest.raises(PartitionMismatch, match=f"{changelog} has 2 partitions, its inputs 4"):
        ensure_changelog(kafka_settings, changelog, [a, c])
    other = f"{prefix}-other-changelog"
    ensure_changelog(kafka_settings, other, [a, c])  # a matching pair: created with their count
    admin = KafkaAdminClient(**kafka_settings.kafka.client_config())
    try:
        (meta,) = admin.describe_topics([other])
        assert len(meta["partitions"]) == 4
    finally:
        admin.close()
