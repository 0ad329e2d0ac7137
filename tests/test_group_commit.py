"""Group commit of posts (feed_app/group_commit.py): posts asked for together share one statement
and one commit, and each request still gets its own answer."""

import asyncio
import collections

import psycopg2
import pytest

from feed_app import auth
from feed_app.db import UnknownUser
from tests.conftest import both_fanout_modes

pytestmark = both_fanout_modes

GHOST = 10**12  # below this run's block of user ids (conftest): no such user


def transactions_of(dsn: str, post_ids: list[int]) -> dict[int, int]:
    """Post id -> the id of the transaction that inserted it."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, xmin::text::bigint FROM posts WHERE id = ANY(%s)", (post_ids,))
        found = dict(cur.fetchall())
    conn.close()
    return found


@pytest.mark.gen_test(timeout=30)
async def test_posts_asked_in_one_turn_commit_together_and_an_unknown_author_fails_alone(
    api, service, settings
):
    """Proves: posts asked for in one loop turn, by several authors and one who does not exist,
    are one transaction; the unknown author's post fails alone with UnknownUser, the others
    are stored with versions in the order asked, and a follower's feed shows each once."""
    authors = [await api.new_user() for _ in range(3)]
    reader = await api.new_user()
    for author in authors:
        await api.follow(reader, author)
    feed = await api.open_feed(reader)
    asked = [(author.id, f"{author.id} #{n}") for n in range(4) for author in authors]
    asked.insert(5, (GHOST, "from nobody"))
    commits = service.metrics.post_commits

    results = await asyncio.gather(
        *(service.posts.create(author_id, text) for author_id, text in asked),
        return_exceptions=True,
    )

    assert service.metrics.post_commits == commits + 1
    ghost = results.pop(5)
    asked.pop(5)
    assert isinstance(ghost, UnknownUser), ghost
    assert [(post.author_id, post.text) for post in results] == asked
    assert len(set(transactions_of(settings.db_dsn, [post.id for post in results]).values())) == 1
    versions = collections.defaultdict(list)
    for post in results:
        versions[post.author_id].append(post.version)
    assert all(found == sorted(found) for found in versions.values()), versions
    shown = await feed.wait_posts(len(results))
    assert sorted(post["id"] for post in shown) == sorted(post.id for post in results)
    await asyncio.sleep(0.3)  # a duplicate would come right behind
    assert len(feed.posts) == len(results)


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_requests_each_get_their_own_post_and_a_ghost_its_401(
    api, service, settings
):
    """Proves: through HTTP, concurrent posts by several authors and by a validly signed token
    of a user who does not exist are answered each with its own post (201) or the ghost's 401,
    and every post reaches a follower once; the posts shared commits (fewer than posts)."""
    authors = [await api.new_user() for _ in range(4)]
    reader = await api.new_user()
    for author in authors:
        await api.follow(reader, author)
    feed = await api.open_feed(reader)
    ghost = auth.issue_token(GHOST, settings.jwt_secret, ttl=60)
    asked = [(author.token, f"{author.id} says {n}") for n in range(6) for author in authors]
    asked.insert(7, (ghost, "from nobody"))
    commits, created = service.metrics.post_commits, service.metrics.posts_created

    answers = await asyncio.gather(
        *(api.call("POST", "/post/create", {"text": text}, token=token) for token, text in asked)
    )

    assert answers.pop(7) == (401, {"error": "the user of this token does not exist"})
    asked.pop(7)
    assert [code for code, _ in answers] == [201] * len(asked)
    assert [body["text"] for _, body in answers] == [text for _, text in asked]
    by_author = {author.token: author.id for author in authors}
    assert [body["author_id"] for _, body in answers] == [by_author[t] for t, _ in asked]
    assert service.metrics.posts_created - created == len(asked)
    assert service.metrics.post_commits - commits < len(asked)
    shown = await feed.wait_posts(len(asked))
    assert sorted(post["id"] for post in shown) == sorted(body["id"] for _, body in answers)
    await asyncio.sleep(0.3)  # a duplicate would come right behind
    assert len(feed.posts) == len(asked)
