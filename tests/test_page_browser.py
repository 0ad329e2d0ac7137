"""The real page (static/index.html) in headless Chromium against the real in-process service.

Chromium is driven over the DevTools protocol with tornado's websocket client: no extra
dependencies, and nothing between the test and the browser that could hide a failure. Each test
opens pages in browser contexts of their own (separate storage, like two people on two
machines), types with real key events where a person would, and reads what the page shows.

The tests marked `through_tls_front` run a second time with the page loaded from HAProxy over
HTTPS before the service, its feed over wss:// (tests/tls_front.py), as `scripts/cluster up`
serves it. Chromium accepts that certificate by its public key
(--ignore-certificate-errors-spki-list, for that one key only): a browser profile has no
authority store of its own to add the cluster's authority to, only the user's NSS database.

scripts/setup installs Chromium (scripts/ensure-browser). Without one the module is skipped,
saying how to install it, except under CI=true, where it fails: CI must run these tests.
Screenshots (desktop and 375 px wide) go to tests/screenshots/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import WebSocketClientConnection, websocket_connect

from feed_app import auth
from feed_app.config import rate
from feed_app.wire import Close
from tests.conftest import with_settings
from tests.support import PASSWORD, Api, User
from tests.tls_front import spki_sha256, wait_up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    _missing = (
        "no chromium or chromium-browser on PATH; install it with scripts/ensure-browser "
        "(as root or with passwordless sudo) or: sudo apt-get install -y chromium"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{_missing} (CI must run the browser tests)", pytrace=False)
    pytest.skip(_missing, allow_module_level=True)

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
XSS_TEXT = '<img src=x onerror="window.__xss=1"><b>bold</b>'
DESKTOP = (1280, 860)
PHONE = (375, 812)

# What a failed wait prints: the parts of the page a person would look at.
PAGE_STATE = """({
  view: document.getElementById('logged-in').hidden ? 'logged out' : 'logged in',
  me: document.getElementById('my-name').textContent,
  conn: document.getElementById('conn-state').textContent,
  notice: (n => n.hidden ? '' : n.textContent)(document.getElementById('notice')),
  errors: [...document.querySelectorAll('.error')].map(e => e.textContent).filter(Boolean),
  posts: [...document.querySelectorAll('#output > li')].map(li => li.dataset.id),
})"""


# --- driving Chromium over the DevTools protocol -------------------------------------------------


class DevTools:
    """One DevTools websocket (to the browser or to one page): commands and their answers."""

    def __init__(self, ws: WebSocketClientConnection) -> None:
        self.ws = ws
        self.exceptions: list[str] = []  # uncaught exceptions thrown by a page's scripts
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url: str, timeout: float = 10) -> Any:
        return cls(
            await asyncio.wait_for(websocket_connect(url, max_message_size=64 << 20), timeout)
        )

    async def _read(self) -> None:
        while (text := await self.ws.read_message()) is not None:
            message = json.loads(text)
            future = self._pending.pop(message.get("id"), None)
            if future is not None and not future.done():
                future.set_result(message)
            elif message.get("method") == "Runtime.exceptionThrown":
                details = message["params"]["exceptionDetails"]
                self.exceptions.append(details.get("exception", {}).get("description", details))
        for future in self._pending.values():  # the socket died: fail every waiting command
            if not future.done():
                future.set_exception(ConnectionError("DevTools socket closed"))

    async def send(self, method: str, params: dict | None = None, timeout: float = 10) -> dict:
        """One command; its result, or RuntimeError with the protocol's error."""
        message_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        await self.ws.write_message(
            json.dumps({"id": message_id, "method": method, "params": params or {}})
        )
        try:
            response = await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(message_id, None)
        if "error" in response:
            raise RuntimeError(f"{method} failed: {response['error']}")
        return response["result"]

    def close(self) -> None:
        self._reader.cancel()
        self.ws.close()


