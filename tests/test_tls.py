"""TLS at the front: HAProxy with a certificate before the service, as `scripts/cluster up` runs
it (tests/tls_front.py), and what the instances make of X-Forwarded-Proto.

Proves: the API over HTTPS and the feed over WSS work through HAProxy with the certificate of
the cluster's own authority (and a client that does not trust it is refused); plain HTTP gets a
308 to the same path on HTTPS; an instance believes X-Forwarded-Proto from a trusted proxy only,
and sends Strict-Transport-Security only to what came over HTTPS; an operator's certificate is
the one served; the generated authority's key is gone once it has signed.
"""

from __future__ import annotations

import pathlib
import socket
import ssl
import subprocess
import sys

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from deploy.certificates import (
    Certificate,
    CertificateError,
    openssl_binary,
    operator_certificate,
)
from feed_app.config import Settings, trusted_networks
from feed_app.edge import client_protocol
from tests import cluster_tools
from tests.faults import free_port
from tests.support import PASSWORD, Api, refresh_cookie
from tests.tls_front import certificate_of, wait_up

HSTS = f"max-age={Settings.hsts_max_age}"
LOOPBACK = trusted_networks("127.0.0.1")


def test_client_protocol_believes_a_trusted_proxy_only():
    assert client_protocol("127.0.0.1", "http", "https", LOOPBACK) == "https"
    assert client_protocol("::ffff:127.0.0.1", "http", "https", LOOPBACK) == "https"
    assert client_protocol("127.0.0.1", "http", None, LOOPBACK) == "http"
    assert client_protocol("192.0.2.1", "http", "https", LOOPBACK) == "http"  # not trusted
    assert client_protocol("127.0.0.1", "http", "https", ()) == "http"  # nobody trusted
    assert client_protocol("127.0.0.1", "http", "javascript", LOOPBACK) == "http"
    # Several proxies, each appending: the nearest one's word counts.
    assert client_protocol("127.0.0.1", "http", "http, HTTPS", LOOPBACK) == "https"
    # An untrusted peer's claim changes nothing, downwards either.
    assert client_protocol("192.0.2.1", "https", "http", LOOPBACK) == "https"


@pytest.fixture
def instance(io_loop, processes):
    """The service as the cluster runs it behind HAProxy: its one trusted proxy is 127.0.0.1."""
    process = processes(FEED_TRUSTED_PROXIES="127.0.0.1")
    io_loop.run_sync(process.start)
    return process


def served_certificate(port: int, cafile: str | None) -> bytes:
    """The certificate HAProxy presents on port (DER), to a client that checks it against cafile
    (the system's authorities when None) and that it names 127.0.0.1."""
    context = ssl.create_default_context(cafile=cafile)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.getpeercert(binary_form=True)


@pytest.mark.gen_test(timeout=60)
async def test_api_over_https_and_the_feed_over_wss(instance, tls_front):
    front = tls_front(instance.port)
    api = Api(front.url, front.ca_certs)
    assert api.base_url.startswith("https://") and api.ws_url.startswith("wss://")
    author, reader = await api.new_user("author"), await api.new_user("reader")
    await api.follow(reader, author)
    feed = await api.open_feed(reader)
    post = await api.post(author, "over TLS both ways")
    assert [p["id"] for p in await feed.wait_posts(1)] == [post["id"]]
    feed.close()

    with pytest.raises(ssl.SSLCertVerificationError):  # not an authority the system trusts
        served_certificate(front.tls_port, None)


@pytest.mark.gen_test(timeout=60)
async def test_the_refresh_cookie_is_secure_over_https_only(instance, tls_front):
    """The instance learns that the login came over HTTPS from its trusted proxy only, and marks
    the refresh cookie Secure then; over plain HTTP to the instance it cannot be."""
    front = tls_front(instance.port)
    await wait_up(front)
    for api, secure in ((Api(front.url, front.ca_certs), True), (Api(instance.base_url), False)):
        user = await api.new_user()
        login = {"id": user.id, "password": PASSWORD}
        code, body, headers = await api.request("POST", "/login", login)
        assert code == 200, body
        morsel = refresh_cookie(headers.get_list("Set-Cookie"))
        assert morsel is not None and bool(morsel["secure"]) is secure, (api.base_url, morsel)


