"""``python -m infra.kafka_cluster up|down|status``: a 3-node Apache Kafka KRaft cluster on loopback.

The same jars and the same :class:`infra.kafka_broker.KafkaBroker` as the single broker, three times: each
node is broker and controller (a 3-voter quorum), on ports ``CLUSTER_PORT`` + 0, 1, 2 (controllers
``CLUSTER_CONTROLLER_PORT`` + 0, 1, 2), storage under ``<var>/kafka-cluster/node<i>``, formatted with one
cluster id. Topics are replicated 3 times with ``min.insync.replicas=2``: a transactional producer's
``acks=all`` write survives one node killed. :func:`cluster_settings` gives the settings a pipeline uses
against it (``make cluster`` runs the label joiner on it with one node killed mid-run).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from infra import process
from infra.kafka_broker import KafkaBroker
from infra.settings import Settings, get_settings

NODES = 3
CLUSTER_PORT = 29092
CLUSTER_CONTROLLER_PORT = 29192
CLUSTER_ID = "YWRzc3RyZWFtLWtyYWZ0IQ"  # fixed: the nodes must agree (base64url of 16 bytes, "adsstream-kraft!")


def cluster_settings(settings: Settings, nodes: int = NODES) -> Settings:
    """``settings`` pointed at the cluster: every node's address, replication factor ``min(3, nodes)``."""
    bootstrap = ",".join(f"127.0.0.1:{CLUSTER_PORT + i}" for i in range(nodes))
    kafka = settings.kafka.model_copy(update={"bootstrap_servers": bootstrap,
                                              "replication_factor": min(3, nodes), "heap": "512m"})
    return settings.model_copy(update={"kafka": kafka})


class KafkaCluster:
    """Start, stop, kill and restart the nodes of the local cluster."""

    def __init__(self, settings: Settings | None = None, nodes: int = NODES):
        self.settings = cluster_settings(settings or get_settings(), nodes)
        voters = {i + 1: (CLUSTER_PORT + i, CLUSTER_CONTROLLER_PORT + i) for i in range(nodes)}
        home = self.settings.var_dir / "kafka-cluster"
        self.nodes = [KafkaBroker(self.settings, node_id=n, port=p, controller_port=c, voters=voters,
                                  home=home / f"node{n}", cluster_id=CLUSTER_ID)
                      for n, (p, c) in voters.items()]

    def start(self, timeout_s: float = 120.0) -> None:
        """Start every node that is down, then wait until all answer (a node needs its quorum to start)."""
        for node in self.nodes:
            if node.pid() is None:
                node.start(wait=False)
        for node in self.nodes:
            process.wait_until(node.ready, timeout_s, f"kafka node {node.node_id}", interval_s=0.5,
                               alive=lambda node=node: node.pid() is not None)
        print(f"kafka cluster: {len(self.nodes)} nodes ready on {self.settings.kafka.bootstrap_servers}", flush=True)

    def kill(self, node_id: int) -> None:
        """kill -9 one node (a crash: no controlled shutdown, no leadership handed over first)."""
        node = self.nodes[node_id - 1]
        pid = node.pid()
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while node.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
        print(f"kafka cluster: node {node_id} killed", flush=True)

    def restart(self, node_id: int, timeout_s: float = 120.0) -> None:
        self.nodes[node_id - 1].start(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def status(self) -> list[str]:
        return [node.status() for node in self.nodes]


def main(argv: list[str] | None = None) -> int:
    service = KafkaCluster()
    return process.service_main(argv, "python -m infra.kafka_cluster", __doc__, service.start, service.stop,
                                service.status)


if __name__ == "__main__":
    sys.exit(main())
