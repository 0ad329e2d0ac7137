"""Group commit of posts (feed_app/group_commit.py): posts asked for together share one statement
and one commit, and each request still gets its own answer."""

import asyncio
import collections

import psycopg2
import pytest

from feed_app import auth, group_commit
from feed_app.config import Settings
from feed_app.db import QUERY_TIMEOUT, DatabaseUnavailable, UnknownUser
from tests.conftest import both_fanout_modes, with_settings

pytestmark = both_fanout_modes

GHOST = 10**12  # below this run's block of user ids (conftest): no such user


@pytest.fixture
def settings(settings, pg_proxy, fanout_mode) -> Settings:
    # fanout_mode is named so that pytest sees this override depends on it (tests/test_recovery.py)
    return with_settings(settings, db_dsn=pg_proxy.url_for(settings.db_dsn))


def transactions_of(dsn: str, post_ids: list[int]) -> dict[int, int]:
    """Post id -> the id of the transaction that inserted it."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, xmin::text::bigint FROM posts WHERE id = ANY(%s)", (post_ids,))
        found = dict(cur.fetchall())
    conn.close()
    return found


def stored_texts(dsn: str, texts: list[str]) -> list[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT text FROM posts WHERE text = ANY(%s)", (texts,))
        found = [text for (text,) in cur.fetchall()]
    conn.close()
    return found


@pytest.mark.gen_test(timeout=30)
async def test_posts_asked_in_one_turn_commit_together_and_an_unknown_author_fails_alone(
    api, service, db_dsn
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
    assert len(set(transactions_of(db_dsn, [post.id for post in results]).values())) == 1
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


@pytest.mark.gen_test(timeout=30)
async def test_posts_asked_while_batches_are_at_postgresql_go_together_as_the_next(
    api, service, pg_proxy, db_dsn
):
    """Proves: while MOST_IN_FLIGHT batches wait on PostgreSQL, posts asked for in later turns
    wait too, and go as one batch, one transaction, when a batch returns; each still gets its
    own post."""
    author = await api.new_user()
    commits = service.metrics.post_commits
    pg_proxy.pause()
    ahead = []
    for n in range(group_commit.MOST_IN_FLIGHT):
        ahead.append(asyncio.ensure_future(service.posts.create(author.id, f"ahead {n}")))
        for _ in range(3):  # the batch is sent at the end of the turn it was asked in
            await asyncio.sleep(0)
    waiting = []
    for n in range(3):
        waiting.append(asyncio.ensure_future(service.posts.create(author.id, f"behind {n}")))
        await asyncio.sleep(0.01)  # each in a turn of its own
    await asyncio.sleep(0.1)
    assert not any(task.done() for task in ahead + waiting)
    pg_proxy.resume()

    posts = await asyncio.gather(*ahead, *waiting)
    assert [post.text for post in posts[-3:]] == [f"behind {n}" for n in range(3)]
    assert service.metrics.post_commits == commits + group_commit.MOST_IN_FLIGHT + 1
    transactions = transactions_of(db_dsn, [post.id for post in posts])
    assert len({transactions[post.id] for post in posts[-3:]}) == 1
    assert len(set(transactions.values())) == group_commit.MOST_IN_FLIGHT + 1


@pytest.mark.gen_test(timeout=30)
async def test_a_batch_whose_statement_fails_commits_none_and_fails_each_post(
    api, service, pg_proxy, db_dsn
):
    """Proves: with PostgreSQL unreachable, every post of a batch fails with DatabaseUnavailable
    (503 to its request) and none is stored; the next batch, once it is back, commits."""
    author = await api.new_user()
    texts = [f"{author.id} while down {n}" for n in range(4)]
    pg_proxy.disable()
    results = await asyncio.gather(
        *(service.posts.create(author.id, text) for text in texts), return_exceptions=True
    )
    assert all(isinstance(result, DatabaseUnavailable) for result in results), results
    pg_proxy.enable()
    assert stored_texts(db_dsn, texts) == []
    back = f"{author.id} is back"
    post = await service.posts.create(author.id, back)
    assert post.text == back and stored_texts(db_dsn, [back]) == [back]


@pytest.mark.gen_test(timeout=30)
async def test_a_statement_the_server_cancels_fails_each_post_of_its_batch(api, service, db_dsn):
    """Proves: when PostgreSQL cancels a batch's statement (here pg_cancel_backend on a batch
    that waits for a lock on its author's row; statement_timeout does the same), every post of
    the batch fails with DatabaseUnavailable at once: aiopg reports the cancel as the task's
    CancelledError, which left every request of the batch waiting for ever."""
    author = await api.new_user()
    locker = psycopg2.connect(db_dsn)
    try:
        with locker.cursor() as cur:
            cur.execute("SELECT id FROM users WHERE id = %s FOR UPDATE", (author.id,))
        asked = [asyncio.ensure_future(service.posts.create(author.id, f"x{n}")) for n in range(3)]
        await wait_for_backend_waiting_on_lock(db_dsn)
        with psycopg2.connect(db_dsn) as admin, admin.cursor() as cur:
            cur.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE '%%create_posts(%%' AND pid <> pg_backend_pid()"
            )
        admin.close()
        results = await asyncio.wait_for(asyncio.gather(*asked, return_exceptions=True), 5)
    finally:
        locker.rollback()
        locker.close()
    assert all(isinstance(result, DatabaseUnavailable) for result in results), results
    assert (await service.posts.create(author.id, "after")).text == "after"


async def wait_for_backend_waiting_on_lock(dsn: str) -> None:
    for _ in range(100):
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%%create_posts(%%'"
            )
            [(waiting,)] = cur.fetchall()
        conn.close()
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no batch waits for the author's row")


@pytest.mark.gen_test(timeout=30)
async def test_posts_behind_a_batch_that_times_out_fail_with_it(api, service, pg_proxy):
    """Proves: with PostgreSQL silent, the posts gathered behind the batches at it are answered
    503 when the first batch times out, not after timeouts of their own: with many posts
    waiting, the last answer came only after several QUERY_TIMEOUTs."""
    author = await api.new_user()
    pg_proxy.pause()
    asked = []
    for n in range(group_commit.MOST_IN_FLIGHT + 3):  # two at PostgreSQL, three behind them
        asked.append(asyncio.ensure_future(service.posts.create(author.id, f"silent {n}")))
        await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(*asked, return_exceptions=True)
    took = asyncio.get_running_loop().time() - started
    pg_proxy.resume()
    assert all(isinstance(result, DatabaseUnavailable) for result in results), results
    assert took < 1.5 * QUERY_TIMEOUT


@pytest.mark.gen_test(timeout=30)
async def test_shutdown_lets_the_batch_at_postgresql_commit_and_refuses_new_posts(
    api, service, pg_proxy, db_dsn
):
    """Proves: stopping the group commit waits for the batch at PostgreSQL (its post is stored
    and handed to the relay) and refuses posts asked for afterwards with DatabaseUnavailable."""
    author = await api.new_user()
    pg_proxy.pause()
    at_postgresql = asyncio.ensure_future(service.posts.create(author.id, f"{author.id} last"))
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(service.posts.stop(5))
    await asyncio.sleep(0.05)
    assert not stopping.done()
    with pytest.raises(DatabaseUnavailable):
        await service.posts.create(author.id, f"{author.id} too late")
    pg_proxy.resume()
    await asyncio.wait_for(stopping, 5)
    assert (await at_postgresql).text == f"{author.id} last"
    stored = stored_texts(db_dsn, [f"{author.id} last", f"{author.id} too late"])
    assert stored == [f"{author.id} last"]
