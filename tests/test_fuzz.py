"""Property-based fuzzing of the running service (run.py in a subprocess on its own port).

HTTP: schemathesis, because it reads feed_app/openapi.json and so generates valid and invalid
requests for every operation from the same contract the tests hold the service to, and checks
each answer against it (status documented, body matches its schema, no 5xx). On top of its
checks: every error is {"error": ...} with a 4xx, and a refused request changes no row.

The websocket handshake: hypothesis with strategies of our own, since schemathesis speaks plain
HTTP and would read a 101 as an ordinary answer; every handshake must get a status the document
lists for it, and every refusal a JSON error. The messages a client sends on its open socket
(posts, and anything else): hypothesis too, against an oracle of docs/websocket.md's rules.

Bounded: MAX_EXAMPLES per operation and per mode, no shrinking past a few seconds, so the whole
module takes about a minute here and sends well over 1,000 requests (printed at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator

import hypothesis
import psycopg2
import pytest
import requests
import schemathesis
import tornado.websocket
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from feed_app import auth
from tests import contract
from tests.conftest import AMQP_URL, NO_LIMITS_ENV
from tests.faults import PYTHON, ROOT, free_port
from tests.support import PASSWORD, upgrade_request

MAX_EXAMPLES = 80
WS_EXAMPLES = 400
SECRET = "fuzzing-secret-" + os.urandom(8).hex()
REQUESTS: Counter[str] = Counter()  # by kind and status class; conftest prints them
KNOWN: dict[str, int] = {}  # ids that exist, filled in once the service runs
TOKEN: dict[str, str] = {}  # the login tokens of KNOWN["me"] and KNOWN["leaver"]
# What ends log-ins runs as "leaver": ended as "me", every later request would get 401.
AS_LEAVER = ("logout", "logoutEverywhere", "changePassword")

schema = schemathesis.openapi.from_path(contract.DOCUMENT_PATH)
# The socket handshake is fuzzed below, with a client that speaks websocket.
http_schema = schema.exclude(operation_id="feedSocket")
fuzz_settings = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
)


@http_schema.auth(refresh_interval=None)
class LoggedIn:
    """A valid token for the operations that need one; schemathesis also sends them without
    and with a wrong one, and expects 401."""

    def get(self, case, context) -> str:
        return TOKEN.get("me", "")  # nothing before the service runs (collection)

    def set(self, case, token: str, context) -> None:
        if case.operation.definition.raw.get("operationId") in AS_LEAVER:
            token = TOKEN.get("leaver", "")
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}


@http_schema.hook
def flatmap_path_parameters(context, path_parameters: dict) -> st.SearchStrategy:
    """Ids drawn from the schema almost never exist; half the time, use one that does."""
    known = st.sampled_from(sorted(KNOWN.values()))
    if not path_parameters or not KNOWN:
        return st.just(path_parameters)
    return st.one_of(
        st.just(path_parameters),
        st.fixed_dictionaries({name: known for name in path_parameters}),
    )


@pytest.fixture(scope="module")
def service_url(db_dsn, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEED_")}
    env.update(NO_LIMITS_ENV, FEED_DB_DSN=db_dsn, FEED_AMQP_URL=AMQP_URL, FEED_JWT_SECRET=SECRET)
    log_path = tmp_path_factory.mktemp("fuzz") / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(PYTHON), "run.py", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path)
        seed(url)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    assert process.returncode == 0, log_path.read_text()[-3000:]


def wait_ready(url: str, process: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the service did not become ready in 30 s"
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)


def seed(url: str) -> None:
    """Two users, one following the other, and a post: ids and tokens the fuzzer can use; and a
    third user whose log-ins the log-out operations end."""
    for name in ("me", "other", "leaver"):
        body = {"name": name, "password": PASSWORD}
        user_id = requests.post(url + "/user/register", json=body, timeout=10).json()["user_id"]
        KNOWN[name] = user_id
    login = {"id": KNOWN["me"], "password": PASSWORD}
    token = requests.post(url + "/login", json=login, timeout=10).json()["token"]
    TOKEN["me"] = token
    # A token of no log-in: each log-out ends what the leaver has, and the token still works.
    TOKEN["leaver"] = auth.issue_token(KNOWN["leaver"], SECRET, 3600)
    headers = {"Authorization": f"Bearer {token}"}
    requests.put(f"{url}/friend/set/{KNOWN['other']}", headers=headers, timeout=10)
    post = requests.post(url + "/post/create", json={"text": "seed"}, headers=headers, timeout=10)
    KNOWN["post"] = post.json()["id"]


@pytest.fixture(scope="module")
def row_counts(db_dsn):
    """Rows in users, follows, posts, log-ins (and the ended ones) and refresh tokens, the newest
    change of a post (a new post, an edit or a delete each take a higher version), and outbox rows
    of changes newer than `after` (the relay
    deletes outbox rows as the broker confirms them, and republishes rows other tests left, so
    their plain count moves by itself; a refused request must add none)."""
    connection = psycopg2.connect(db_dsn)
    connection.autocommit = True
    sql = """SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM follows),
                    (SELECT count(*) FROM posts), (SELECT coalesce(max(version), 0) FROM posts),
                    (SELECT count(*) FROM logins), (SELECT count(revoked_at) FROM logins),
                    (SELECT count(*) FROM refresh_tokens),
                    (SELECT count(*) FROM outbox WHERE version > %s)"""

    def counts(after: int | None = None) -> dict[str, int]:
        with connection.cursor() as cur:
            cur.execute(sql, (after or 0,))
            users, follows, posts, newest, logins, ended, refresh, outbox = cur.fetchone()
        rows = {"users": users, "follows": follows, "posts": posts, "newest change": newest}
        rows |= {"logins": logins, "ended logins": ended, "refresh tokens": refresh}
        return rows | ({} if after is None else {"new outbox rows": outbox})

    yield counts
    connection.close()


@http_schema.parametrize()
@fuzz_settings
def test_every_operation_answers_as_documented_and_refusals_change_nothing(
    case, service_url, row_counts
):
    before = row_counts()
    response = case.call(base_url=service_url, timeout=10)
    REQUESTS[f"http {response.status_code // 100}xx"] += 1
    # Following oneself is schema-valid and refused with 400 (docs/api.md): the one schema-valid
    # request the service rightly refuses.
    oneself = case.operation.definition.raw.get("operationId") in ("follow", "unfollow") and (
        str((case.path_parameters or {}).get("id")) == str(KNOWN["me"])
    )
    case.validate_response(response, excluded_checks=[positive_data_acceptance] * oneself)
    content_type = response.headers.get("content-type", [""])[0]
    status = response.status_code
    assert status < 500, (status, response.text)
    if case.method != "HEAD":  # a HEAD answer has no body to check
        json_body = content_type.startswith("application/json")
        body = response.json() if json_body else response.text
        contract.check(case.method, response.request.path_url, status, body, content_type)
        if status >= 400:
            assert isinstance(body, dict) and set(body) == {"error"} and body["error"], body
    if status >= 400:
        after = row_counts(before["newest change"])
        assert after == {**before, "new outbox rows": 0}, f"{case.method} {case.path} {status}"


def raw_handshake(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one upgrade request; the status, headers and (for a refusal) body."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        length = int(headers.get("content-length", 0))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            body += chunk
    return int(status_line.split()[1]), headers, body


def tokens() -> st.SearchStrategy[str]:
    me, other = KNOWN["me"], KNOWN["other"]
    return st.one_of(
        st.just(str(TOKEN["me"])),
        st.just(auth.issue_token(other, SECRET, 60)),
        st.just(auth.issue_token(me, SECRET, -10)),  # expired
        st.just(auth.issue_token(me, "another secret", 60)),  # forged
        st.just(auth.issue_token(10**15 + 3, SECRET, 60)),  # no such user
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
    )


@st.composite
def handshakes(draw) -> tuple[str, dict[str, str]]:
    me = KNOWN["me"]
    user_id = draw(
        st.one_of(
            st.just(str(me)),
            st.just(str(KNOWN["other"])),
            st.integers(-(2**64), 2**64).map(str),
            st.text(max_size=20),
        )
    )
    query = {}
    headers = {}
    token = draw(st.none() | tokens())
    where = draw(st.sampled_from(["query", "subprotocol", "both"]))
    if token is not None and where in ("query", "both"):
        query["token"] = token
    if token is not None and where in ("subprotocol", "both"):
        offered = ["bearer." + token] + (["feed"] if draw(st.booleans()) else [])
        headers["Sec_WebSocket_Protocol"] = ", ".join(draw(st.permutations(offered)))
    since = draw(st.none() | st.integers(-5, 2**64).map(str) | st.text(max_size=20))
    if since is not None:
        query["since"] = since
    if draw(st.booleans()):
        headers["Sec_WebSocket_Version"] = draw(st.sampled_from(["13", "8", "12", "x"]))
    path = "/post/feed/" + urllib.parse.quote(user_id, safe="")
    if query:
        path += "?" + urllib.parse.urlencode(query)
    return path, headers


def test_feed_handshakes_get_only_documented_statuses(service_url):
    documented = contract.document()["paths"]["/post/feed/{user_id}"]["get"]["responses"]
    host = service_url.removeprefix("http://")

    @hypothesis.given(handshakes())
    @hypothesis.settings(fuzz_settings, max_examples=WS_EXAMPLES)
    def handshake(drawn: tuple[str, dict[str, str]]) -> None:
        path, headers = drawn
        status, answer, body = raw_handshake(service_url, upgrade_request(path, host, **headers))
        REQUESTS[f"websocket {status if status == 101 else f'{status // 100}xx'}"] += 1
        assert str(status) in documented, (path, headers, status, body)
        if status == 101:
            offered = headers.get("Sec_WebSocket_Protocol", "")
            assert answer.get("sec-websocket-protocol") == ("feed" if "feed" in offered else None)
            return
        assert answer["content-type"].startswith("application/json"), answer
        contract.check("GET", path, status, json.loads(body), answer["content-type"])

    handshake()


MAX_POST_LENGTH = 1000  # docs/api.md; restated so that the oracle below is not the code under test


def posted_text(message: dict) -> bool:
    """Whether a post message's text is one the service stores."""
    text = message.get("text")
    if not isinstance(text, str) or "\x00" in text or not text.strip():
        return False
    if any(0xD800 <= ord(char) <= 0xDFFF for char in text):  # a lone surrogate: not UTF-8
        return False
    return len(text) <= MAX_POST_LENGTH


