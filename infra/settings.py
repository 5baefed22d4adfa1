"""The one settings object: every address, path, window length and topic name.

Values come from environment variables (prefix ``ADS_``, nested with ``__``, for example
``ADS_KAFKA__BOOTSTRAP_SERVERS=broker1:9092``) or from a ``.env`` file named by ``ADS_ENV_FILE``
(default ``.env`` in the working directory). The defaults are the local stack that ``make up`` starts.

>>> s = get_settings()
>>> s.topics.impressions
'impressions'
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent


class KafkaSettings(BaseModel):
    """Where Kafka is, and how the local broker is laid out."""

    bootstrap_servers: str = "127.0.0.1:19092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    # Local broker only (infra/kafka_broker.py).
    controller_port: int = 19093
    heap: str = "1G"
    default_partitions: int = 4
    replication_factor: int = 1
    # The broker's message size limit: a worker writes no record larger than this (it dead-letters it).
    max_record_bytes: int = 1_000_000

    def client_config(self) -> dict:
        """Connection settings in kafka-python's spelling (aiokafka accepts the same names)."""
        cfg: dict = {"bootstrap_servers": self.bootstrap_servers.split(","),
                     "security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            cfg.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                       sasl_plain_password=self.sasl_password)
        if self.ssl_cafile:
            cfg["ssl_cafile"] = self.ssl_cafile
        return cfg

    def ssl_context(self):
        """An SSL context for TLS listeners (aiokafka and faust take a context, not a CA file), or None."""
        if "SSL" not in self.security_protocol:
            return None
        from aiokafka.helpers import create_ssl_context

        return create_ssl_context(cafile=self.ssl_cafile)

    def aiokafka_config(self) -> dict:
        """Connection settings for aiokafka clients: the same servers, SASL and TLS as :meth:`client_config`."""
        cfg: dict = {"bootstrap_servers": self.bootstrap_servers, "security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            cfg.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                       sasl_plain_password=self.sasl_password)
        if (context := self.ssl_context()) is not None:
            cfg["ssl_context"] = context
        return cfg

    def spark_options(self) -> dict[str, str]:
        """The same servers and SASL settings as options of Spark's Kafka source (``kafka.``-prefixed consumer
        properties; Spark redacts option values that name a password in its logs and plans)."""
        opts = {"kafka.bootstrap.servers": self.bootstrap_servers, "kafka.security.protocol": self.security_protocol}
        if self.sasl_mechanism:
            module = ("org.apache.kafka.common.security.plain.PlainLoginModule" if self.sasl_mechanism == "PLAIN"
                      else "org.apache.kafka.common.security.scram.ScramLoginModule")
            opts["kafka.sasl.mechanism"] = self.sasl_mechanism
            opts["kafka.sasl.jaas.config"] = (f'{module} required username="{self.sasl_username}" '
                                              f'password="{self.sasl_password}";')
        if self.ssl_cafile:
            opts["kafka.ssl.truststore.type"] = "PEM"
            opts["kafka.ssl.truststore.location"] = self.ssl_cafile
        return opts

    def faust_credentials(self):
        """The same SASL/TLS settings as faust's ``broker_credentials`` (None for PLAINTEXT)."""
        import faust

        if self.sasl_mechanism:
            return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                         mechanism=self.sasl_mechanism, ssl_context=self.ssl_context())
        if (context := self.ssl_context()) is not None:
            return faust.SSLCredentials(context)
        return None


class TopicSettings(BaseModel):
    """Topic names. Raw events are keyed by impression id, so one partition holds a whole impression."""

    impressions: str = "impressions"
    clicks: str = "clicks"
    conversions: str = "conversions"
    negative_feedback: str = "negative_feedback"
    campaigns: str = "campaigns"
    prediction_log: str = "prediction_log"
    training_examples: str = "training_examples"
    matured_labels: str = "matured_labels"
    dead_letters: str = "dead_letters"
    # Real-time features: entity events re-keyed by the first stage, and the rows the second stage wrote.
    realtime_entity_events: str = "realtime_entity_events"
    realtime_features: str = "realtime_features"


class RedisSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 16379
    # An ACL user (Redis 6+): with ``username`` the local server (infra/redis_server.py) turns the default user
    # off and lets only this one in; without it, ``password`` alone is the default user's (requirepass).
    username: str | None = None
    password: str | None = None
    # A hung Redis must not stop a worker's heartbeats or a request for long: every call gives up after this.
    socket_timeout_s: float = 5.0
    socket_connect_timeout_s: float = 5.0
    # TLS: clients connect with TLS and verify the server's certificate against ``tls_ca_file`` (the system's CAs
    # when unset) and its name or IP against ``host``. The local server (infra/redis_server.py) then serves TLS
    # only, on ``port``, with ``tls_cert_file`` and ``tls_key_file``.
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def client(self):
        """A ``redis.Redis`` client with these settings (the one place clients are made)."""
        import redis

        tls = {"ssl": True, "ssl_ca_certs": self.tls_ca_file} if self.tls else {}
        return redis.Redis(host=self.host, port=self.port, username=self.username, password=self.password,
                           socket_timeout=self.socket_timeout_s, socket_connect_timeout=self.socket_connect_timeout_s,
                           **tls)

    def ssl_context(self):
        """The TLS context a raw socket client uses (``feature_repo/bulk.py``), or None without TLS."""
        if not self.tls:
            return None
        import ssl

        return ssl.create_default_context(cafile=self.tls_ca_file)

    @property
    def url(self) -> str:
        """The server's URL, credentials included (for clients only: never print it)."""
        from urllib.parse import quote

        user = quote(self.username or "", safe="")
        auth = f"{user}:{quote(self.password, safe='')}@" if self.password else ""
        if not self.tls:
            return f"redis://{auth}{self.host}:{self.port}/0"
        ca = f"?ssl_ca_certs={quote(self.tls_ca_file, safe='/')}" if self.tls_ca_file else ""
        return f"rediss://{auth}{self.host}:{self.port}/0{ca}"


class WindowSettings(BaseModel):
    """Attribution windows, in seconds of event time."""

    click_window_s: float = 30.0
    # Hides and reports count within this window after the impression (at most the click window: the joiner
    # decides them when the click window closes). Their lateness is the clicks'.
    feedback_window_s: float = 30.0
    conversion_window_s: float = 7 * 24 * 3600.0
    # How long after it happened an impression or click may arrive (Kafka record time) and still be joined.
    allowed_lateness_s: float = 600.0
    # The same for conversions, counted from the end of their click's conversion window: advertisers'
    # postbacks arrive in batches, hours late.
    conversion_lateness_s: float = 24 * 3600.0
    # An event time this far ahead of its record's arrival, or older than ``max_event_age_s`` (the raw
    # topics' retention), is not trusted: it is dead-lettered and moves no clock.
    max_future_skew_s: float = 300.0
    max_event_age_s: float = 14 * 24 * 3600.0
    # Wall-clock seconds after which an input read to its end stops holding the partition's clock back.
    idle_timeout_s: float = 10.0
    # The always-on processors' event-time clock (streams/event_clock.py): a record may arrive this far behind the
    # newest record of its input and still count; further behind the clock, it is a dead letter with the reason.
    max_out_of_orderness_s: float = 5.0
    # When every input is idle: 0 holds the clock (Flink's default: labels never depend on pauses); r > 0 advances
    # it from the last data by r x the processing time elapsed since (1 = real time) so the last windows close
    # without new traffic. Never to the wall clock.
    idle_advance_rate: float = Field(default=0.0, ge=0.0)
    # Arrival-time seconds a finished impression's ids are remembered, to drop events repeated by producers.
    done_retention_s: float = 24 * 3600.0
    # delay_curve scheme (elapsed windows with delay-curve soft labels): the first example waits the first of these
    # elapsed times after the click for a conversion; an unconverted click gets a corrected soft label at each
    # later one.
    elapsed_windows_s: list[float] = [3600.0, 6 * 3600.0, 24 * 3600.0, 3 * 24 * 3600.0]

    @model_validator(mode="after")
    def _feedback_within_click_window(self) -> WindowSettings:
        if not 0 < self.feedback_window_s <= self.click_window_s:
            raise ValueError(f"feedback_window_s ({self.feedback_window_s}) must be in (0, click_window_s = "
                             f"{self.click_window_s}]: the joiner decides feedback when the click window closes")
        return self

    def open_for_s(self) -> float:
        """The longest event time after an impression that the joiner may still emit an example of it (its click
        and conversion windows with their lateness); state about an impression is useless after that."""
        return self.click_window_s + self.allowed_lateness_s + self.conversion_window_s + self.conversion_lateness_s


class SparkSettings(BaseModel):
    master: str = "local[2]"
    driver_memory: str = "3g"
    shuffle_partitions: int = 4
    # Tasks Delta uses to rebuild a table's snapshot from its log (Delta's default: 50). Every read, write and
    # merge of a Delta table rebuilds one; on a small driver the 50 tasks' scheduling outweighs the work. Raise it
    # with the cluster's cores and the tables' log sizes.
    delta_snapshot_partitions: int = 4


class TrainerSettings(BaseModel):
    """The ranker: its size, its three cadences and the model registry."""

    # Hash buckets of the sparse ids (an id lands in bucket hash(id) % buckets; 0 is kept for padding).
    id_buckets: int = 200_003
    small_buckets: int = 1_009  # placement, device, category, position
    embedding_dim: int = 16
    # The ranker's wide part (trainers/model.py): each id of these fields adds a bias of its own to these tasks'
    # logits, trained by the batch cadences at ``wide_learning_rate_scale`` x the learning rate in their first epoch
    # and ``wide_learning_rate_scale_later`` x after it (CVR only: a per-user CTR bias at that rate overfits), by
    # online updates at ``online_wide_learning_rate_scale`` x the online rate. Later epochs at x10 memorized: up to 4
    # epochs, features worlds 11-13, CVR log loss 0.185 against 0.178 with x1 after the first (README, issue 20).
    wide_fields: tuple[str, ...] = ("user_id", "ad_id", "advertiser_id", "campaign_id", "category_id", "placement",
                                    "device")
    wide_tasks: tuple[str, ...] = ("cvr",)
    wide_learning_rate_scale: float = 10.0
    wide_learning_rate_scale_later: float = 1.0
    batch_size: int = 512
    learning_rate: float = 1e-2
    # Full retrain: the last N days of training sets; warm start: the latest day, from the promoted model.
    full_retrain_days: int = 30
    # Batch epochs, at most: training stops once the ranking of the calibration half of the held-out rows (mean AUC
    # of pCTR and pCTCVR) has not improved for ``early_stopping_patience`` epochs and keeps the best epoch's
    # weights (trainers/train.py; 0: no early stopping, every epoch runs).
    epochs: int = 4
    early_stopping_patience: int = 2
    # Candidate retrieval's two towers (trainers/retrieval.py), trained by the batch cadences beside the ranker on
    # the same rows' clicks: epochs per cadence (0: no towers) and the vectors' size.
    retrieval_epochs: int = 3
    retrieval_dim: int = 32
    # The funnel's pre-ranker (trainers/preranker.py), distilled from each batch version's ranker; 0 = none.
    preranker_epochs: int = 3
    # Online updates: mini-batch size, and a new model version published every N seconds.
    online_batch_size: int = 256
    online_learning_rate: float = 3e-3  # lower than the batch rate: the stream never ends
    # x1, not the batch x10: at x10 every touched id's bias walks ~0.03 a step, and the CI delay evaluation's FNW
    # learner closed 16 % of the naive-to-oracle CVR gap instead of 28 % (delay curve 55 % instead of 70 %).
    online_wide_learning_rate_scale: float = 1.0
    publish_every_s: float = 10.0
    # Online promotion gate: a version is promoted when its progressive CTR log loss over the newest
    # ``online_gate_window`` examples is at most the promoted version's on the same examples x (1 + margin),
    # with at least ``online_gate_min_examples`` of them.
    online_gate_margin: float = 0.01
    online_gate_min_examples: int = 500
    online_gate_window: int = 5_000
    # Online optimisation: dense gradients clipped to this L2 norm; the learning rate warms up linearly over
    # ``online_warmup_steps`` from the line's start (fresh Adam moments on a trained model), then, when
    # ``online_decay_steps`` > 0, decays as 1/sqrt(1 + step / online_decay_steps), never below
    # ``online_min_lr_factor`` x the base rate. Default: no decay: the stream never ends and the rate must keep
    # following drift (``make evaluate``'s online claims lost ground with a decay to 0.1 x over 2,000 steps).
    online_clip_norm: float = 10.0
    online_warmup_steps: int = 50
    online_decay_steps: int = 0
    online_min_lr_factor: float = 0.1
    # Registered online versions are deltas over the line's previous version, every this many over the batch root.
    online_delta_chain: int = 30
    # Served features kept by impression (from the prediction log) for this many days of event time.
    online_log_retention_days: int = 10
    # The online trainer's per-example state (repeat dropping, superseded labels) is kept this long past the last
    # time the joiner may emit an example of an impression (``WindowSettings.open_for_s``), then deleted.
    example_state_margin_s: float = 24 * 3600.0
    # The consumer group the online trainer commits its checkpointed positions to, for lag monitoring only.
    online_group_id: str = "online-trainer"
    # Delay correction the online trainer applies to what the joiner emits: naive, fnw or delay_curve.
    label_scheme: str = "fnw"
    device: str = "auto"  # auto (CUDA when present), cpu or cuda
    registry_subdir: str = "registry"
    # Circuit breaker and calibration: held-out share of the training data kept for post-hoc calibration.
    calibration_share: float = 0.1


class ServingSettings(BaseModel):
    """Scoring and the auction, prediction logging, the circuit breaker and the A/B experiment."""

    host: str = "127.0.0.1"
    port: int = 18080
    # Registry polled this often for a new promoted model (swapped in without dropping a request).
    reload_every_s: float = 1.0
    # Auction: eCPM = bid x pCTR x pCVR x (1 - pNeg) ** quality_exponent, x 1000; reserve price per conversion.
    quality_exponent: float = 1.0
    reserve_ecpm: float = 0.0
    # Frequency cap: at most this many impressions of one campaign per user per UTC day (Redis counters).
    frequency_cap: int = 5
    # Exploration: ads with fewer impressions than ``new_ad_impressions`` are new; on ``explore_share`` of
    # requests their pCTR is a Thompson sample from Beta(prior at the model's pCTR, ``prior_strength``).
    explore_share: float = 0.05
    new_ad_impressions: int = 100
    prior_strength: float = 50.0
    # The funnel (trainers/preranker.py): the pre-ranker picks this many candidates by estimated eCPM for the
    # ranker (plus the new ads on an exploring request); 0, or a version without a pre-ranker: the ranker scores
    # every candidate.
    rank_top_k: int = 50
    # Prediction logging: bounded in-memory queue, then a bounded on-disk spool while Kafka is down.
    log_queue_records: int = 100_000
    log_spool_bytes: int = 256 * 1024 * 1024
    log_spool_subdir: str = "serving/spool"
    # Circuit breaker on a newly promoted model: roll back when PSI of served pCTR against the model's
    # training reference, or |log(mean predicted / observed)| per task, crosses these.
    psi_threshold: float = 0.25
    calibration_threshold: float = 0.4
    min_breaker_impressions: int = 2_000
    # A/B: users hash into ``buckets`` buckets; arm -> (first bucket, last bucket + 1, model version or
    # "promoted"). An empty experiment serves the promoted model to everyone.
    buckets: int = 1_000
    experiment_salt: str = "ab1"
    experiment: dict[str, tuple[int, int, str]] = Field(default_factory=dict)


class Settings(BaseSettings):
    """Everything configurable in the pipeline."""

    model_config = SettingsConfigDict(env_prefix="ADS_", env_nested_delimiter="__",
                                      env_file=os.environ.get("ADS_ENV_FILE", ".env"), extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    windows: WindowSettings = Field(default_factory=WindowSettings)
    spark: SparkSettings = Field(default_factory=SparkSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    # Feast project: the online store's keys end with it (tests use their own).
    feast_project: str = "adsstream"
    # Feast's online store: "redis" (what the scorer and the real-time worker use; a job fails loudly when it is
    # down) or "sqlite" (a local file nothing serves from: for offline experiments only, chosen explicitly).
    online_store: Literal["redis", "sqlite"] = "redis"
    # Local state: broker logs, Redis data, Delta tables, simulator runs.
    var_dir: Path = ROOT / "var"
    kafka_jar_dir: Path = ROOT / "infra" / "kafka" / "lib"
    spark_jar_dir: Path = ROOT / "infra" / "spark" / "lib"

    def to_env(self) -> dict[str, str]:
        """These settings as ``ADS_`` environment variables, for a child process (a worker, a job)."""
        env = {}
        for name, value in self.model_dump(mode="json").items():
            if isinstance(value, dict):
                env.update({f"ADS_{name}__{k}".upper(): _env_value(v) for k, v in value.items() if v is not None})
            elif value is not None:
                env[f"ADS_{name}".upper()] = str(value)
        return env

    @property
    def runs_dir(self) -> Path:
        return self.var_dir / "runs"

    @property
    def lake_dir(self) -> Path:
        return self.var_dir / "lake"

    @property
    def registry_dir(self) -> Path:
        return self.var_dir / self.trainer.registry_subdir


def _env_value(value: object) -> str:
    """A setting as pydantic-settings reads it back: JSON for lists and dicts."""
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
