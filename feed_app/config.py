"""All configuration in one place: environment variables, each overridable on the command line, and
the parsing of the values that are more than a number or a word (rates, networks, fan-out modes)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import os
import re
import socket
import urllib.parse
from collections.abc import Sequence

import uvloop

DEV_JWT_SECRET = "dev-secret-change-me"
MODES = ("session", "process")  # the fan-outs (feed_app/fanout.py says how each works)
# uvloop runs the event loop in C: a turn of it and each callback cost less than in the standard
# library's loop, written in Python, and a quiet post takes about seventeen turns (BENCHMARKS.md,
# "uvloop").
EVENT_LOOPS = {"uvloop": uvloop.EventLoopPolicy, "asyncio": asyncio.DefaultEventLoopPolicy}

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE = re.compile(r"\s*(\d{1,9})\s*/\s*(second|minute|hour|day|\d{1,9}(?:\.\d+)?)\s*")


@dataclasses.dataclass(frozen=True)
class Rate:
    """`count` actions per `period` seconds, in bursts of up to `count`."""

    count: int
    period: float

    def __str__(self) -> str:
        words = {seconds: word for word, seconds in _PERIODS.items()}
        return f"{self.count}/{words.get(self.period, f'{self.period:g}')}"


def rate(text: str) -> Rate:
    """'10/minute', '20/hour', '5/second', or a period in seconds: '30/90'."""
    match = _RATE.fullmatch(text)
    if not match:
        raise ValueError(f"not a rate: {text!r}")
    count, period = int(match[1]), _PERIODS.get(match[2]) or float(match[2])
    if count < 1 or period <= 0:
        raise ValueError(f"not a rate: {text!r}")
    return Rate(count, period)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(text: str) -> tuple[Network, ...]:
    """'10.0.0.5, 10.1.0.0/16, ::1': addresses and CIDR networks; ValueError for anything else."""
    return tuple(ipaddress.ip_network(part.strip()) for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class Settings:
    port: int = 8888
    host: str = "127.0.0.1"
    # No user: libpq logs in as the OS user, like psql (scripts/ensure-services checks that works).
    db_dsn: str = "postgresql://127.0.0.1:5432/feed"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    amqp_nodes_file: str = ""
    jwt_secret: str = DEV_JWT_SECRET
    # Access tokens live minutes: a copied one is good for no longer. The page stays logged in
    # through the refresh token (docs/api.md, "Tokens"), exchanged for the next at every use.
    access_token_ttl: int = 15 * 60
    refresh_token_ttl: int = 30 * 24 * 3600
    refresh_grace: float = 10.0
    workers: int = 1
    db_pool_size: int = 10
    history_size: int = 20
    # A session queue holds at most this many posts; past it the oldest is dropped and the
    # session is closed as too slow (the client resumes from the database).
    session_queue_max: int = 1000
    # Bytes written to a socket that the client has not read yet, past which it is closed 4008.
    socket_buffer_bytes: int = 1024 * 1024
    prefetch: int = 64
    fanout: str = "session"
    ping_interval: float = 20.0
    outbox_lease: float = 10.0
    shutdown_timeout: float = 10.0
    gc_young_threshold: int = 50_000
    event_loop: str = "uvloop"
    demo: bool = False
    # Limits (docs/limits.md): each a token bucket per key, or a count per process.
    login_rate_user: Rate = Rate(10, 60)
    login_rate_address: Rate = Rate(30, 60)
    register_rate: Rate = Rate(20, 3600)
    refresh_rate_address: Rate = Rate(60, 60)
    post_rate: Rate = Rate(30, 60)
    follow_rate: Rate = Rate(60, 60)
    # A socket binds once per followed author: the cap bounds its set-up (docs/limits.md).
    follow_max: int = 1000
    hash_workers: int = 1
    hash_queue: int = 16
    sockets_per_user: int = 10
    sockets_max: int = 10_000
    trusted_proxies: str = ""
    # Strict-Transport-Security on answers to requests that came over HTTPS (0: none). Browsers
    # then refuse plain HTTP to this host for that long, so a first visit is the only one a
    # network attacker can downgrade.
    hsts_max_age: int = 365 * 24 * 3600
    refusal_delay: float = 1.0
    instance_name: str = ""

    @property
    def uses_dev_secret(self) -> bool:
        return self.jwt_secret == DEV_JWT_SECRET

    @property
    def instance(self) -> str:
        """The name /metrics gives this instance: FEED_INSTANCE_NAME, else host:port (the host's
        name when listening on every interface)."""
        if self.instance_name:
            return self.instance_name
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"


# (field, environment variable, help). The command-line flag is the field name with dashes.
_OPTIONS = [
    ("port", "FEED_PORT", "HTTP port"),
    ("host", "FEED_HOST", "address to listen on"),
    ("db_dsn", "FEED_DB_DSN", "PostgreSQL DSN; the database is created if missing"),
    ("amqp_url", "FEED_AMQP_URL", "RabbitMQ URL; several, comma-separated, for a cluster"),
    (
        "amqp_nodes_file",
        "FEED_AMQP_NODES_FILE",
        "file of RabbitMQ URLs, one a line, re-read at each connection attempt",
    ),
    ("jwt_secret", "FEED_JWT_SECRET", "HS256 key for login tokens (a dev default warns)"),
    ("access_token_ttl", "FEED_ACCESS_TOKEN_TTL", "access token lifetime, seconds"),
    (
        "refresh_token_ttl",
        "FEED_REFRESH_TOKEN_TTL",
        "refresh token lifetime, seconds (each refresh starts it anew)",
    ),
    (
        "refresh_grace",
        "FEED_REFRESH_GRACE",
        "seconds a rotated refresh token still refreshes (tabs refreshing at once)",
    ),
    ("workers", "FEED_WORKERS", "processes sharing the port (0 = one per core)"),
    ("db_pool_size", "FEED_DB_POOL_SIZE", "database connections per process"),
    ("history_size", "FEED_HISTORY_SIZE", "posts a new feed socket gets without since="),
    ("fanout", "FEED_FANOUT", "session: a queue per socket; process: one queue per process"),
    ("session_queue_max", "FEED_SESSION_QUEUE_MAX", "posts buffered per session before 4008"),
    ("socket_buffer_bytes", "FEED_SOCKET_BUFFER_BYTES", "unread bytes per socket before 4008"),
    ("prefetch", "FEED_PREFETCH", "unacknowledged posts per session in flight"),
    ("ping_interval", "FEED_PING_INTERVAL", "websocket ping interval, seconds"),
    ("outbox_lease", "FEED_OUTBOX_LEASE", "seconds before another process republishes a post"),
    ("shutdown_timeout", "FEED_SHUTDOWN_TIMEOUT", "seconds a graceful shutdown may take"),
    ("gc_young_threshold", "FEED_GC_YOUNG_THRESHOLD", "allocations between young collections"),
    ("event_loop", "FEED_EVENT_LOOP", "uvloop, or asyncio for the standard library's loop"),
    ("login_rate_user", "FEED_LOGIN_RATE_USER", "login attempts per user id (N/minute, N/hour)"),
    ("login_rate_address", "FEED_LOGIN_RATE_ADDRESS", "login attempts per client address"),
    ("register_rate", "FEED_REGISTER_RATE", "registrations per client address"),
    ("refresh_rate_address", "FEED_REFRESH_RATE_ADDRESS", "token refreshes per client address"),
    ("post_rate", "FEED_POST_RATE", "posts, edits and deletes per user"),
    ("follow_rate", "FEED_FOLLOW_RATE", "follows and unfollows per user"),
    ("follow_max", "FEED_FOLLOW_MAX", "authors one user may follow"),
    ("hash_workers", "FEED_HASH_WORKERS", "password hashes computed at once per process"),
    ("hash_queue", "FEED_HASH_QUEUE", "password hashes waiting before 503"),
    ("sockets_per_user", "FEED_SOCKETS_PER_USER", "open feed sockets per user per process"),
    ("sockets_max", "FEED_SOCKETS_MAX", "open feed sockets per process before 503"),
    (
        "trusted_proxies",
        "FEED_TRUSTED_PROXIES",
        "proxies whose X-Forwarded-For and X-Forwarded-Proto are believed",
    ),
    ("hsts_max_age", "FEED_HSTS_MAX_AGE", "Strict-Transport-Security max-age over HTTPS (0: off)"),
    ("refusal_delay", "FEED_REFUSAL_DELAY", "seconds a 429 waits at most before it is sent"),
    ("instance_name", "FEED_INSTANCE_NAME", "this instance's name in /metrics (default host:port)"),
]

_CHOICES = {"fanout": MODES, "event_loop": EVENT_LOOPS}
_VARIABLES = {var for _, var, _ in _OPTIONS}


def setting_assignment(text: str) -> tuple[str, str]:
    """An argparse type for the tools that start the service with some of its settings changed
    (NAME=VALUE, repeatable): a name that is no setting fails at once instead of being ignored
    by the service."""
    name, sep, value = text.partition("=")
    if not sep or name not in _VARIABLES:
        raise argparse.ArgumentTypeError(
            f"FEED_NAME=VALUE with a setting of `run.py --help`, not {text!r}"
        )
    return name, value


def parse_settings(
    argv: Sequence[str] | None = None, env: dict[str, str] | None = None
) -> Settings:
    env = os.environ if env is None else env
    defaults = Settings()
    parser = argparse.ArgumentParser(
        description="Live news-feed service.",
        epilog="Every option falls back to its environment variable, then to the default shown.",
    )
    for field, var, text in _OPTIONS:
        default = getattr(defaults, field)
        kind = rate if isinstance(default, Rate) else type(default)
        if var in env:
            try:
                default = kind(env[var])
            except ValueError:
                parser.error(f"{var}={env[var]!r} is not a valid {kind.__name__}")
        choices = _CHOICES.get(field)
        if choices and default not in choices:
            parser.error(f"{var}={default!r} is not one of {', '.join(choices)}")
        if field == "jwt_secret":  # never printed; only whether one was given
            shown = "(set)" if default != DEV_JWT_SECRET else "(the development secret)"
        else:
            shown = str(default).replace("%", "%%")
        parser.add_argument(
            "--" + field.replace("_", "-"),
            type=kind,
            default=default,
            choices=choices,
            help=f"{text} [{var}, now {shown}]",
        )
    parser.add_argument("--demo", action="store_true", help="seed demo users and follows")
    settings = Settings(**vars(parser.parse_args(argv)))
    try:
        trusted_networks(settings.trusted_proxies)
    except ValueError as exc:
        parser.error(f"FEED_TRUSTED_PROXIES: {exc}")
    for field in (
        "access_token_ttl",
        "refresh_token_ttl",
        "hash_workers",
        "sockets_per_user",
        "sockets_max",
        "follow_max",
        "gc_young_threshold",
    ):
        if getattr(settings, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be at least 1")
    if settings.refresh_token_ttl <= settings.access_token_ttl:
        # A log-in whose refresh tokens have expired is deleted (db.create_login): none of its
        # access tokens may be alive by then.
        parser.error("--refresh-token-ttl must be longer than --access-token-ttl")
    for field in ("refusal_delay", "refresh_grace", "hsts_max_age"):
        if getattr(settings, field) < 0:
            parser.error(f"--{field.replace('_', '-')} must not be negative")
    return settings


def use_event_loop(name: str) -> None:
    """Have asyncio.run and Tornado create `name`'s loop (EVENT_LOOPS) from now on, in this
    process and in those it forks."""
    asyncio.set_event_loop_policy(EVENT_LOOPS[name]())


def redact_url(url: str) -> str:
    """The URL without its password, for logs; every URL of a comma-separated list."""
    return ",".join(_redact_one(one) for one in url.split(","))


def _redact_one(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
