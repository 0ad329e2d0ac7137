"""A real browser (headless Chromium) opens the feed with the token as a subprotocol: what the
page should do (README, "The feed websocket"). Skipped where Chromium is not installed."""

import logging

import pytest

from tests import test_page_browser
from tests.test_page_browser import js

browser = test_page_browser.browser  # its fixture: Chromium driven over the DevTools protocol


@pytest.mark.gen_test(timeout=60)
async def test_a_browser_opens_the_feed_with_the_token_as_a_subprotocol(
    api,
    base_url,
    browser,
    caplog,
):
    author, user = await api.new_user(), await api.new_user()
    await api.follow(user, author)
    caplog.set_level(logging.INFO)
    await browser.goto(base_url + "/")
    url = base_url.replace("http", "ws", 1) + f"/post/feed/{user.id}"
    opened = await browser.evaluate(
        f"""new Promise(resolve => {{
          const ws = new WebSocket({js(url)}, ['feed', 'bearer.' + {js(user.token)}]);
          ws.onmessage = (event) => {{
            const message = JSON.parse(event.data);
            if (message.type === 'ready') {{
              resolve({{protocol: ws.protocol, url: ws.url, ready: message}});
              ws.close(1000);
            }}
          }};
          ws.onclose = (event) => resolve({{closed: event.code}});
        }})"""
    )
    assert opened == {"protocol": "feed", "url": url, "ready": {"type": "ready", "following": 1}}
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"/post/feed/{user.id}" in logged and user.token not in logged