class Page(DevTools):
    """A tab in a browser context of its own: what a person sees and does."""

    base_url = ""
    context = ""

    async def evaluate(self, expression: str, timeout: float = 10) -> Any:
        """The JSON value of a page expression; promises are awaited; page errors are raised."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(
                f"{expression!r} threw: {details.get('exception', {}).get('description', details)}"
            )
        return result["result"].get("value")

    async def wait_for(self, condition: str, timeout: float = 10) -> Any:
        """Poll a page expression every 50 ms until it is truthy (in JS); return its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (result := await self.evaluate(f"(v => ({{ok: !!v, v}}))({condition})"))["ok"]:
            if asyncio.get_running_loop().time() > deadline:
                state = await self.evaluate(PAGE_STATE)
                raise AssertionError(f"{timeout} s without {condition!r}; page state: {state}")
            await asyncio.sleep(0.05)
        return result.get("v")

    async def goto(self, path: str = "/") -> None:
        url = self.base_url + path
        result = await self.send("Page.navigate", {"url": url})
        assert "errorText" not in result, f"cannot load {url}: {result['errorText']}"
        await self.wait_for(f"location.href === {js(url)} && document.readyState === 'complete'")

    async def reload(self) -> None:
        await self.evaluate("window.__before_reload = true")
        await self.send("Page.reload")
        await self.wait_for("!window.__before_reload && document.readyState === 'complete'")

    async def type(self, element_id: str, text: str) -> None:
        """Focus a field and type into it (real input events), replacing what it held."""
        await self.evaluate(
            f"(e => {{ e.focus(); e.select(); }})(document.getElementById({js(element_id)}))"
        )
        await self.send("Input.insertText", {"text": text})

    async def press(self, key: str) -> None:
        """Press and release a key: "Enter" or "Tab"."""
        code, text = {"Enter": (13, "\r"), "Tab": (9, "")}[key]
        down = {"type": "keyDown", "key": key, "code": key, "windowsVirtualKeyCode": code}
        await self.send("Input.dispatchKeyEvent", {**down, "text": text} if text else down)
        await self.send("Input.dispatchKeyEvent", {**down, "type": "keyUp"})

    async def click(self, selector: str) -> None:
        await self.evaluate(f"document.querySelector({js(selector)}).click()")

    async def text(self, selector: str) -> str:
        return await self.evaluate(f"document.querySelector({js(selector)}).textContent")

    async def screenshot(
        self,
        name: str,
        size: tuple[int, int],
        *,
        full_page: bool = True,
        folder: Path = SCREENSHOTS,
    ) -> Path:
        """The page at this window size (mobile emulation under 500 px wide): all of it, or
        what the window shows."""
        await self.set_width(size)
        await asyncio.sleep(0.2)  # a layout and a paint at the new size
        width, height = size
        if full_page:
            height = min(
                max(await self.evaluate("document.documentElement.scrollHeight"), height), 4000
            )
        shot = await self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": full_page,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
            timeout=20,
        )
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def set_width(self, size: tuple[int, int]) -> None:
        width, height = size
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500},
        )


