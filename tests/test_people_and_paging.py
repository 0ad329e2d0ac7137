"""Names on posts, finding people, the following list and feed pages by key, against the real
PostgreSQL and RabbitMQ."""

from __future__ import annotations

import random
import secrets

import pytest

from feed_app import db as db_module
from feed_app.db import Database
from feed_app.wire import MAX_ID
from tests.support import PASSWORD


@pytest.mark.gen_test(timeout=30)
async def test_posts_carry_the_author_name_everywhere(api, service):
    author, reader = await api.new_user("Maya Singh"), await api.new_user()
    await api.follow(reader, author)
    history = await api.post(author, "before the socket")
    assert history["author_name"] == "Maya Singh"
    feed = await api.open_feed(reader)
    live = await api.post(author, "while the socket is open")
    [received] = await feed.wait_posts(1)
    feed.close()

    assert feed.history == [history]
    assert received == live and live["author_name"] == "Maya Singh"
    assert await api.call("GET", f"/post/get/{live['id']}") == (200, live)
    code, body = await api.call("GET", "/post/feed", token=reader.token)
    assert code == 200 and body["posts"] == [live, history]


@pytest.mark.gen_test(timeout=30)
async def test_search_finds_people_by_a_prefix_of_their_name_ignoring_case(api):
    tag = f"Qz{secrets.token_hex(3)}"
    names = [
        f"{tag} Alina",
        f"{tag.lower()} alice",
        f"{tag.upper()} Bob",
        f"{tag}_x",
        "Élodie " + tag,
    ]
    ids = {}
    for name in names:
        code, body = await api.call("POST", "/user/register", {"name": name, "password": PASSWORD})
        assert code == 201
        ids[name] = body["user_id"]

    async def search(query: str, limit: int = 10) -> list[str]:
        path = f"/user/search?q={query}&limit={limit}".replace(" ", "%20")
        code, body = await api.call("GET", path)
        assert code == 200, body
        assert all(ids.get(user["name"]) == user["id"] for user in body["users"])
        return [user["name"] for user in body["users"]]

    # Ordered by the lower-cased name, whatever the case of the query.
    assert await search(f"{tag.upper()} AL") == [f"{tag.lower()} alice", f"{tag} Alina"]
    assert await search(tag.lower(), limit=2) == [f"{tag.lower()} alice", f"{tag} Alina"]
    assert len(await search(tag)) == 4
    # LIKE's wildcards are ordinary characters here.
    assert await search(f"{tag}%25") == []
    assert await search(f"{tag}_") == [f"{tag}_x"]
    assert await search("élodie " + tag.lower()) == ["Élodie " + tag]
    assert await search(f"{tag}zz") == []


@pytest.mark.gen_test(timeout=30)
async def test_following_list_names_whom_the_caller_follows(api):
    reader = await api.new_user("reader")
    authors = [await api.new_user(name) for name in ("zed", "Amy", "bea")]
    assert await api.call("GET", "/friend/list", token=reader.token) == (200, {"following": []})
    for author in authors:
        await api.follow(reader, author)
    await api.unfollow(reader, authors[0])
    code, body = await api.call("GET", "/friend/list", token=reader.token)
    assert code == 200
    assert body == {
        "following": [{"id": authors[1].id, "name": "Amy"}, {"id": authors[2].id, "name": "bea"}]
    }
    assert (await api.call("GET", "/friend/list"))[0] == 401


@pytest.mark.gen_test(timeout=60)
async def test_feed_pages_by_key_back_to_the_first_post(api):
    """Pages by before= cover the followed authors' and the caller's own posts exactly once,
    newest first; offset (bounded) skips within a page; unfollowed authors drop out."""
    reader, followed, other = await api.new_user(), await api.new_user(), await api.new_user()
    await api.follow(reader, followed)
    posts = []
    for n in range(25):
        posts.append(await api.post(followed if n % 5 else reader, f"post {n}"))
        await api.post(other, f"not followed {n}")
    expected = [post["id"] for post in reversed(posts)]

    seen, before = [], None
    while True:
        query = "/post/feed?limit=10" + ("" if before is None else f"&before={before}")
        code, body = await api.call("GET", query, token=reader.token)
        assert code == 200, body
        seen.extend(post["id"] for post in body["posts"])
        if len(body["posts"]) < 10:
            break
        before = body["posts"][-1]["id"]
    assert seen == expected

    query = f"/post/feed?limit=3&offset=2&before={expected[4]}"
    code, body = await api.call("GET", query, token=reader.token)
    assert [post["id"] for post in body["posts"]] == expected[7:10]
    await api.unfollow(reader, followed)
    code, body = await api.call("GET", "/post/feed?limit=100", token=reader.token)
    own = [post["id"] for post in reversed(posts) if post["author_id"] == reader.id]
    assert [post["id"] for post in body["posts"]] == own


@pytest.mark.gen_test(timeout=60)
async def test_both_ways_of_finding_a_feed_page_agree(db_dsn, monkeypatch):
    """FEED_PAGE_SQL finds a page either in the newest posts (when the followed authors post
    often) or from each author's newest post (otherwise): both give the same pages, which are
    what a plain filter and sort of every post gives, including authors with no posts, fewer
    authors than the page depth, offsets and before= anywhere."""
    db = await Database.connect(db_dsn, 2)
    try:
        users = [await db.create_user(f"paging {n}", "x") for n in range(9)]
        reader, followed, silent = users[0], users[1:5], users[5]
        for author in [*followed, silent]:
            await db.follow(reader, author, most=100, lease=60)
        rng = random.Random(11)
        writers = [*followed, reader, *users[6:]]  # most posts are by users the reader ignores
        weights = [1, 1, 1, 4, 1, 30, 30, 30]
        authors = rng.choices(writers, weights, k=160)
        posts = [(await db.insert_posts([(a, "x")], 60))[0] for a in authors]
        await db.delete_outbox([post.id for post in posts])  # nobody needs them published
        mine = [p.id for p in reversed(posts) if p.author_id in (reader, *followed)]
        cases = [(MAX_ID, 0, 20), (MAX_ID, 5, 3), (mine[6], 0, 4), (mine[-3], 0, 20), (1, 0, 5)]
        cases += [(MAX_ID, 100, 100), (mine[0] + 1, 0, 1), (mine[len(mine) // 2], 17, 9)]
        for window in (100, 0):  # 0: the newest-posts way never fills a page
            monkeypatch.setattr(db_module, "FEED_WINDOW_PER_POST", window)
            for before, offset, limit in cases:
                below = [post_id for post_id in mine if post_id < before]
                page = await db.feed_page(reader, before, offset, limit)
                assert [p.id for p in page] == below[offset : offset + limit], (window, before)
    finally:
        await db.close()


@pytest.mark.gen_test(timeout=30)
async def test_bad_paging_and_search_input_is_refused(api, db_counts):
    user = await api.new_user()
    before = db_counts()
    cases = [
        "/user/search",
        "/user/search?q=",
        "/user/search?q=%20%20",
        "/user/search?q=" + "a" * 65,
        "/user/search?q=a&limit=0",
        "/user/search?q=a&limit=51",
        "/user/search?q=a&limit=x",
        "/post/feed?before=0",
        "/post/feed?before=-5",
        "/post/feed?before=abc",
        f"/post/feed?before={2**63}",
        "/post/feed?offset=101",
        "/post/feed?limit=101",
    ]
    for path in cases:
        code, body = await api.call("GET", path, token=user.token)
        assert code == 400 and isinstance(body["error"], str), (path, code, body)
    assert db_counts() == before
