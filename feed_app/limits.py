"""Limits on every costly action, per process: token buckets for rates (logins, token refreshes,
registrations, posts, follow changes), a bounded pool for password hashing, and counts of open
feed sockets.

The buckets are our own rather than the `limits` package: its in-memory storage starts a timer
thread that rescans every key 10 ms after each hit and takes a lock per key, while this process
runs one event loop and needs only a dict lookup and a subtraction per request. A refusal raises
LimitExceeded, an ApiError that carries its Retry-After header.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ipaddress
import math
import time
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from feed_app.httpkit import ApiError

if TYPE_CHECKING:
    from feed_app.config import Rate, Settings
    from feed_app.metrics import Metrics

T = TypeVar("T")


class LimitExceeded(ApiError):
    def __init__(self, status: int, message: str, retry_after: float) -> None:
        self.retry_after = retry_after
        seconds = max(1, math.ceil(retry_after))
        super().__init__(status, message, headers={"Retry-After": str(seconds)})

    def get_message(self) -> None:
        """Tornado logs an HTTPError's message beside the access log line; a flood of refusals
        would log twice as much. The access log has every refusal."""
        return None


class SlowRefusals:
    """Answers a refusal past a rate or socket limit only after min(Retry-After, `delay`)
    seconds. A client that loops (sends its next attempt when the answer comes) then costs one
    request per `delay` instead of as many as the process can refuse, which took more CPU from
    delivery than the password hashes had (BENCHMARKS.md, "Hostile clients"). A waiting refusal
    holds only its connection; past `most` of them, refusals go out at once."""

    def __init__(self, delay: float, metrics: Metrics, most: int = 1000) -> None:
        self.delay = delay
        self.most = most
        self.held = 0
        self.metrics = metrics

    async def refuse(self, refusal: LimitExceeded) -> NoReturn:
        self.metrics.limit_refusals += 1
        wait = min(self.delay, refusal.retry_after)
        if wait > 0 and self.held < self.most:
            self.held += 1
            try:
                await asyncio.sleep(wait)
            finally:
                self.held -= 1
        raise refusal


class TokenBuckets:
    """One token bucket per key: `rate.count` tokens when full, refilled continuously at
    rate.count per rate.period. Full buckets are forgotten (at most once a period), so memory
    holds only the keys active within the last period."""

    def __init__(self, limit: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(limit.count)
        self.per_second = limit.count / limit.period
        self.period = limit.period
        self.clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, when)
        self._next_sweep = clock() + limit.period

    def wait(self, key: Hashable) -> float:
        """Seconds until `key` has a token: 0 when it has one now."""
        tokens = self._tokens(key, self.clock())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.per_second

    def take(self, key: Hashable) -> None:
        now = self.clock()
        self._buckets[key] = (self._tokens(key, now) - 1, now)
        if now >= self._next_sweep:
            self._forget_full(now)

    def _tokens(self, key: Hashable, now: float) -> float:
        tokens, when = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - when) * self.per_second)

    def _forget_full(self, now: float) -> None:
        self._next_sweep = now + self.period
        full = [key for key in self._buckets if self._tokens(key, now) >= self.capacity]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def address_key(address: str | None) -> str:
    """What one client is, for a per-address limit: its IPv4 address, or the /64 network of its
    IPv6 address (one subscriber usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class HashPool:
    """Password hashes (scrypt: tens of milliseconds of a core and 16 MiB each) run on at most
    `workers` threads, with at most `queue` more waiting; beyond that a login or registration is
    refused with 503 at once, so a flood cannot take more than `workers` cores from delivery."""

    def __init__(self, workers: int, queue: int, metrics: Metrics) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="password-hash"
        )
        self._capacity = workers + queue
        self._pending = 0
        self.metrics = metrics

    async def run(self, hash_function: Callable[..., T], *args: Any) -> T:
        if self._pending >= self._capacity:
            self.metrics.limit_refusals += 1
            raise LimitExceeded(503, "too many logins and registrations at once; retry", 1)
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, hash_function, *args)
        finally:
            self._pending -= 1
            self.metrics.password_hashes += 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SocketSlots:
    """Open feed sockets, counted from the moment a handshake passed its checks until the socket
    closes: at most `per_user` per user (a new one beyond that is refused with 429; the open ones
    are left alone) and `total` in the process (503: another instance may have room)."""

    # Sockets free up when clients close them, not on a timer: this is a back-off hint.
    RETRY_AFTER = 10

    def __init__(self, per_user: int, total: int, refusals: SlowRefusals) -> None:
        self.per_user = per_user
        self.total = total
        self.by_user: collections.Counter[int] = collections.Counter()
        self.open = 0
        self.refusals = refusals

    @asynccontextmanager
    async def slot(self, user_id: int) -> AsyncIterator[None]:
        """Hold a slot for the body's duration; LimitExceeded when none is free."""
        if self.open >= self.total:
            await self.refusals.refuse(
                LimitExceeded(
                    503, "this instance has no room for another feed socket", self.RETRY_AFTER
                )
            )
        if self.by_user[user_id] >= self.per_user:
            await self.refusals.refuse(
                LimitExceeded(
                    429, f"at most {self.per_user} open feed sockets per user", self.RETRY_AFTER
                )
            )
        self.open += 1
        self.by_user[user_id] += 1
        try:
            yield
        finally:
            self.open -= 1
            self.by_user[user_id] -= 1
            if not self.by_user[user_id]:
                del self.by_user[user_id]


class Limits:
    """Every limit of one process, built from the settings; handlers call one method per costly
    action before doing anything costly."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.login_by_user = TokenBuckets(settings.login_rate_user)
        self.login_by_address = TokenBuckets(settings.login_rate_address)
        self.registrations = TokenBuckets(settings.register_rate)
        self.refreshes = TokenBuckets(settings.refresh_rate_address)
        self.posts = TokenBuckets(settings.post_rate)
        self.follow_changes = TokenBuckets(settings.follow_rate)
        self.follow_max = settings.follow_max
        self.hashing = HashPool(settings.hash_workers, settings.hash_queue, metrics)
        self.refusals = SlowRefusals(settings.refusal_delay, metrics)
        self.sockets = SocketSlots(settings.sockets_per_user, settings.sockets_max, self.refusals)

    async def login_attempt(self, user_id: int, address: str | None) -> None:
        """Counts every attempt, right or wrong, before any hash: a guesser past the limit costs
        no hash. The user's own attempts are refused too while someone floods their id."""
        await self._take(
            (self.login_by_address, address_key(address), "login attempts from this address"),
            (self.login_by_user, user_id, "login attempts for this user id"),
        )

    async def refresh(self, address: str | None) -> None:
        """Counted before the refresh token is looked up, as a login attempt is before its hash:
        a guesser past the limit costs no database read."""
        await self._take(
            (self.refreshes, address_key(address), "token refreshes from this address")
        )

    async def registration(self, address: str | None) -> None:
        await self._take(
            (self.registrations, address_key(address), "registrations from this address")
        )

    async def post(self, user_id: int) -> None:
        await self._take((self.posts, user_id, "posts"))

    async def follow_change(self, user_id: int) -> None:
        await self._take((self.follow_changes, user_id, "follow changes"))

    async def _take(self, *limits: tuple[TokenBuckets, Hashable, str]) -> None:
        """Take a token from each bucket, or from none if one is empty."""
        for buckets, key, what in limits:
            wait = buckets.wait(key)
            if wait > 0:
                message = f"too many {what}; retry in {math.ceil(wait)} s"
                await self.refusals.refuse(LimitExceeded(429, message, wait))
        for buckets, key, _ in limits:
            buckets.take(key)
