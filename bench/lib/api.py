"""The feed's HTTP API as a user sees it: register, log in, follow, post, and the delay of one post
from POST /post/create into two open sessions of a follower (login_flood.py, quiet and under a
flood). A service started to be measured must allow the posts (service.UNLIMITED)."""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect


async def call(
    base: str, method: str, path: str, body: dict | None = None, token: str = ""
) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = HTTPRequest(base + path, method, headers=headers, body=json.dumps(body or {}))
    return json.loads((await AsyncHTTPClient().fetch(request)).body)


async def new_user(base: str) -> tuple[int, str]:
    password = secrets.token_hex(8)
    user_id = (await call(base, "POST", "/user/register", {"name": "bench", "password": password}))[
        "user_id"
    ]
    token = (await call(base, "POST", "/login", {"id": user_id, "password": password}))["token"]
    return user_id, token


async def follower_feed(base: str) -> tuple[str, str]:
    """A new author (its token) and the feed socket URL of a new user who follows it."""
    (author, author_token), (follower, follower_token) = await new_user(base), await new_user(base)
    await call(base, "PUT", f"/friend/set/{author}", token=follower_token)
    return author_token, feed_url(base, follower, follower_token)


def feed_url(base: str, user_id: int, token: str) -> str:
    return base.replace("http", "ws", 1) + f"/post/feed/{user_id}?token={token}"


async def open_follower(base: str) -> tuple[str, list]:
    """An author (its token) and a follower with two open sessions, both past `ready`."""
    author_token, ws_url = await follower_feed(base)
    sessions = [await websocket_connect(ws_url) for _ in range(2)]
    for ws in sessions:
        while json.loads(await ws.read_message())["type"] != "ready":
            pass
    return author_token, sessions


async def delays(base: str, author_token: str, sessions: list, count: int) -> list[float]:
    """Seconds from each POST to its arrival on each session; one post at a time."""
    measured: list[float] = []
    for i in range(count):
        started = time.perf_counter()
        post = await call(base, "POST", "/post/create", {"text": f"delay {i}"}, author_token)
        for ws in sessions:
            message = {"type": None}
            while message["type"] != "post":  # checkpoints come now and then too
                message = json.loads(await asyncio.wait_for(ws.read_message(), 5))
            assert message["post"]["id"] == post["id"], message
            measured.append(time.perf_counter() - started)
    return measured


def describe(seconds: list[float]) -> str:
    ms = sorted(d * 1000 for d in seconds)
    return (
        f"median {statistics.median(ms):.2f} ms, p90 {ms[int(len(ms) * 0.9)]:.2f} ms, "
        f"worst {ms[-1]:.2f} ms"
    )
