"""Redis over TLS (issue 21's security section): a local server started here serves TLS only, with a certificate
from a CA made here; every client the project makes (redis-py from the settings, Feast's connection string, the
bulk loader's raw socket) verifies it, and the password never reaches the process list."""

from __future__ import annotations

import random
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pandas as pd
import pytest
import redis

from infra.chaos import free_port
from infra.redis_server import RedisServer
from infra.settings import get_settings


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost: (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "adsstream test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
          .not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "redis.pem", folder / "redis.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


@pytest.fixture(scope="module")
def tls_settings(tmp_path_factory):
    home = tmp_path_factory.mktemp("redis-tls")
    ca, cert, key = _certificates(home)
    base = get_settings()
    r = base.redis.model_copy(update={"port": free_port(), "password": f"rp-{uuid.uuid4().hex}", "tls": True,
                                      "tls_ca_file": str(ca), "tls_cert_file": str(cert), "tls_key_file": str(key)})
    settings = base.model_copy(update={"var_dir": home, "redis": r, "feast_project": "tls"})
    server = RedisServer(settings)
    server.start()
    yield settings
    server.stop()


def test_clients_verify_the_server_and_plain_tcp_is_refused(tls_settings):
    r = tls_settings.redis
    client = r.client()
    assert client.ping() and client.set("k", "v") and client.get("k") == b"v"
    assert redis.Redis.from_url(r.url).get("k") == b"v"  # the URL form (rediss:// with the CA) works too
    with pytest.raises(redis.ConnectionError):  # the plain port is closed: TLS only
        redis.Redis(host=r.host, port=r.port, password=r.password, socket_timeout=2).ping()
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):  # a server nobody vouched for
        redis.Redis(host=r.host, port=r.port, password=r.password, ssl=True, socket_timeout=2).ping()
    pid = RedisServer(tls_settings).pid()
    assert r.password not in Path(f"/proc/{pid}/cmdline").read_text()  # the password is not in `ps`


def test_bulk_loader_and_feast_over_tls(tls_settings):
    from feature_repo.bulk import bulk_write
    from feature_repo.store import feature_store
    from schemas.features import AdFeatures
    from tests.test_online_store import random_row

    ad = random_row(AdFeatures, {"ad_id": 424_242}, random.Random(5), datetime.now(UTC))
    assert bulk_write(tls_settings, AdFeatures, pd.DataFrame([ad]), processes=1) == 1
    store = feature_store(tls_settings, "redis")
    got = store.get_online_features(features=["ad_features:ad_ctr_7d"], entity_rows=[{"ad_id": 424_242}]).to_dict()
    assert got["ad_ctr_7d"] == [pytest.approx(ad["ad_ctr_7d"])]  # Feast read it over TLS

    untrusted = tls_settings.model_copy(update={"redis": tls_settings.redis.model_copy(update={"tls_ca_file": None})})
    with pytest.raises(ssl.SSLCertVerificationError):
        bulk_write(untrusted, AdFeatures, pd.DataFrame([ad]), processes=1)