def answerable_ref(message: object) -> int | None:
    """The ref of a post message the service answers; None for one it must close for."""
    if not (isinstance(message, dict) and message.get("type") == "post"):
        return None
    ref = message.get("ref")
    return ref if type(ref) is int and 0 <= ref <= 2**53 - 1 else None


@st.composite
def client_messages(draw) -> str:
    """Post messages of every shape, texts of any characters (lone surrogates included), and
    other messages, JSON or not."""
    texts = st.one_of(
        st.text(st.characters(exclude_categories=()), max_size=MAX_POST_LENGTH + 50),
        st.just(" \t\n"),
        st.text(max_size=3).map(lambda text: text + "x" * MAX_POST_LENGTH),
        st.none() | st.integers() | st.lists(st.text(max_size=3), max_size=2),
    )
    wrong_refs = st.integers(-(2**64), 2**64) | st.floats() | st.booleans() | st.text(max_size=5)
    refs = st.integers(0, 2**53 - 1) if draw(st.integers(0, 4)) else wrong_refs | st.none()
    post = st.fixed_dictionaries({"type": st.just("post"), "ref": refs, "text": texts})
    other = st.one_of(
        st.dictionaries(st.sampled_from(["type", "ref", "text", "x"]), st.integers() | st.text()),
        st.lists(st.integers(), max_size=3),
    )
    raw = st.text(max_size=40)
    if draw(st.integers(0, 4)):  # four in five are post messages
        return json.dumps(draw(post))
    return draw(st.one_of(other.map(json.dumps), raw))


