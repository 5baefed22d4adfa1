"""``python -m infra.spark_standalone up|down|status``: a Spark standalone master and one worker on loopback.

Started from pyspark's own jars (``pyspark/bin/spark-class``: no separate Spark download), pid files and logs
under ``<var>/spark-standalone``. The batch jobs run on it unchanged with ``ADS_SPARK__MASTER=spark://
127.0.0.1:7077`` (:func:`standalone_settings`); the driver ships the Delta and Kafka jars to the executors
(``spark.jars``), and the executors run this virtual environment's Python (``PYSPARK_PYTHON``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from infra import process
from infra.settings import Settings, get_settings

HOST = "127.0.0.1"
MASTER_PORT = 7077
MASTER_UI_PORT = 8089
WORKER_UI_PORT = 8090
MASTER_URL = f"spark://{HOST}:{MASTER_PORT}"


def spark_class() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "bin" / "spark-class"


def standalone_settings(settings: Settings) -> Settings:
    """``settings`` with jobs submitted to the standalone master."""
    return settings.model_copy(update={"spark": settings.spark.model_copy(update={"master": MASTER_URL})})


class SparkStandalone:
    """The master and one worker (``cores`` cores, ``memory`` for executors)."""

    def __init__(self, settings: Settings | None = None, cores: int = 2, memory: str = "2g"):
        self.settings = settings or get_settings()
        self.home = self.settings.var_dir / "spark-standalone"
        self.cores, self.memory = cores, memory

    def _env(self) -> dict[str, str]:
        return {"SPARK_LOG_DIR": str(self.home / "logs"), "SPARK_WORKER_DIR": str(self.home / "work"),
                "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": HOST, "SPARK_NO_DAEMONIZE": "1"}

    def _start(self, name: str, cmd: list[str], port: int, timeout_s: float) -> None:
        pidfile = self.home / f"{name}.pid"
        if process.pid_of(pidfile) is not None:
            print(f"spark {name}: already running (pid {process.pid_of(pidfile)})")
            return
        if process.port_open(HOST, port):
            raise RuntimeError(f"spark {name}: port {port} is taken by a process this project did not start")
        self.home.mkdir(parents=True, exist_ok=True)
        pid = process.start_detached(cmd, pidfile, self.home / f"{name}.log", env=self._env())
        process.wait_until(lambda: process.port_open(HOST, port), timeout_s, f"spark {name}",
                           alive=lambda: process.pid_of(pidfile) is not None)
        print(f"spark {name}: pid {pid}, ready on port {port}", flush=True)

    def start(self, timeout_s: float = 90.0) -> None:
        java = str(spark_class())
        self._start("master", [java, "org.apache.spark.deploy.master.Master", "--host", HOST,
                               "--port", str(MASTER_PORT), "--webui-port", str(MASTER_UI_PORT)],
                    MASTER_PORT, timeout_s)
        self._start("worker", [java, "org.apache.spark.deploy.worker.Worker", MASTER_URL, "--host", HOST,
                               "--cores", str(self.cores), "--memory", self.memory,
                               "--webui-port", str(WORKER_UI_PORT)], WORKER_UI_PORT, timeout_s)

    def stop(self) -> None:
        for name in ("worker", "master"):
            stopped = process.stop(self.home / f"{name}.pid", f"spark {name}")
            print(f"spark {name}: {'stopped' if stopped else 'not running'}")

    def status(self) -> list[str]:
        return [f"spark {name}: " + (f"pid {pid}" if (pid := process.pid_of(self.home / f"{name}.pid")) else "down")
                for name in ("master", "worker")]


def main(argv: list[str] | None = None) -> int:
    service = SparkStandalone()
    return process.service_main(argv, "python -m infra.spark_standalone", __doc__, service.start, service.stop,
                                service.status)


if __name__ == "__main__":
    sys.exit(main())
