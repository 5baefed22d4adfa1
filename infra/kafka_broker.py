"""A single-node Apache Kafka broker in KRaft mode, run from the jars in infra/kafka/lib.

Broker and controller share one process on 127.0.0.1 (``process.roles=broker,controller``). Storage is
formatted once; later starts reuse it, so topics and offsets survive ``make down`` / ``make up``.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from infra import process
from infra.jars import ensure_kafka_jars
from infra.settings import Settings

LOG4J2 = """\
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class KafkaBroker:
    """Start / stop / inspect the local broker described by ``settings``: by default the single node on the
    first bootstrap address; with ``node_id``, ``voters`` and ``cluster_id``, one node of a cluster
    (``infra.kafka_cluster``), each node both broker and controller, internal topics replicated to
    ``min(3, len(voters))`` with a minimum ISR one less."""

    def __init__(self, settings: Settings, node_id: int = 1, port: int | None = None,
                 controller_port: int | None = None, voters: dict[int, tuple[int, int]] | None = None,
                 home: Path | None = None, cluster_id: str | None = None):
        self.settings = settings
        self.node_id = node_id
        self.home = home or settings.var_dir / "kafka"
        self.data_dir = self.home / "data"
        self.pidfile = self.home / "kafka.pid"
        self.logfile = self.home / "stdout.log"
        host, _, first = settings.kafka.bootstrap_servers.split(",")[0].rpartition(":")
        self.host, self.port = host, port or int(first)
        self.controller_port = controller_port or settings.kafka.controller_port
        self.voters = voters or {node_id: (self.port, self.controller_port)}  # node -> (port, controller port)
        self.fixed_cluster_id = cluster_id

    # -- files -------------------------------------------------------------------------------------
    def _server_properties(self) -> str:
        k = self.settings.kafka
        replicas = min(3, len(self.voters))
        min_isr = max(1, replicas - 1)
        voters = ",".join(f"{n}@{self.host}:{c}" for n, (_, c) in sorted(self.voters.items()))
        name = "SASL_PLAINTEXT" if self.scram else "PLAINTEXT"
        sasl = []
        if self.scram:
            mechanism = k.sasl_mechanism
            sasl = [f"sasl.enabled.mechanisms={mechanism}", f"sasl.mechanism.inter.broker.protocol={mechanism}",
                    f"listener.name.sasl_plaintext.{mechanism.lower()}.sasl.jaas.config="
                    f"org.apache.kafka.common.security.scram.ScramLoginModule required "
                    f'username="{k.sasl_username}" password="{k.sasl_password}";']
        return "\n".join([
            "process.roles=broker,controller",
            f"node.id={self.node_id}",
            f"controller.quorum.voters={voters}",
            f"listeners={name}://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            f"advertised.listeners={name}://{self.host}:{self.port}",
            "controller.listener.names=CONTROLLER",
            f"inter.broker.listener.name={name}",
            f"listener.security.protocol.map=CONTROLLER:PLAINTEXT,{name}:{name}",
            *sasl,
            f"log.dirs={self.data_dir}",
            f"num.partitions={k.default_partitions}",
            "auto.create.topics.enable=true",
            f"default.replication.factor={replicas}",
            f"min.insync.replicas={min_isr}",
            f"offsets.topic.replication.factor={replicas}",
            "offsets.topic.num.partitions=4",
            f"transaction.state.log.replication.factor={replicas}",
            f"transaction.state.log.min.isr={min_isr}",
            f"share.coordinator.state.topic.replication.factor={replicas}",
            f"share.coordinator.state.topic.min.isr={min_isr}",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.check.interval.ms=60000",
            "",
        ])

    @property
    def scram(self) -> bool:
        """Clients and brokers authenticate with SASL/SCRAM (``ADS_KAFKA__SECURITY_PROTOCOL=SASL_PLAINTEXT``,
        ``ADS_KAFKA__SASL_MECHANISM=SCRAM-SHA-256`` or ``-512``, user and password): the user is created when
        the storage is formatted, and the controller listener stays on loopback without SASL."""
        k = self.settings.kafka
        return k.security_protocol == "SASL_PLAINTEXT" and (k.sasl_mechanism or "").startswith("SCRAM")

    def _write_config(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        props = self.home / "server.properties"
        props.touch(mode=0o600)
        props.chmod(0o600)  # it holds the inter-broker SCRAM password
        props.write_text(self._server_properties())
        (self.home / "log4j2.properties").write_text(LOG4J2)
        return props

    def _java(self, main: str, *args: str) -> list[str]:
        jars = ensure_kafka_jars()
        return ["java", "-Xms256m", f"-Xmx{self.settings.kafka.heap}", "-XX:+UseG1GC",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.home / 'logs'}", "-cp", f"{jars}/*", main, *args]

    def _format_if_needed(self, props: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = self._cluster_id()
        print(f"kafka: formatting {self.data_dir} (cluster {cluster_id})", flush=True)
        k = self.settings.kafka
        scram = (["--add-scram", f"{k.sasl_mechanism}=[name={k.sasl_username},password={k.sasl_password}]"]
                 if self.scram else [])
        subprocess.run(self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(props),
                                  "--ignore-formatted", *scram), check=True, capture_output=True)

    def _cluster_id(self) -> str:
        if self.fixed_cluster_id:
            return self.fixed_cluster_id
        # KRaft wants a base64url UUID (22 chars); any random UUID will do. It may start with "-",
        # so it is passed as --cluster-id=<id>, never as a separate argument.
        import base64

        return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")

    # -- lifecycle ---------------------------------------------------------------------------------
    def pid(self) -> int | None:
        return process.pid_of(self.pidfile)

    def ready(self) -> bool:
        if not process.port_open(self.host, self.port):
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        config = {**self.settings.kafka.client_config(), "bootstrap_servers": [f"{self.host}:{self.port}"]}
        try:
            admin = KafkaAdminClient(**config, request_timeout_ms=3000)
        except KafkaError:
            return False
        try:
            admin.list_topics()
            return True
        except KafkaError:
            return False
        finally:
            admin.close()

    def start(self, timeout_s: float = 90.0, wait: bool = True) -> None:
        """Start the node (format its storage first, once); with ``wait``, until it answers (a cluster's nodes
        are started together, since a node waits for its controller quorum)."""
        if self.pid() is not None:
            process.wait_until(self.ready, timeout_s, "kafka", alive=lambda: self.pid() is not None)
            print(f"kafka: already running (pid {self.pid()}) on {self.host}:{self.port}")
            return
        if process.port_open(self.host, self.port):
            raise RuntimeError(f"kafka: port {self.port} is taken by a process this project did not start")
        props = self._write_config()
        self._format_if_needed(props)
        pid = process.start_detached(self._java("kafka.Kafka", str(props)), self.pidfile, self.logfile)
        print(f"kafka: node {self.node_id} started pid {pid} on {self.host}:{self.port}", flush=True)
        if not wait:
            return
        try:
            process.wait_until(self.ready, timeout_s, "kafka", interval_s=0.5,
                               alive=lambda: self.pid() is not None)
        except (RuntimeError, TimeoutError):
            print(f"kafka: see {self.home / 'logs' / 'server.log'} and {self.logfile}")
            raise
        print("kafka: ready")

    def stop(self) -> None:
        if process.stop(self.pidfile, "kafka", timeout_s=60):
            print("kafka: stopped")
        else:
            print("kafka: not running")

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return "kafka: down"
        return f"kafka: pid {pid}, {self.host}:{self.port} {'ready' if self.ready() else 'not ready'}"
