"""The service's edge, before any handler runs: oversized bodies get a JSON 413 without being
read, secrets in query strings never reach a log, and the client's address and protocol are the
TCP connection's unless its peer is a trusted proxy."""

from __future__ import annotations

import ipaddress
import logging
import re
import urllib.parse

import tornado.httputil
import tornado.web

from feed_app.config import Network
from feed_app.httpkit import BODY_TOO_LARGE, MAX_BODY, error_body

access_log = logging.getLogger("tornado.access")

# Past this, Tornado itself drops the connection with an empty 400. Below it, a body over
# MAX_BODY gets a JSON 413 (a chunked body is only known once read: handlers.BaseHandler).
MAX_READ_BODY = 1024 * 1024
SECRET_QUERY_PARAMETERS = {"token", "ticket"}
_QUERY_PAIR = re.compile(r"([?&])([^=&\s#]+)=([^&\s#]*)")


def redact_query_secrets(text: str) -> str:
    """Mask the value of every query parameter whose name, decoded and in any case, names a
    secret: Tornado decodes names, so ?%74oken= is a token as much as ?token= is."""

    def mask(pair: re.Match) -> str:
        name = urllib.parse.unquote_plus(pair.group(2)).strip().lower()
        return f"{pair.group(1)}{pair.group(2)}=***" if name in SECRET_QUERY_PARAMETERS else pair[0]

    return _QUERY_PAIR.sub(mask, text)


class RedactTokens(logging.Filter):
    """Feed tokens travel in the query string (browsers cannot set headers on a websocket), and
    Tornado logs the URI in its access log and with every uncaught exception: mask them there."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "=" in message:
            record.msg, record.args = redact_query_secrets(message), ()
        return True


for _logger in ("tornado.access", "tornado.application", "tornado.general"):
    logging.getLogger(_logger).addFilter(RedactTokens())


class RefuseLargeBodies(tornado.httputil.HTTPMessageDelegate):
    """Answers a request whose Content-Length is over the cap with a JSON 413 before its body is
    read, then closes the connection (the unread body makes it unusable)."""

    def __init__(
        self,
        delegate: tornado.httputil.HTTPMessageDelegate,
        connection: tornado.httputil.HTTPConnection,
    ) -> None:
        self.delegate = delegate
        self.connection = connection

    def headers_received(self, start_line, headers):  # type: ignore[no-untyped-def]
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            self._refuse(start_line)
            return None
        return self.delegate.headers_received(start_line, headers)

    def _refuse(self, start_line: tornado.httputil.RequestStartLine) -> None:
        body = error_body(BODY_TOO_LARGE)
        head = (
            "HTTP/1.1 413 Payload Too Large\r\n"
            "Content-Type: application/json; charset=UTF-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        stream = self.connection.detach()  # allowed in headers_received: HTTP handling stops
        stream.write(head.encode() + body).add_done_callback(lambda _: stream.close())
        access_log.warning("413 %s %s", start_line.method, redact_query_secrets(start_line.path))

    def data_received(self, chunk: bytes):  # type: ignore[no-untyped-def]
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def _is_trusted(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, trusted: tuple[Network, ...]
) -> bool:
    return ip is not None and any(ip in network for network in trusted)


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The client's address: the TCP peer's, unless the peer is a trusted proxy; then the
    right-most address of X-Forwarded-For that is not a trusted proxy itself (each proxy appends
    the address it got the request from, so entries left of the last untrusted one may be forged
    by the client)."""
    address = peer
    if not (forwarded_for and _is_trusted(_ip(peer), trusted)):
        return address
    for entry in reversed(forwarded_for.split(",")):
        ip = _ip(entry)
        if ip is None:  # a garbled entry: nothing left of it can be trusted
            return address
        address = str(ip)
        if not _is_trusted(ip, trusted):
            return address
    return address


def client_protocol(
    peer: str, protocol: str, forwarded_proto: str | None, trusted: tuple[Network, ...]
) -> str:
    """ "http" or "https" as the client spoke it: the connection's own, unless the peer is a
    trusted proxy that says otherwise in X-Forwarded-Proto (a TLS front such as HAProxy talks
    plain HTTP to the instances). Anyone else could claim https and get what only a TLS client
    should (Strict-Transport-Security, Secure cookies). A proxy's value that is neither word is
    ignored too."""
    if forwarded_proto is None or not _is_trusted(_ip(peer), trusted):
        return protocol
    claimed = forwarded_proto.split(",")[-1].strip().lower()  # the nearest proxy's, if several
    return claimed if claimed in ("http", "https") else protocol


class FeedApplication(tornado.web.Application):
    """Its settings take `trusted_proxies`, a tuple of networks (config.trusted_networks)."""

    def start_request(self, server_conn, request_conn):  # type: ignore[no-untyped-def]
        return RefuseLargeBodies(super().start_request(server_conn, request_conn), request_conn)

    def find_handler(self, request, **kwargs):  # type: ignore[no-untyped-def]
        # Called once per request before any handler: from here on, remote_ip (used by limits
        # and the access log) is the client's, and protocol the one the client spoke. The HTTP
        # server runs without xheaders (which believes every peer), so both start as the TCP
        # connection's and no client can set them by a header.
        peer, headers = request.remote_ip, request.headers
        trusted = self.settings.get("trusted_proxies", ())
        request.remote_ip = client_address(peer, headers.get("X-Forwarded-For"), trusted)
        request.protocol = client_protocol(
            peer, request.protocol, headers.get("X-Forwarded-Proto"), trusted
        )
        return super().find_handler(request, **kwargs)