def test_the_generated_authority_is_for_loopback_and_lost_its_key(front_certificate: Certificate):
    directory = front_certificate.pem.parent
    assert sorted(path.name for path in directory.iterdir()) == ["ca.pem", "server.pem"]
    assert front_certificate.pem.stat().st_mode & 0o777 == 0o600
    text = front_certificate.pem.read_text()
    assert text.count("BEGIN CERTIFICATE") == 2 and "PRIVATE KEY" in text  # as HAProxy wants
    constraints = subprocess.run(
        [
            openssl_binary(),
            "x509",
            "-noout",
            "-ext",
            "nameConstraints",
            "-in",
            front_certificate.ca,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:localhost" in constraints and "IP:127.0.0.0/255.0.0.0" in constraints


@pytest.mark.gen_test(timeout=60)
async def test_plain_http_is_redirected_to_the_same_path_on_https(instance, tls_front):
    front = tls_front(instance.port)
    client = AsyncHTTPClient()
    for method, body in (("GET", None), ("POST", b"{}")):
        response = await client.fetch(
            f"{front.plain_url}/post/feed?limit=5",
            method=method,
            body=body,
            follow_redirects=False,
            raise_error=False,
        )
        assert response.code == 308, (method, response.code)
        assert response.headers["Location"] == f"{front.url}/post/feed?limit=5"


@pytest.mark.gen_test(timeout=60)
async def test_hsts_goes_with_https_only(instance, tls_front):
    front = tls_front(instance.port)
    await wait_up(front)
    client = AsyncHTTPClient()

    async def hsts(url: str, **headers: str) -> str | None:
        request = HTTPRequest(url, headers=headers, ca_certs=front.ca_certs)
        response = await client.fetch(request, raise_error=False)
        return response.headers.get("Strict-Transport-Security")

    assert await hsts(f"{front.url}/healthz") == HSTS
    assert await hsts(f"{front.url}/no/such/path") == HSTS  # errors too
    assert await hsts(f"{front.url}/") == HSTS  # the page
    # HAProxy replaces what the client says with what it saw.
    assert await hsts(f"{front.url}/healthz", **{"X-Forwarded-Proto": "http"}) == HSTS
    # Straight to the instance, plain HTTP: none, unless its trusted proxy says https.
    assert await hsts(f"{instance.base_url}/healthz") is None
    assert await hsts(f"{instance.base_url}/healthz", **{"X-Forwarded-Proto": "https"}) == HSTS


@pytest.mark.gen_test(timeout=30)
async def test_x_forwarded_proto_from_an_untrusted_peer_is_ignored(api, settings):
    assert settings.trusted_proxies == ""  # the in-process service trusts no proxy
    _, _, headers = await api.request("GET", "/healthz", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" not in headers


def self_signed(directory: pathlib.Path) -> pathlib.Path:
    """An operator's certificate for 127.0.0.1 (self-signed here), with its key, in one PEM."""
    key, cert = directory / "operator.key", directory / "operator.crt"
    subprocess.run(
        [
            openssl_binary(), "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "1", "-subj", "/CN=operator", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    pem = directory / "operator.pem"
    pem.write_text(cert.read_text() + key.read_text())
    return pem


def test_an_operators_certificate_is_the_one_served(tmp_path, tls_front):
    pem = self_signed(tmp_path)
    front = tls_front(free_port(), operator_certificate(pem))  # no instance: TLS ends at HAProxy
    assert front.ca_certs is None  # its clients trust its chain already
    served = served_certificate(front.tls_port, str(tmp_path / "operator.crt"))
    assert served == certificate_of(pem)

    no_key = tmp_path / "no-key.pem"
    no_key.write_text((tmp_path / "operator.crt").read_text())
    with pytest.raises(CertificateError, match="private key"):
        operator_certificate(no_key)


def test_the_cost_bench_runs(scratch_dsn):
    """bench/tls_front.py, tiny: both fronts measured (its figures are in BENCHMARKS.md)."""
    cluster_tools.ensure_cluster_tools()  # HAProxy
    completed = subprocess.run(
        [
            sys.executable,
            str(pathlib.Path(__file__).resolve().parent.parent / "bench" / "tls_front.py"),
            *("--connections", "20", "--sockets", "10", "--rounds", "1"),
            *("--db-dsn", scratch_dsn),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    rows = [line for line in output.splitlines() if line.startswith("| HTTP")]
    assert [row.split(" | ")[0] for row in rows] == ["| HTTP / WS", "| HTTPS / WSS"], output
