"""Edits and deletes: every open feed gets them live, a resume gets what it missed, a deleted
post never comes back, the outbox delivers a change whose publish was lost, and racing changes
end in the latest state. In both fan-out modes, against the real PostgreSQL and RabbitMQ.

A client keeps, per post id, the frame with the highest version (docs/websocket.md); `shown`
below is that rule, and every feed is also checked to carry each version at most once.
"""

from __future__ import annotations

import asyncio
import collections
import signal

import psycopg2
import pytest

from feed_app.config import Settings
from tests.conftest import AMQP_URL, both_fanout_modes, with_settings
from tests.faults import (
    TcpProxy,
    free_port,
    ids_of,
    outbox_ids,
    until,
    wait_for,
    with_endpoint,
)
from tests.support import Api, Feed, User

pytestmark = both_fanout_modes


@pytest.fixture
def settings(settings, amqp_proxy: TcpProxy, fanout_mode) -> Settings:
    """The in-process service reaches RabbitMQ through a proxy the outbox test cuts. (fanout_mode
    is named so that pytest sees this override depends on it, as the one it shadows does.)"""
    return with_settings(settings, amqp_url=amqp_proxy.url_for(settings.amqp_url))


# --- what a client makes of the frames ------------------------------------------------------------


def change_frames(feed: Feed) -> list[dict]:
    """Every post and deleted frame the feed got, before `ready` and after, in order of kind:
    (the history first); the version rule makes the order irrelevant."""
    posts = [{"type": "post", "post": post} for post in feed.history]
    return posts + [m for m in feed.messages if m["type"] in ("post", "deleted")]


def _id_and_version(frame: dict) -> tuple[int, int]:
    if frame["type"] == "deleted":
        return frame["id"], frame["version"]
    return frame["post"]["id"], frame["post"]["version"]


def versions(feed: Feed) -> list[int]:
    return [_id_and_version(frame)[1] for frame in change_frames(feed)]


def shown(feed: Feed) -> dict[int, dict | None]:
    """What a client shows: per post id the highest version's post, None once deleted."""
    latest: dict[int, tuple[int, dict | None]] = {}
    for frame in change_frames(feed):
        post_id, version = _id_and_version(frame)
        if post_id not in latest or version > latest[post_id][0]:
            latest[post_id] = (version, frame.get("post"))
    return {post_id: post for post_id, (_, post) in latest.items()}


def assert_no_version_twice(feed: Feed, label: str) -> None:
    twice = [v for v, n in collections.Counter(versions(feed)).items() if n > 1]
    assert not twice, f"{label}: versions sent twice on one socket: {twice}"


async def settle(api: Api, author: User, feeds: list[Feed], timeout: float = 10) -> int:
    """Post a marker and wait until every feed has it: whatever was on its way before it has
    arrived by then."""
    marker = (await api.post(author, "marker"))["id"]
    for n, feed in enumerate(feeds):
        await until(feed, lambda f=feed: marker in shown(f), timeout, f"marker on feed {n}")
    return marker


async def edit(api: Api, author: User, post_id: int, text: str) -> tuple[int, dict]:
    return await api.call("PUT", "/post/update", {"id": post_id, "text": text}, token=author.token)


async def delete(api: Api, author: User, post_id: int) -> tuple[int, dict]:
    return await api.call("PUT", f"/post/delete/{post_id}", token=author.token)


def stored(dsn: str, post_id: int) -> tuple:
    """The post's row as PostgreSQL holds it, read without the service."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT text, version, edited_at IS NOT NULL, deleted_at IS NOT NULL"
                " FROM posts WHERE id = %s",
                (post_id,),
            )
            return cur.fetchone()
    finally:
        conn.close()


# --- live, everywhere -----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=40)
async def test_an_edit_and_a_delete_reach_every_socket_of_every_follower_on_two_instances(
    api, service, processes
):
    """Two followers (one with three sockets) and the author's own two tabs, spread over two
    instances: an edit made on one instance and a delete made on the other reach all of them,
    each change once per socket, and leave every socket showing the latest state."""
    author, first, second = await api.new_user(), await api.new_user(), await api.new_user()
    for reader in (first, second):
        await api.follow(reader, author)
    elsewhere = processes()
    await elsewhere.start(ready="/readyz")
    remote = Api(elsewhere.base_url)
    kept, dropped = await api.post(author, "typo"), await api.post(author, "regret")
    feeds = [
        await api.open_feed(first),
        await api.open_feed(first),
        await remote.open_feed(first),
        await remote.open_feed(second),
        await api.open_feed(author),
        await remote.open_feed(author),
    ]
    for feed in feeds:
        assert {kept["id"], dropped["id"]} <= set(shown(feed)), "history before the changes"

    code, edited = await edit(remote, author, kept["id"], "fixed")
    assert code == 200 and edited["text"] == "fixed" and edited["edited_at"], edited
    assert edited["version"] > kept["version"] == kept["id"]
    code, deleted = await delete(api, author, dropped["id"])
    assert code == 200 and deleted == {
        "id": dropped["id"],
        "deleted": True,
        "version": deleted["version"],
    }
    await settle(api, author, feeds)

    for n, feed in enumerate(feeds):
        await until(feed, lambda f=feed: shown(f)[dropped["id"]] is None, 5, f"delete on {n}")
        view = shown(feed)
        assert view[kept["id"]] == edited, f"feed {n} shows {view[kept['id']]}"
        assert view[dropped["id"]] is None
        assert versions(feed).count(edited["version"]) == 1
        assert versions(feed).count(deleted["version"]) == 1
        assert_no_version_twice(feed, f"feed {n}")
        assert feed.close_code is None


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_client_offline_during_an_edit_and_a_delete_resumes_with_both(api, service):
    """The client's checkpoint is all it keeps: a resume from it brings the edit (new text,
    edited_at) and the delete made while it was away, nothing at or below the checkpoint, and
    each change once."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    kept, dropped = await api.post(author, "before"), await api.post(author, "to go")
    feed = await api.open_feed(reader)
    since = (await feed.wait_message("checkpoint"))["since"]
    feed.close()

    code, edited = await edit(api, author, kept["id"], "after")
    assert code == 200, edited
    code, deleted = await delete(api, author, dropped["id"])
    assert code == 200, deleted

    resumed = await api.open_feed(reader, since=since)
    frames = change_frames(resumed)
    assert {"type": "post", "post": edited} in frames
    assert {"type": "deleted", "id": dropped["id"], "version": deleted["version"]} in frames
    assert all(version > since for version in versions(resumed)), (since, frames)
    assert_no_version_twice(resumed, "resumed")
    view = shown(resumed)
    assert view[kept["id"]]["text"] == "after" and view[dropped["id"]] is None