class Chromium:
    """A headless Chromium process; new_page() opens a tab in a fresh browser context."""

    def __init__(self, process: subprocess.Popen, profile: str, port: int) -> None:
        self.process = process
        self.profile = profile
        self.port = port

    @classmethod
    def launch(cls, accepted_key: str, timeout: float = 20) -> Chromium:
        """accepted_key: base64 SHA-256 of the one public key whose certificate is accepted
        without a trusted authority (tls_front.spki_sha256)."""
        profile = tempfile.mkdtemp(prefix="feed-chromium-")
        with open(Path(profile, "chromium.log"), "wb") as log:  # the child keeps its own copy
            process = subprocess.Popen(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    f"--ignore-certificate-errors-spki-list={accepted_key}",
                    "--remote-debugging-port=0",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: close() kills every child too
            )
        try:
            return cls(process, profile, cls._devtools_port(process, profile, timeout))
        except BaseException:
            cls._kill(process, profile)
            raise

    @staticmethod
    def _devtools_port(process: subprocess.Popen, profile: str, timeout: float) -> int:
        """The port Chromium chose, from the first line of <profile>/DevToolsActivePort."""
        path = Path(profile, "DevToolsActivePort")
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(path.read_text().splitlines()[0])
            if process.poll() is not None or time.monotonic() > deadline:
                log = Path(profile, "chromium.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"no DevToolsActivePort within {timeout} s (exit code {process.poll()}):\n{log}"
                )
            time.sleep(0.05)

    async def browser_target(self) -> DevTools:
        response = await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{self.port}/json/version", request_timeout=10
        )
        return await DevTools.connect(json.loads(response.body)["webSocketDebuggerUrl"])

    def close(self) -> None:
        self._kill(self.process, self.profile)

    @staticmethod
    def _kill(process: subprocess.Popen, profile: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        shutil.rmtree(profile, ignore_errors=True)


class Browser:
    """The test's handle on Chromium: pages in separate contexts, all closed at the end."""

    def __init__(self, chromium: Chromium, target: DevTools, base_url: str) -> None:
        self.chromium = chromium
        self.target = target
        self.base_url = base_url
        self.pages: list[Page] = []
        self.contexts: list[str] = []

    async def new_page(self, context: str | None = None) -> Page:
        """A tab in a new browser context (another person), or in `context` (another tab)."""
        if context is None:
            context = (await self.target.send("Target.createBrowserContext"))["browserContextId"]
            self.contexts.append(context)
        created = await self.target.send(
            "Target.createTarget", {"url": "about:blank", "browserContextId": context}
        )
        url = f"ws://127.0.0.1:{self.chromium.port}/devtools/page/{created['targetId']}"
        page = await Page.connect(url)
        page.base_url = self.base_url
        page.context = context
        self.pages.append(page)
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        await page.goto("/")
        return page

    async def close(self) -> None:
        for page in self.pages:
            page.close()
        for context in self.contexts:
            with contextlib.suppress(Exception):
                await self.target.send(
                    "Target.disposeBrowserContext", {"browserContextId": context}
                )
        self.target.close()

    def exceptions(self) -> list[str]:
        return [e for page in self.pages for e in page.exceptions]


@pytest.fixture(scope="module")
def chromium(front_certificate) -> Iterator[Chromium]:
    browser = Chromium.launch(spki_sha256(front_certificate.pem))
    yield browser
    browser.close()


@pytest.fixture
def settings(settings, amqp_proxy, request):
    marker = request.node.get_closest_marker("limited")
    limits = marker.kwargs if marker else {}
    return with_settings(settings, amqp_url=amqp_proxy.url_for(settings.amqp_url), **limits)


# A test that runs a second time with the page from HAProxy over HTTPS and WSS.
through_tls_front = pytest.mark.parametrize("front", ["direct", "tls"], indirect=True)


@pytest.fixture
def front(request) -> str:
    """How the page is reached: "direct" (the service's own plain HTTP) or "tls"."""
    return getattr(request, "param", "direct")


@pytest.fixture
def browser(
    request, io_loop, chromium, http_server, http_port, base_url, front
) -> Iterator[Browser]:
    if front == "tls":
        balancer = request.getfixturevalue("tls_front")(http_port)
        io_loop.run_sync(lambda: wait_up(balancer))
        base_url = balancer.url
    target = io_loop.run_sync(chromium.browser_target)
    browser = Browser(chromium, target, base_url)
    yield browser
    io_loop.run_sync(browser.close)
    assert browser.exceptions() == [], "the page threw"


# --- what a person does on the page ---------------------------------------------------------------


def js(value: Any) -> str:
    return json.dumps(value)


async def register(page: Page, name: str) -> int:
    """Create an account with the form; the page logs in by itself. Returns the new user id."""
    await page.type("reg-name", name)
    await page.type("reg-password", PASSWORD)
    await page.click("#register-form button[type=submit]")
    await page.wait_for(f"document.getElementById('my-name').textContent === {js(name)}")
    return await page.evaluate("session.userId")


async def log_in_with_keyboard(page: Page, user: User) -> None:
    """User id, Tab, password, Enter: no mouse."""
    await page.type("login-id", str(user.id))
    await page.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "login-password"
    await page.send("Input.insertText", {"text": PASSWORD})
    await page.press("Enter")
    await page.wait_for("!document.getElementById('logged-in').hidden")


async def wait_live(page: Page) -> None:
    await page.wait_for("document.getElementById('conn').dataset.state === 'live'")


async def shown_posts(page: Page) -> list[dict]:
    return await page.evaluate(
        """[...document.querySelectorAll('#output > li')].map(li => ({
          id: Number(li.dataset.id),
          author: li.querySelector('.post-author').textContent,
          text: li.querySelector('.post-text').textContent,
          isNew: li.classList.contains('new'),
        }))"""
    )


async def wait_shown(page: Page, post: dict, timeout: float = 10) -> None:
    await page.wait_for(
        f"document.querySelector('#output > li[data-id=\"{post['id']}\"]')", timeout
    )


def backdate(dsn: str, post_ids: list[int], minutes: list[int]) -> None:
    """Make posts look older (created_at only), so relative times vary as in real use."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        for post_id, ago in zip(post_ids, minutes, strict=True):
            cur.execute(
                "UPDATE posts SET created_at = now() - %s * interval '1 minute' WHERE id = %s",
                (ago, post_id),
            )
    conn.close()


# --- tests ----------------------------------------------------------------------------------------


@through_tls_front
@pytest.mark.gen_test(timeout=60)
async def test_register_log_out_and_log_in_with_the_keyboard(browser, api):
    page = await browser.new_page()
    assert await page.evaluate("document.getElementById('logged-in').hidden")
    await page.screenshot("login-desktop", DESKTOP)
    await page.screenshot("login-375px", PHONE)
    await page.set_width(DESKTOP)

    # Every field has a label; the live region for new posts is there.
    unlabelled = await page.evaluate(
        "[...document.querySelectorAll('input, textarea')].filter(e => !e.labels.length)"
        ".map(e => e.id)"
    )
    assert unlabelled == []
    assert await page.evaluate("document.getElementById('announcer').getAttribute('aria-live')")

    user_id = await register(page, "Ann Lee")
    assert await page.evaluate("document.getElementById('logged-out').hidden")  # forms gone
    assert await page.text("#my-name") == "Ann Lee"
    assert f"Your user id is {user_id}" in await page.text("#notice")
    await wait_live(page)  # the feed opened by itself

    await page.click("#logout")
    await page.wait_for("!document.getElementById('logged-out').hidden")
    assert await page.evaluate("document.getElementById('account').hidden")
    assert await page.evaluate("localStorage.getItem('feedSession')") is None
    assert await page.evaluate("document.getElementById('login-id').value") == str(user_id)

    await page.type("login-password", "wrong password")
    await page.click("#login-form button[type=submit]")
    await page.wait_for("document.getElementById('login-error').textContent")
    assert await page.text("#login-error") == "wrong user id or password"

    await log_in_with_keyboard(page, User(user_id, ""))
    assert await page.text("#my-name") == "Ann Lee"
    await wait_live(page)

    # A second tab of the same browser is logged in too (the refresh cookie); logging out in one
    # ends the log-in, and the other tab's feed with it.
    tab = await browser.new_page(page.context)
    await tab.wait_for("document.getElementById('my-name').textContent === 'Ann Lee'")
    await wait_live(tab)
    await tab.click("#logout")
    await page.wait_for("!document.getElementById('logged-out').hidden")


@through_tls_front
@pytest.mark.gen_test(timeout=90)
async def test_find_by_name_follow_and_see_posts_live_with_names(browser, api, db_dsn):
    """Bob finds Alice by a lower-case prefix of her name and follows her; what she posts from
    her own browser arrives at the top of his feed, marked new, with her name, as text; his
    own post shows up too; older posts have relative times with the exact time on hover."""
    alice = await api.new_user("Alice Martin")
    carol = await api.new_user("Carol Diaz")
    bob = await api.new_user("Bob Stone")
    await api.follow(bob, carol)
    earlier = [
        await api.post(carol, "Morning run along the river: 8 km before the rain came."),
        await api.post(alice, "Slides from today's talk on websockets are up."),
        await api.post(carol, "Anyone up for the concert on Friday?"),
    ]
    backdate(db_dsn, [p["id"] for p in earlier], [185, 95, 24])

    bobs = await browser.new_page()
    await log_in_with_keyboard(bobs, bob)
    await wait_live(bobs)
    # From a page served over HTTPS the feed is wss://; over plain HTTP, ws://.
    scheme = "wss" if browser.base_url.startswith("https:") else "ws"
    assert (await bobs.evaluate("socket.url")).startswith(f"{scheme}://")
    await bobs.wait_for("document.querySelectorAll('#output > li').length === 2")

    # With the keyboard: Enter on the Follow button; the focus stays on that person's row.
    await bobs.type("search-q", "alice m")
    follow = f'#search-results li[data-id="{alice.id}"] button'
    await bobs.wait_for(f"document.querySelector({js(follow)})")
    assert await bobs.evaluate(f"document.querySelector({js(follow)}).textContent") == "Follow"
    await bobs.evaluate(f"document.querySelector({js(follow)}).focus()")
    await bobs.press("Enter")
    await bobs.wait_for(f"document.querySelector({js(follow)}).textContent === 'Unfollow'")
    # The focus comes back to the (redrawn) button once the page has also re-read the feed.
    await bobs.wait_for(f"document.activeElement === document.querySelector({js(follow)})")
    assert await bobs.text(f'#following-list li[data-id="{alice.id}"] .name') == "Alice Martin"
    unfollow = f'#following-list li[data-id="{alice.id}"] button'
    assert await bobs.evaluate(f"document.querySelector({js(unfollow)}).textContent") == "Unfollow"
    await wait_shown(bobs, earlier[1])  # her recent posts come with the follow

    alices = await browser.new_page()
    await log_in_with_keyboard(alices, alice)
    await wait_live(alices)
    await alices.type("post-text", XSS_TEXT)
    await alices.click("#post-submit")
    await alices.wait_for("document.getElementById('post-text').value === ''")
    first = (await shown_posts(alices))[0]
    assert first["text"] == XSS_TEXT and first["author"] == "Alice Martin"  # her own post

    await wait_shown(bobs, first)
    top = (await shown_posts(bobs))[0]
    assert top == {"id": first["id"], "author": "Alice Martin", "text": XSS_TEXT, "isNew": True}
    assert await bobs.evaluate("document.querySelector('#output > li .badge').textContent") == "New"
    assert "Alice Martin" in await bobs.text("#announcer")
    # Rendered as text: no element was made from the markup and its handler never ran, while the
    # same markup parsed as HTML does fire here (the control).
    assert await bobs.evaluate("document.querySelectorAll('#output img, #output b').length") == 0
    await bobs.evaluate(
        "document.createElement('div').innerHTML = '<img src=x onerror=\"window.__control=1\">'"
    )
    await bobs.wait_for("window.__control === 1")
    assert await bobs.evaluate("typeof window.__xss") == "undefined"

    await bobs.type("post-text", "Heading out, see you all on Friday!")
    await bobs.click("#post-submit")
    await bobs.wait_for(
        "document.querySelector('#output > li .post-author').textContent === 'Bob Stone'"
    )

    times = await bobs.evaluate(
        """[...document.querySelectorAll('#output > li')].map(li => {
          const t = li.querySelector('time'); return [li.dataset.id, t.textContent, t.title]; })"""
    )
    by_id = {int(post_id): (text, title) for post_id, text, title in times}
    assert by_id[earlier[0]["id"]][0] == "3 h ago"
    assert by_id[earlier[2]["id"]][0] == "24 min ago"
    assert by_id[first["id"]][0] == "just now"
    assert all(title for _, title in by_id.values())

    await bobs.screenshot("feed-desktop", DESKTOP)
    await bobs.screenshot("feed-375px", PHONE)
    assert await bobs.evaluate("document.documentElement.scrollWidth") <= PHONE[0]

    await bobs.set_width(DESKTOP)
    await bobs.click(unfollow)
    await bobs.wait_for(f"!document.querySelector('#following-list li[data-id=\"{alice.id}\"]')")
    assert {p["author"] for p in await shown_posts(bobs)} == {"Carol Diaz", "Bob Stone"}


@through_tls_front
@pytest.mark.gen_test(timeout=60)
async def test_reload_keeps_you_logged_in_with_nothing_in_storage_until_the_log_in_ends(
    browser, api, caplog
):
    author, reader = await api.new_user("Dana Wu"), await api.new_user("Eli Park")
    await api.follow(reader, author)
    post = await api.post(author, "still here after a reload")
    page = await browser.new_page()
    caplog.set_level(logging.INFO)
    await log_in_with_keyboard(page, reader)
    await wait_shown(page, post)
    # The token goes as a subprotocol: not in the socket's URL, nor in any log line.
    token = await page.evaluate("session.token")
    assert await page.evaluate("socket.protocol") == "feed"
    assert token not in await page.evaluate("socket.url")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"/post/feed/{reader.id}" in logged and token not in logged
    # Nothing a script could read holds a token: the refresh cookie is HttpOnly.
    assert await page.evaluate("Object.keys(localStorage)") == ["feedLastUserId"]
    assert await page.evaluate("sessionStorage.length + document.cookie.length") == 0

    await page.evaluate("localStorage.clear()")
    await page.reload()
    await page.wait_for("!document.getElementById('logged-in').hidden")
    assert await page.text("#my-name") == "Eli Park"
    await wait_live(page)
    await wait_shown(page, post)

    # The network goes away and comes back: the state says so, and the feed resumes.
    offline = {"latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    await page.send("Network.enable")
    await page.send("Network.emulateNetworkConditions", {**offline, "offline": True})
    await page.wait_for("document.getElementById('conn-state').textContent === 'Offline'")
    missed = await api.post(author, "posted while the reader was offline")
    await page.send("Network.emulateNetworkConditions", {**offline, "offline": False})
    await wait_live(page)
    await wait_shown(page, missed)

    # The log-in ends elsewhere (here: the API): the page returns to the login form, and a
    # reload does not log in again.
    code, _ = await api.call("POST", "/logout", token=await page.evaluate("session.token"))
    assert code == 200
    await page.wait_for("!document.getElementById('logged-out').hidden", timeout=5)
    assert "logged out" in await page.text("#notice")
    await page.reload()
    await page.wait_for("!document.getElementById('logged-out').hidden")
    assert await page.evaluate("document.getElementById('logged-in').hidden")


@pytest.mark.limited(post_rate=rate("2/hour"))
@pytest.mark.gen_test(timeout=60)
async def test_a_live_page_posts_over_its_socket_and_says_what_became_of_each_post(
    browser, api, caplog
):
    """With its feed live, the page posts over the socket, never with POST /post/create: the
    post shows on the author's page at once and live in a follower's browser. A post whose
    socket drops before the answer is reported unconfirmed and not sent again; it was stored,
    so it shows once the page is live again, once. Past the post rate (2 an hour here) the
    socket's refusal shows as an HTTP error does, and the text stays to post later."""
    author, reader = await api.new_user("Rosa Vega"), await api.new_user("Sam Ortiz")
    await api.follow(reader, author)
    authors, readers = await browser.new_page(), await browser.new_page()
    for page, user in ((authors, author), (readers, reader)):
        await log_in_with_keyboard(page, user)
        await wait_live(page)
    caplog.set_level(logging.INFO)

    def http_posts() -> list[str]:  # the access log's lines for POST /post/create
        return [r.getMessage() for r in caplog.records if "/post/create" in r.getMessage()]

    error = "document.getElementById('post-error')"
    typed = "document.getElementById('post-text').value"

    await authors.type("post-text", "sent over the socket")
    await authors.click("#post-submit")
    await authors.wait_for(f"{typed} === ''")
    [posted] = await shown_posts(authors)
    assert (posted["author"], posted["text"]) == ("Rosa Vega", "sent over the socket")
    await wait_shown(readers, posted)
    assert (await shown_posts(readers))[0] == {**posted, "isNew": True}
    assert http_posts() == []

    # The page itself closes its socket right after sending the next post, so that no answer
    # can come first: the outcome is unknown, the page says so, keeps the text and sends
    # nothing again; the server stored the post, and the next socket brings it.
    await authors.evaluate(
        """(ws => { const send = ws.send.bind(ws);
          ws.send = (data) => { send(data); if (JSON.parse(data).type === 'post') ws.close(4000); };
        })(socket)"""
    )
    await authors.type("post-text", "sent as the socket drops")
    await authors.click("#post-submit")
    await authors.wait_for(f"!{error}.hidden")
    assert "before the post was confirmed" in await authors.text("#post-error")
    assert await authors.evaluate(typed) == "sent as the socket drops"
    for page in (authors, readers):
        await page.wait_for("document.querySelectorAll('#output > li').length === 2")
    await wait_live(authors)
    code, body = await api.call("GET", "/post/feed", token=author.token)
    assert code == 200, body
    texts = ["sent as the socket drops", "sent over the socket"]
    assert [p["text"] for p in body["posts"]] == texts  # stored once: never sent again
    assert [p["text"] for p in await shown_posts(authors)] == texts

    await authors.type("post-text", "one too many")
    await authors.click("#post-submit")
    await authors.wait_for(f"{error}.textContent.startsWith('too many posts')")
    assert not await authors.evaluate(f"{error}.hidden")
    assert await authors.evaluate(typed) == "one too many"
    assert await authors.evaluate("waitingPosts.size") == 0
    assert [p["text"] for p in await shown_posts(authors)] == texts
    assert http_posts() == []
    # The access log does reach this test: a post over HTTP shows in it (refused too: 2 an hour).
    assert (await api.request("POST", "/post/create", {"text": "x"}, token=author.token))[0] == 429
    assert len(http_posts()) == 1


@pytest.mark.gen_test(timeout=60)
async def test_log_out_everywhere_in_one_browser_ends_the_feed_in_another(browser, api):
    reader = await api.new_user("Lea Moss")
    laptop, phone = await browser.new_page(), await browser.new_page()
    for page in (laptop, phone):
        await log_in_with_keyboard(page, reader)
        await wait_live(page)
    await phone.click("#logout-all")
    await phone.wait_for("!document.getElementById('logged-out').hidden")
    await laptop.wait_for("!document.getElementById('logged-out').hidden", timeout=5)
    assert "logged out" in await laptop.text("#notice")
    for page in (laptop, phone):
        await page.reload()
        await page.wait_for("!document.getElementById('logged-out').hidden")


@pytest.mark.gen_test(timeout=60)
async def test_an_expiring_token_is_renewed_in_band_and_an_expired_one_leaves_no_gap(
    browser, api, service, settings
):
    """The page's socket is given a token that expires in 3 s. Renewed on time, it is sent
    in-band and the socket stays open; when the tab misses the renewal (here: the timer is
    stopped) the server closes the socket with 4001, and the page renews and resumes with
    since=, showing what was posted meanwhile once."""
    page, author, _, before = await live_page(browser, api, "Mo Reyes", "Noa Kim")
    secret = settings.jwt_secret

    async def reopen_with_a_short_token() -> None:
        claims = auth.claims_from_token(await page.evaluate("session.token"), secret)
        short = auth.issue_token(claims.user_id, secret, 3, claims.login_id)
        expires = auth.claims_from_token(short, secret).expires
        await page.evaluate(
            f"session.token = {js(short)}; session.exp = {expires * 1000};"
            "closeFeed(); openFeed(); scheduleRenewal();"
        )
        await wait_live(page)

    await reopen_with_a_short_token()
    [kept] = service.sessions
    await asyncio.sleep(4)  # past the short token's expiry
    renewed = await api.post(author, "after the in-band renewal")
    await wait_shown(page, renewed)
    assert service.sessions == {kept}  # the same socket, never closed

    await reopen_with_a_short_token()
    [dropped] = service.sessions
    await page.evaluate("clearTimeout(renewTimer)")
    posted = []
    while dropped in service.sessions:
        posted.append(await api.post(author, f"around the expiry {len(posted)}"))
        await asyncio.sleep(0.2)
    posted.append(await api.post(author, "after the expiry"))
    for post in posted:
        await wait_shown(page, post)
    await wait_live(page)
    shown = [p["id"] for p in await shown_posts(page)]
    expected = [before, renewed, *posted]
    assert shown == [p["id"] for p in reversed(expected)]
    assert len(service.sessions) == 1 and dropped not in service.sessions


@pytest.mark.gen_test(timeout=60)
async def test_load_older_pages_back_without_duplicates(browser, api):
    author, reader = await api.new_user("Finn Hale"), await api.new_user("Gia Rossi")
    await api.follow(reader, author)
    posts = [await api.post(author, f"post number {n}") for n in range(47)]
    page = await browser.new_page()
    await log_in_with_keyboard(page, reader)
    await wait_live(page)
    await page.wait_for("!document.getElementById('load-older').hidden")
    assert len(await shown_posts(page)) == 20
    # Live edits: one of a shown post changes it in place; one of the oldest post, below the
    # page read so far, waits for "Load older posts" to bring it in its new text.
    for post, text in ((posts[0], "the first, edited"), (posts[-1], "the last, edited")):
        code, body = await api.call(
            "PUT", "/post/update", {"id": post["id"], "text": text}, token=author.token
        )
        assert code == 200, body
    await page.wait_for(
        f"document.querySelector('li[data-id=\"{posts[-1]['id']}\"] .post-text')"
        ".textContent === 'the last, edited'"
    )
    assert posts[0]["id"] not in [p["id"] for p in await shown_posts(page)]

    for shown in (40, 47):
        await page.click("#load-older")
        await page.wait_for(f"document.querySelectorAll('#output > li').length === {shown}")
    await page.wait_for("!document.getElementById('feed-end').hidden")
    assert await page.evaluate("document.getElementById('load-older').hidden")
    ids = [p["id"] for p in await shown_posts(page)]
    assert ids == sorted((p["id"] for p in posts), reverse=True)  # all, newest first, once each
    assert not any(p["isNew"] for p in await shown_posts(page))
    assert (await shown_posts(page))[-1]["text"] == "the first, edited"


async def live_page(
    browser: Browser, api: Api, author_name: str, reader_name: str
) -> tuple[Page, User, User, dict]:
    """A reader who follows an author, logged in on a page whose feed is live and shows one post
    of the author: (page, author, reader, that post)."""
    author, reader = await api.new_user(author_name), await api.new_user(reader_name)
    await api.follow(reader, author)
    page = await browser.new_page()
    await log_in_with_keyboard(page, reader)
    await wait_live(page)
    before = await api.post(author, "shown before")
    await wait_shown(page, before)
    return page, author, reader, before


@pytest.mark.gen_test(timeout=60)
async def test_broker_outage_leaves_no_gap(browser, api, service, amqp_proxy):
    """RabbitMQ is cut off while the page is open: posts made meanwhile wait in the outbox and
    reach the page once the broker is back; the socket stays open, nothing is lost or doubled."""
    page, author, _, before = await live_page(browser, api, "Hugo Lane", "Iris Bell")

    amqp_proxy.disable()
    during = [await api.post(author, f"during the outage {n}") for n in range(3)]
    amqp_proxy.enable()
    after = await api.post(author, "after the outage")
    await wait_shown(page, after, timeout=20)
    for post in during:
        await wait_shown(page, post)
    await asyncio.sleep(0.3)  # room for a late duplicate to show up

    shown = [p["id"] for p in await shown_posts(page)]
    assert shown == [p["id"] for p in reversed([before, *during, after])]
    assert len(service.sessions) == 1


@pytest.mark.parametrize("code", [Close.SERVER_ERROR, Close.GOING_AWAY, Close.TOO_SLOW])
@pytest.mark.gen_test(timeout=60)
async def test_page_resumes_after_each_close_code_without_duplicates(browser, api, service, code):
    """The server closes the page's socket with 1011, 1001 or 4008; a post made while the page
    waits to reconnect, the one shown before and one made after each appear once, and the page
    is live again on exactly one new server session, having shown "Reconnecting" meanwhile."""
    page, author, _, before = await live_page(browser, api, "Jo Chen", "Kim Ito")

    # Pin the jitter so the page waits ~450 ms (0.9 of its first 500 ms ceiling) after 1011,
    # and record every state the connection pill shows.
    await page.evaluate(
        """window.__states = [];
        new MutationObserver(() => window.__states.push(
          document.getElementById('conn').dataset.state)
        ).observe(document.getElementById('conn'), {attributes: true, subtree: true,
                                                    childList: true, characterData: true});
        Math.random = () => 0.9;"""
    )
    assert len(service.sessions) == 1, "the page should hold exactly one feed session"
    dropped = next(iter(service.sessions))
    dropped.close(code)
    during = await api.post(author, "created while reconnecting")
    after_drop = await api.post(author, "created around the reconnect")
    for post in (during, after_drop):
        await wait_shown(page, post)
    await wait_live(page)
    after = await api.post(author, "created after the reconnect")
    await wait_shown(page, after)
    await asyncio.sleep(0.3)

    expected = [before, during, after_drop, after]
    shown = await shown_posts(page)
    assert [p["id"] for p in shown] == [p["id"] for p in reversed(expected)]
    assert "reconnecting" in await page.evaluate("window.__states")
    assert len(service.sessions) == 1 and dropped not in service.sessions


@pytest.mark.gen_test(timeout=60)
async def test_edit_and_delete_in_one_browser_are_seen_live_in_another(browser, api):
    """The author edits a post and deletes another from her page; the reader's page, in another
    browser context, shows the new text marked "edited" and loses the deleted post without a
    reload, and a reload does not bring it back. Only the author's own posts have the buttons;
    the delete asks first, in a dialog that opens on Cancel."""
    author, reader = await api.new_user("Lena Park"), await api.new_user("Omar Diaz")
    await api.follow(reader, author)
    kept, dropped = await api.post(author, "tpyo here"), await api.post(author, "take me back")
    mine, theirs = await browser.new_page(), await browser.new_page()
    for page, user in ((mine, author), (theirs, reader)):
        await log_in_with_keyboard(page, user)
        await wait_live(page)
        await wait_shown(page, dropped)
    assert await theirs.evaluate("document.querySelectorAll('.post-edit').length") == 0
    edit_button = f'li[data-id="{kept["id"]}"] .post-edit'
    assert (
        await mine.evaluate(
            f"document.querySelector({js(edit_button)}).getAttribute('aria-describedby')"
        )
        == f"post-text-{kept['id']}"
    )

    await mine.click(edit_button)
    editor = f"post-editor-{kept['id']}"
    assert await mine.evaluate("document.activeElement.id") == editor
    await mine.type(editor, "typo fixed <b>as text</b>")
    await mine.click(f'li[data-id="{kept["id"]}"] .post-editor button:not(.secondary)')
    shown_text = f'li[data-id="{kept["id"]}"] .post-text'
    for page in (mine, theirs):
        await page.wait_for(
            f"document.querySelector({js(shown_text)}).textContent === 'typo fixed <b>as text</b>'"
            f" && document.querySelector('li[data-id=\"{kept['id']}\"] .post-edited')"
        )
    assert await mine.evaluate("document.activeElement.classList.contains('post-edit')")

    await mine.click(f'li[data-id="{dropped["id"]}"] .post-delete')
    await mine.wait_for("document.getElementById('delete-dialog').open")
    assert await mine.evaluate("document.activeElement.textContent") == "Cancel"
    await mine.click("#delete-confirm")
    gone = f"!document.querySelector('#output > li[data-id=\"{dropped['id']}\"]')"
    for page in (mine, theirs):
        await page.wait_for(gone)
    assert [p["id"] for p in await shown_posts(theirs)] == [kept["id"]]

    await theirs.reload()
    await wait_live(theirs)
    await wait_shown(theirs, kept)
    assert [p["text"] for p in await shown_posts(theirs)] == ["typo fixed <b>as text</b>"]
