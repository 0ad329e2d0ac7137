"""HAProxy with a certificate in front of one service, the way `scripts/cluster up` puts it in
front of its instances (deploy/balancer.py, deploy/certificates.py): for the TLS tests and the
page over wss://."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import pathlib
import ssl
import subprocess

from deploy.balancer import Balancer
from deploy.certificates import Certificate, openssl_binary
from tests.faults import free_port


def front(directory: pathlib.Path, certificate: Certificate, instance_port: int) -> Balancer:
    """HAProxy's configuration, on two free ports (plain HTTP, HTTPS), before the service on
    instance_port; start() starts it."""
    balancer = Balancer(free_port(), free_port(), directory, certificate, hard_stop_after="3s")
    balancer.write_config({"instance": instance_port})
    return balancer


async def wait_up(balancer: Balancer, timeout: float = 10) -> None:
    """Until HAProxy's checks see the service UP. A service on the test's own loop answers its
    checks only while a test runs, so a test waits for this before its first request."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not all(state.startswith("UP") for state, _ in balancer.server_states().values()):
        assert asyncio.get_running_loop().time() < deadline, balancer.server_states()
        await asyncio.sleep(0.05)


def certificate_of(pem: pathlib.Path) -> bytes:
    """The first certificate of a PEM file (the server's), DER."""
    text = pem.read_text()
    begin = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(text[begin:end])


def spki_sha256(pem: pathlib.Path) -> str:
    """base64 SHA-256 of the server certificate's public key (its SubjectPublicKeyInfo), as
    Chromium's --ignore-certificate-errors-spki-list takes it."""
    public_key = subprocess.run(
        [openssl_binary(), "x509", "-pubkey", "-noout", "-in", str(pem)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # PEM "PUBLIC KEY": the SubjectPublicKeyInfo, base64
    der = base64.b64decode("".join(public_key.strip().splitlines()[1:-1]))
    return base64.b64encode(hashlib.sha256(der).digest()).decode()
