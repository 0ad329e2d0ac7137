"""HAProxy's certificate: one the operator gives, or one made here for the local cluster.

HAProxy wants a single PEM file holding the server certificate, its chain and its private key.
An operator's (`scripts/cluster up --cert PATH`, or FEED_CLUSTER_CERT) is used as it is. Without
one, `local_certificate` makes a certificate authority of its own for this cluster with openssl,
signs a server certificate for localhost and 127.0.0.1 with it, and deletes the authority's key:
nothing can be signed with it afterwards. The authority is also name-constrained to localhost
and 127.0.0.0/8, so a client told to trust it (its ca.pem) trusts it for nothing else, even if
the file is left behind.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess

DAYS = 30  # a local cluster lives for hours; a new `up` makes a new authority
SERVER_NAMES = "DNS:localhost,IP:127.0.0.1"


class CertificateError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Certificate:
    pem: pathlib.Path  # certificate, chain and key: what HAProxy's `crt` reads
    ca: pathlib.Path | None  # the authority clients must trust; None for an operator's own


def openssl_binary() -> str:
    found = shutil.which("openssl")
    if found is None:
        raise CertificateError("openssl is not installed; run scripts/ensure-cluster-tools")
    return found


def _openssl(*args: str | pathlib.Path) -> None:
    result = subprocess.run([openssl_binary(), *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CertificateError(f"openssl {args[0]} failed:\n{result.stderr.strip()}")


def operator_certificate(path: pathlib.Path) -> Certificate:
    """The operator's PEM, checked to hold a certificate and a private key before HAProxy is
    given it (HAProxy's own message for a wrong file is less direct)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CertificateError(f"cannot read the certificate {path}: {exc}") from exc
    if "CERTIFICATE-----" not in text or "PRIVATE KEY-----" not in text:
        raise CertificateError(
            f"{path} must hold the certificate, its chain and the private key, all PEM"
        )
    return Certificate(path.resolve(), None)


def local_certificate(directory: pathlib.Path) -> Certificate:
    """A new authority (ca.pem) and a server certificate it signed (server.pem, with its key and
    the authority's certificate, mode 600) in directory."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # the keys are written here before they are gone or combined
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    key, request, cert, extensions = (
        directory / f"server.{suffix}" for suffix in ("key", "csr", "crt", "ext")
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    try:
        _openssl(
            "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", str(DAYS),
            "-subj", "/CN=feed local cluster CA",
            "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "nameConstraints=critical,permitted;DNS:localhost,"
            "permitted;IP:127.0.0.0/255.0.0.0",
        )  # fmt: skip
        _openssl("req", "-new", *ec, "-keyout", key, "-out", request, "-subj", "/CN=localhost")
        extensions.write_text(
            f"subjectAltName={SERVER_NAMES}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        )
        _openssl(
            "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-days", str(DAYS), "-sha256", "-extfile", extensions, "-out", cert,
        )  # fmt: skip
    finally:
        ca_key.unlink(missing_ok=True)
    pem = directory / "server.pem"
    pem.touch(mode=0o600)
    pem.write_text(cert.read_text() + ca.read_text() + key.read_text())
    for leftover in (key, request, cert, extensions, directory / "ca.srl"):
        leftover.unlink(missing_ok=True)
    directory.chmod(0o755)  # ca.pem is for every client; server.pem stays the owner's
    return Certificate(pem, ca)