@pytest.mark.gen_test(timeout=30)
async def test_a_deleted_post_never_reappears(api, service, db_dsn):
    """Once deleted, a post is in no new socket's history, no /post/feed page (paged one by
    one), no /post/get, and a resume from before it brings only its deleted frame. Its text is
    gone from the database; a second delete answers the same, an edit of it 404."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    first, gone, last = [await api.post(author, f"post {n}") for n in range(3)]
    code, deleted = await delete(api, author, gone["id"])
    assert code == 200, deleted

    assert stored(db_dsn, gone["id"]) == ("", deleted["version"], False, True)
    assert await delete(api, author, gone["id"]) == (200, deleted)
    assert (await edit(api, author, gone["id"], "back"))[0] == 404
    assert (await api.call("GET", f"/post/get/{gone['id']}"))[0] == 404

    feed = await api.open_feed(reader)
    assert ids_of(feed.history) == [first["id"], last["id"]]
    paged, before = [], ""
    while True:
        code, page = await api.call("GET", f"/post/feed?limit=1{before}", token=reader.token)
        assert code == 200, page
        if not page["posts"]:
            break
        paged += ids_of(page["posts"])
        before = f"&before={paged[-1]}"
    assert paged == [last["id"], first["id"]]

    resumed = await api.open_feed(reader, since=first["id"])
    assert change_frames(resumed) == [
        {"type": "deleted", "id": gone["id"], "version": deleted["version"]},
        {"type": "post", "post": last},
    ] or change_frames(resumed) == [
        {"type": "post", "post": last},
        {"type": "deleted", "id": gone["id"], "version": deleted["version"]},
    ]
    assert resumed.history == [last], "the deleted post's text is never sent"


# --- the outbox -----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_an_edit_whose_publish_failed_is_delivered_from_the_outbox(
    api, service, amqp_proxy, db_dsn
):
    """The broker goes away between the edit's commit and its publish: the edit waits in the
    outbox (a row of its own, although the post's first publish is long done) and reaches the
    open feed, once, when the broker is back."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    feed = await api.open_feed(reader)
    post = await api.post(author, "first")
    await until(feed, lambda: post["id"] in shown(feed), 5, "the post")

    amqp_proxy.disable()
    await wait_for(lambda: not service.fanout.is_ready, 5, "the service notices the outage")
    code, edited = await edit(api, author, post["id"], "second")
    assert code == 200, edited
    assert post["id"] in await outbox_ids(db_dsn), "the edit waits in the outbox"
    amqp_proxy.enable()

    await until(feed, lambda: shown(feed)[post["id"]] == edited, 10, "the edit, from the outbox")
    await settle(api, author, [feed])
    assert versions(feed).count(edited["version"]) == 1
    assert_no_version_twice(feed, "feed")


@pytest.mark.gen_test(timeout=30)
async def test_a_delete_of_a_killed_process_is_delivered_from_the_outbox(api, service, processes):
    """A delete committed by a process that dies before publishing it (it has no broker, then
    is SIGKILLed) reaches the open feed on another process once the row's lease runs out."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    post = await api.post(author, "soon gone")
    feed = await api.open_feed(reader)
    doomed = processes(
        FEED_AMQP_URL=with_endpoint(AMQP_URL, "127.0.0.1", free_port()),  # nothing listens there
        FEED_OUTBOX_LEASE="1",
    )
    await doomed.start()
    code, deleted = await delete(Api(doomed.base_url), author, post["id"])
    assert code == 200, deleted
    doomed.signal(signal.SIGKILL)
    assert await doomed.wait_exit(5) == -signal.SIGKILL

    await until(feed, lambda: shown(feed).get(post["id"], {}) is None, 10, "the orphaned delete")
    await settle(api, author, [feed])
    assert versions(feed).count(deleted["version"]) == 1


# --- someone else's post --------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_changing_someone_elses_post_is_403_and_changes_nothing(api, service, db_dsn):
    author, other = await api.new_user(), await api.new_user()
    await api.follow(other, author)
    post = await api.post(author, "mine")
    feed = await api.open_feed(other)
    before = stored(db_dsn, post["id"])

    assert (await edit(api, other, post["id"], "yours now"))[0] == 403
    assert (await delete(api, other, post["id"]))[0] == 403
    assert (await edit(api, other, 2**62, "nobody's"))[0] == 404
    assert (await delete(api, other, 2**62))[0] == 404

    assert stored(db_dsn, post["id"]) == before
    assert (await api.call("GET", f"/post/get/{post['id']}")) == (200, post)
    marker = await settle(api, author, [feed])
    assert [frame["post"]["id"] for frame in change_frames(feed)] == [post["id"], marker]


# --- races ----------------------------------------------------------------------------------------

RACERS = 6


@pytest.mark.gen_test(timeout=40)
async def test_racing_edits_end_in_the_latest_state_on_every_socket(api, service, processes):
    """Edits of one post sent at once through two instances: the one committed last has the
    highest version, and every socket ends showing it, whatever order the frames came in."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    elsewhere = processes()
    await elsewhere.start(ready="/readyz")
    remote = Api(elsewhere.base_url)
    post = await api.post(author, "v0")
    feeds = [
        await api.open_feed(reader),
        await remote.open_feed(reader),
        await api.open_feed(author),
    ]

    answers = await asyncio.gather(
        *(edit((api, remote)[n % 2], author, post["id"], f"v{n + 1}") for n in range(RACERS))
    )
    assert all(code == 200 for code, _ in answers), answers
    assert len({body["version"] for _, body in answers}) == RACERS
    _, final = await api.call("GET", f"/post/get/{post['id']}")
    assert final == max((body for _, body in answers), key=lambda body: body["version"])
    await settle(api, author, feeds)
    for n, feed in enumerate(feeds):
        await until(feed, lambda f=feed: shown(f)[post["id"]] == final, 5, f"latest on {n}")
        assert_no_version_twice(feed, f"feed {n}")


@pytest.mark.gen_test(timeout=40)
async def test_an_edit_racing_a_delete_ends_deleted_on_every_socket(api, service, processes):
    """An edit and a delete of one post at once, on two instances: the delete wins whichever
    commits first (an edit after it is a 404), on every socket and in the API."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    elsewhere = processes()
    await elsewhere.start(ready="/readyz")
    remote = Api(elsewhere.base_url)
    posts = [await api.post(author, f"p{n}") for n in range(RACERS)]
    feeds = [await api.open_feed(reader), await remote.open_feed(reader)]

    racing = []
    for n, post in enumerate(posts):  # half the races start with the edit, half with the delete
        pair = [edit(remote, author, post["id"], "edited"), delete(api, author, post["id"])]
        racing += pair if n % 2 else pair[::-1]
    answers = await asyncio.gather(*racing)
    assert all(code in (200, 404) for code, _ in answers), answers
    assert sum(code == 200 and "deleted" in body for code, body in answers) == RACERS
    await settle(api, author, feeds)
    for n, feed in enumerate(feeds):
        for post in posts:
            await until(feed, lambda f=feed, p=post: shown(f)[p["id"]] is None, 5, f"on {n}")
        assert_no_version_twice(feed, f"feed {n}")
    for post in posts:
        assert (await api.call("GET", f"/post/get/{post['id']}"))[0] == 404


@pytest.mark.gen_test(timeout=40)
async def test_a_delete_racing_a_resume_ends_deleted(api, service):
    """A client resumes while the author deletes and edits: whether a change lands before the
    resume's read, during it or after it (then live), the resumed socket ends in the latest
    state and carries each change once."""
    author, reader = await api.new_user(), await api.new_user()
    await api.follow(reader, author)
    posts = [await api.post(author, f"p{n}") for n in range(RACERS)]
    feed = await api.open_feed(reader)
    since = (await feed.wait_message("checkpoint"))["since"]
    feed.close()

    async def change_all() -> list[tuple[int, dict]]:
        answers = []
        for n, post in enumerate(posts):
            answers.append(await edit(api, author, post["id"], f"edited {n}"))
            if n % 2:
                answers.append(await delete(api, author, post["id"]))
        return answers

    resumed, answers = await asyncio.gather(api.open_feed(reader, since=since), change_all())
    assert all(code == 200 for code, _ in answers), answers
    await settle(api, author, [resumed])
    view = shown(resumed)
    for n, post in enumerate(posts):
        assert (view[post["id"]] is None) if n % 2 else view[post["id"]]["text"] == f"edited {n}"
    assert_no_version_twice(resumed, "resumed")
