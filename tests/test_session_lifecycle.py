"""A session lives exactly as long as its socket: clients that hang up at any moment of the
handshake leave nothing behind, in the process or in RabbitMQ."""

import asyncio
import gc
import os
import socket
import struct
import weakref

import pytest

from feed_app.feed_socket import FeedSocketHandler
from tests.conftest import both_fanout_modes
from tests.support import upgrade_request


async def send(base_url: str, request: bytes) -> asyncio.StreamWriter:
    host, port = base_url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    return writer


def end(writer: asyncio.StreamWriter, how: str) -> None:
    """End the connection: FIN, RST or shutdown."""
    sock = writer.get_extra_info("socket")
    if how == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "shutdown":
        # On a duplicate of its descriptor: uvloop's transports refuse shutdown(), and it acts
        # on the connection, whichever descriptor asks.
        with socket.socket(fileno=os.dup(sock.fileno())) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)
    writer.close()


async def wait_for(condition, timeout: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("how", ["fin", "rst", "shutdown"])
async def test_hang_up_while_the_token_is_checked_leaves_no_session(api, service, monkeypatch, how):
    """The client is gone before the checks end: Tornado has already called on_close, and a
    session opened after that would never be closed (nor its queue deleted)."""
    user = await api.new_user()
    checking, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
    handlers: list[FeedSocketHandler] = []
    authorize, get = FeedSocketHandler._authorize, FeedSocketHandler.get

    async def gated_authorize(handler, user_id):
        handlers.append(handler)
        checking.set()
        await release.wait()
        await authorize(handler, user_id)

    async def observed_get(handler, user_id):
        try:
            await get(handler, user_id)
        finally:
            finished.set()

    monkeypatch.setattr(FeedSocketHandler, "_authorize", gated_authorize)
    monkeypatch.setattr(FeedSocketHandler, "get", observed_get)
    host = api.base_url.removeprefix("http://")
    path = f"/post/feed/{user.id}?token={user.token}"
    client = await send(api.base_url, upgrade_request(path, host))
    await asyncio.wait_for(checking.wait(), 5)
    end(client, how)
    await wait_for(lambda: handlers[0].client_gone)  # the server saw the hang-up
    release.set()
    await asyncio.wait_for(finished.wait(), 5)
    assert not service.sessions


@pytest.mark.gen_test(timeout=60)
async def test_many_hang_ups_at_any_moment_leave_no_session(api, service, monkeypatch):
    user = await api.new_user()
    finished = []
    get = FeedSocketHandler.get

    async def counted_get(handler, user_id):
        try:
            await get(handler, user_id)
        finally:
            finished.append(handler)

    monkeypatch.setattr(FeedSocketHandler, "get", counted_get)
    host = api.base_url.removeprefix("http://")
    request = upgrade_request(f"/post/feed/{user.id}?token={user.token}", host)
    for round_ in range(30):
        client = await send(api.base_url, request)
        await asyncio.sleep(0.001 * (round_ % 8))  # some land mid-check, some after the upgrade
        end(client, ("fin", "rst", "shutdown")[round_ % 3])
    await wait_for(lambda: len(finished) == 30, timeout=10)
    await wait_for(lambda: not service.sessions, timeout=10)


@both_fanout_modes
@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize("end", ["client close", "connection drop", "client message", "mid-sync"])
async def test_a_closed_session_is_freed_at_once_without_the_collector(api, service, end):
    """Reference counting alone frees a session once its socket is closed: the process tunes the
    collector for throughput (run.py), so a session kept alive by a cycle would stay for minutes.
    `mid-sync` closes the socket while the session still reads its history."""
    author, user = await api.new_user(), await api.new_user()
    await api.follow(user, author)
    for n in range(3):
        await api.post(author, f"history {n}")
    gc.disable()
    try:
        feed = await (api.open_feed(user) if end != "mid-sync" else api.open_feed_unready(user))
        await wait_for(lambda: len(service.sessions) == 1)
        [session] = service.sessions
        ref = weakref.ref(session)
        del session
        if end == "client close":
            feed.close()
        elif end == "connection drop":
            feed.ws.stream.close()
        elif end == "client message":
            feed.ws.write_message("hello?")
        else:
            feed.ws.stream.close()
        await wait_for(lambda: not service.sessions)
        await asyncio.sleep(0.05)  # let Tornado and pika finish with the connection
        await wait_for(lambda: ref() is None, timeout=2)
    finally:
        gc.enable()