class FeedConnection:
    """One feed socket of KNOWN["me"], opened again whenever a message closed it."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("http", "ws", 1) + f"/post/feed/{KNOWN['me']}?token={TOKEN['me']}"
        self.ws = None

    async def send(self, message: str) -> dict | None:
        """Send; the answer read back, or None once the socket closed instead."""
        if self.ws is None:
            self.ws = await tornado.websocket.websocket_connect(self.url)
            while json.loads(await self.ws.read_message())["type"] != "ready":
                pass
        await self.ws.write_message(message)
        while (frame := await asyncio.wait_for(self.ws.read_message(), 10)) is not None:
            answer = json.loads(frame)
            if answer["type"] in ("posted", "refused"):
                return answer
        return None

    async def close(self) -> None:
        """On the loop: closing writes a frame, and a write outside a loop has none to wait on."""
        if self.ws is not None:
            self.ws.close()

    def close_code(self) -> int | None:
        ws, self.ws = self.ws, None
        return ws.close_code


def test_feed_socket_messages_are_answered_or_close_the_socket_as_documented(
    service_url, row_counts
):
    """Every post message with a ref the client can match is answered on the socket, posted when
    its text is storable and refused with 400 otherwise, a refusal changing no row; anything else
    closes the socket with 1003 and changes nothing."""
    loop = asyncio.new_event_loop()
    feed = FeedConnection(service_url)

    @hypothesis.given(client_messages())
    @hypothesis.settings(fuzz_settings, max_examples=WS_EXAMPLES)
    def message(raw: str) -> None:
        try:
            sent = json.loads(raw)
        except ValueError:
            sent = None
        before = row_counts()
        answer = loop.run_until_complete(feed.send(raw))
        ref = answerable_ref(sent)
        if ref is None:
            assert answer is None and feed.close_code() == 1003, (raw, answer)
            REQUESTS["websocket message 1003"] += 1
            assert row_counts(before["newest change"]) == {**before, "new outbox rows": 0}
            return
        assert answer is not None and answer["ref"] == ref, (raw, answer)
        REQUESTS[f"websocket message {answer['type']}"] += 1
        if posted_text(sent):
            assert answer["type"] == "posted" and answer["post"]["text"] == sent["text"], answer
        else:
            assert (answer["type"], answer["status"]) == ("refused", 400), (raw, answer)
            assert set(answer) == {"type", "ref", "status", "error"} and answer["error"]
            assert row_counts(before["newest change"]) == {**before, "new outbox rows": 0}

    try:
        message()
    finally:
        loop.run_until_complete(feed.close())
        loop.close()


def test_the_fuzzing_sent_at_least_1000_requests(request):
    """CI's floor; meaningful only when the whole module ran (not under -k)."""
    fuzzing = [item for item in request.session.items if item.module is request.module]
    if len(fuzzing) < len(list(http_schema.get_all_operations())) + 3:
        pytest.skip("only part of the fuzzing ran")
    assert sum(REQUESTS.values()) >= 1000, REQUESTS
