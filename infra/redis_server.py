"""Redis from Debian's ``redis-server`` package, on 127.0.0.1, with an append-only file so that a
restart loses nothing that was acknowledged. With ``redis.username`` set, only that ACL user (and its
password) gets in; with a password alone, the default user needs it. With ``redis.tls`` it serves TLS only."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from infra import process
from infra.settings import Settings


class RedisServer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = settings.var_dir / "redis"
        self.pidfile = self.home / "redis.pid"
        self.logfile = self.home / "redis.log"

    def _binary(self) -> str:
        path = shutil.which("redis-server")
        if path is None:
            raise RuntimeError("redis-server not found: run `make install` (apt-get install redis-server)")
        return path

    def _write_acl(self) -> Path:
        """The ACL file: the default user off, the configured user on with every command and key. The password
        is stored as its SHA-256 (Redis' ``#<hash>`` form), never in clear."""
        r = self.settings.redis
        if not r.password:
            raise RuntimeError("redis: an ACL user needs a password (ADS_REDIS__PASSWORD)")
        digest = hashlib.sha256(r.password.encode()).hexdigest()
        path = self.home / "users.acl"
        path.write_text(f"user default off\nuser {r.username} on #{digest} ~* &* +@all\n")
        path.chmod(0o600)
        return path

    def _write_config(self) -> Path:
        """``redis.conf``: the default user's password (``requirepass``) when there is no ACL user, else empty."""
        r = self.settings.redis
        path = self.home / "redis.conf"
        path.write_text(f"requirepass {r.password}\n" if r.password and not r.username else "")
        path.chmod(0o600)
        return path

    def _listener_args(self) -> list[str]:
        """Plain TCP on ``port``, or with ``redis.tls`` TLS only on it (the plain port closed)."""
        r = self.settings.redis
        if not r.tls:
            return ["--port", str(r.port)]
        if not (r.tls_cert_file and r.tls_key_file):
            raise RuntimeError("redis: TLS needs a certificate and key "
                               "(ADS_REDIS__TLS_CERT_FILE, ADS_REDIS__TLS_KEY_FILE)")
        args = ["--port", "0", "--tls-port", str(r.port), "--tls-cert-file", r.tls_cert_file,
                "--tls-key-file", r.tls_key_file, "--tls-auth-clients", "no"]
        return args + (["--tls-ca-cert-file", r.tls_ca_file] if r.tls_ca_file else [])

    def pid(self) -> int | None:
        return process.pid_of(self.pidfile)

    def ready(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.settings.redis.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def start(self, timeout_s: float = 30.0) -> None:
        if self.pid() is not None:
            print(f"redis: already running (pid {self.pid()}) on port {self.settings.redis.port}")
            return
        r = self.settings.redis
        if process.port_open(r.host, r.port):
            raise RuntimeError(f"redis: port {r.port} is taken by a process this project did not start")
        self.home.mkdir(parents=True, exist_ok=True)
        # Secrets go into files only this user reads, never onto the command line (``ps`` shows it to everyone).
        cmd = [self._binary(), str(self._write_config()), "--bind", r.host, "--dir", str(self.home),
               "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
               "--protected-mode", "no" if r.password else "yes", *self._listener_args()]
        if r.username:
            cmd += ["--aclfile", str(self._write_acl())]
        pid = process.start_detached(cmd, self.pidfile, self.logfile)
        process.wait_until(self.ready, timeout_s, "redis", alive=lambda: self.pid() is not None)
        print(f"redis: started pid {pid} on {r.host}:{r.port}")

    def stop(self) -> None:
        if process.stop(self.pidfile, "redis"):
            print("redis: stopped")
        else:
            print("redis: not running")

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return "redis: down"
        return f"redis: pid {pid}, port {self.settings.redis.port} {'ready' if self.ready() else 'not ready'}"
