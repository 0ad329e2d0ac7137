"""The real page (static/index.html) in headless Chromium against the real in-process service.

Chromium is driven over the DevTools protocol with tornado's websocket client: no extra
dependencies. The module is skipped where no Chromium is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.support import PASSWORD, User

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no chromium or chromium-browser executable on PATH", allow_module_level=True)

XSS_TEXT = '<img src=x onerror="window.__xss=1"><b>bold</b>'

# What a failed wait prints: the parts of the page a human would look at.
PAGE_STATE = """({
  whoami: document.getElementById('whoami').textContent,
  conn: document.getElementById('conn-state').textContent,
  status: document.getElementById('status').textContent,
  posts: [...document.querySelectorAll('#output > li')].map(li => li.dataset.id),
})"""


class Browser:
    """One headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, process: subprocess.Popen, profile: str, ws: WebSocketClientConnection):
        self.process = process
        self.profile = profile
        self.ws = ws
        self.exceptions: list[str] = []  # uncaught exceptions thrown by the page's scripts
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def launch(cls, timeout: float = 15) -> Browser:
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
                    f"--user-data-dir={profile}",
                    "--remote-debugging-port=0",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: close() kills every child too
            )
        try:
            port = await cls._devtools_port(process, profile, timeout)
            response = await AsyncHTTPClient().fetch(
                f"http://127.0.0.1:{port}/json/list", request_timeout=timeout
            )
            page = next(t for t in json.loads(response.body) if t["type"] == "page")
            ws = await asyncio.wait_for(websocket_connect(page["webSocketDebuggerUrl"]), timeout)
        except BaseException:
            cls._kill(process, profile)
            raise
        browser = cls(process, profile, ws)
        try:
            await browser.send("Runtime.enable")
            await browser.send("Page.enable")
        except BaseException:
            await browser.close()
            raise
        return browser

    @staticmethod
    async def _devtools_port(process: subprocess.Popen, profile: str, timeout: float) -> int:
        """The port Chromium chose, from the first line of <profile>/DevToolsActivePort."""
        path = Path(profile, "DevToolsActivePort")
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(path.read_text().splitlines()[0])
            if process.poll() is not None or asyncio.get_running_loop().time() > deadline:
                log = Path(profile, "chromium.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"no DevToolsActivePort within {timeout} s (exit code {process.poll()}):\n{log}"
                )
            await asyncio.sleep(0.05)

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
        """One DevTools command; its result, or RuntimeError with the protocol's error."""
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

    async def goto(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        assert "errorText" not in result, f"cannot load {url}: {result['errorText']}"
        await self.wait_for(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        )

    async def close(self) -> None:
        self._reader.cancel()
        self.ws.close()
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


@pytest.fixture
def browser(io_loop) -> Iterator[Browser]:
    browser = io_loop.run_sync(Browser.launch)
    try:
        yield browser
    finally:
        io_loop.run_sync(browser.close)


# --- page steps: only what a user does, through the page's own elements ---------------------------


def js(value: Any) -> str:
    return json.dumps(value)


async def log_in_and_open_feed(browser: Browser, base_url: str, user: User) -> None:
    """Fill and submit the login form, click "Open feed", wait for the live state."""
    await browser.goto(base_url + "/")
    await browser.evaluate(
        f"""document.getElementById('login-id').value = {js(str(user.id))};
        document.getElementById('login-password').value = {js(PASSWORD)};
        document.querySelector('#login-form button[type=submit]').click();"""
    )
    await browser.wait_for(
        f"document.getElementById('whoami').textContent === {js(f'logged in as #{user.id}')}"
    )
    await browser.evaluate("document.getElementById('open-feed').click()")
    await wait_live(browser)


async def wait_live(browser: Browser) -> str:
    return await browser.wait_for(
        "(s => s.startsWith('live') && s)(document.getElementById('conn-state').textContent)"
    )


async def wait_shown(browser: Browser, post: dict) -> None:
    await browser.wait_for(f"document.querySelector('#output li.post[data-id=\"{post['id']}\"]')")


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_post_markup_is_shown_as_text_and_never_run(api, base_url, browser):
    """A followed author's post full of HTML reaches the page live and is rendered as plain text:
    the literal markup is the element's text, no <img>/<b> element is created in #output, and the
    onerror handler never runs (while the same markup parsed as HTML does run in this browser)."""
    author, follower = await api.new_user("author"), await api.new_user("follower")
    await api.follow(follower, author)
    await log_in_and_open_feed(browser, base_url, follower)
    assert await wait_live(browser) == "live (following 1)"

    post = await api.post(author, XSS_TEXT)
    await wait_shown(browser, post)
    shown = await browser.evaluate(
        f"""(() => {{
          const output = document.getElementById('output');
          const item = output.querySelector('li.post[data-id="{post["id"]}"]');
          return {{
            text: item.querySelector('.post-text').textContent,
            meta: item.querySelector('.post-meta').textContent,
            outputText: output.textContent,
            elements: [...output.querySelectorAll('*')].map(e => e.tagName),
          }};
        }})()"""
    )
    assert shown["text"] == XSS_TEXT
    assert XSS_TEXT in shown["outputText"]
    assert shown["meta"].startswith(f"#{post['id']} by user #{author.id} at ")
    assert shown["elements"] == ["LI", "DIV", "DIV"]  # one post: no IMG, no B, nothing else

    # Control: the same kind of markup parsed as HTML does fire its onerror here, so by the time
    # the control has fired, the post's handler would have fired too if the page had parsed it.
    await browser.evaluate(
        "document.createElement('div').innerHTML = '<img src=x onerror=\"window.__control=1\">'"
    )
    await browser.wait_for("window.__control === 1")
    assert await browser.evaluate("typeof window.__xss") == "undefined"
    assert browser.exceptions == []


@pytest.mark.gen_test(timeout=60)
async def test_page_resumes_after_a_dropped_socket_without_duplicates(
    api, base_url, service, browser
):
    """The server drops the page's socket with 1011; a post created while the page waits to
    reconnect, the post shown before the drop and a post created after the reconnect each end up
    in #output exactly once, and the page is live again on exactly one new server session."""
    author, follower = await api.new_user("author"), await api.new_user("follower")
    await api.follow(follower, author)
    await log_in_and_open_feed(browser, base_url, follower)
    before = await api.post(author, "shown before the drop")
    await wait_shown(browser, before)

    # Record every connection state the page shows; pin the backoff jitter so the page waits
    # ~450 ms (0.9 of its 500 ms first ceiling) before reconnecting: the window for `during`.
    await browser.evaluate(
        """window.__states = [];
        new MutationObserver(() => window.__states.push(
          document.getElementById('conn-state').textContent)
        ).observe(document.getElementById('conn-state'), {childList: true, characterData: true,
                                                           subtree: true});
        Math.random = () => 0.9;"""
    )
    assert len(service.sessions) == 1, "the page should hold exactly one feed session"
    dropped = next(iter(service.sessions))
    for session in list(service.sessions):
        session.close(1011, "test")
    await browser.wait_for(
        "document.getElementById('conn-state').textContent.startsWith('reconnecting')", timeout=2
    )
    during = await api.post(author, "created while reconnecting")
    conn_after_post = await browser.evaluate("document.getElementById('conn-state').textContent")
    assert conn_after_post.startswith("reconnecting"), conn_after_post

    await wait_shown(browser, during)
    assert await wait_live(browser) == "live (following 1)"
    after = await api.post(author, "created after the reconnect")
    await wait_shown(browser, after)
    await asyncio.sleep(0.3)  # room for a late duplicate to show up

    expected = [before, during, after]
    shown = await browser.evaluate(
        """[...document.querySelectorAll('#output > li')].map(li => ({
          id: Number(li.dataset.id), text: li.querySelector('.post-text').textContent}))"""
    )
    assert shown == [{"id": p["id"], "text": p["text"]} for p in reversed(expected)]  # newest first
    for post in expected:
        counts = await browser.evaluate(
            f"""({{
              byId: document.querySelectorAll('#output li.post[data-id="{post["id"]}"]').length,
              byText: [...document.querySelectorAll('#output .post-text')]
                .filter(e => e.textContent === {js(post["text"])}).length,
            }})"""
        )
        assert counts == {"byId": 1, "byText": 1}, f"post {post['id']} shown {counts}"

    states = await browser.evaluate("window.__states")
    assert any(s.startswith("reconnecting") for s in states), states
    assert states[-1] == "live (following 1)", states
    status = await browser.evaluate("document.getElementById('status').textContent")
    assert status == "feed connection lost (code 1011: test)"
    assert len(service.sessions) == 1 and dropped not in service.sessions
    assert browser.exceptions == []
