"""A new post, whichever way it comes: POST /post/create, or a post message on the author's own
feed socket (docs/websocket.md). Both check its text alike, count it against the author's post
rate alike and store it through the same group commit, so a post is the same post either way.

The socket is the cheaper way: it skips an HTTP request, its headers and its token check
(BENCHMARKS.md, "Posting over the feed socket").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from feed_app.httpkit import ApiError, check_field

if TYPE_CHECKING:
    from feed_app.db import Post
    from feed_app.group_commit import GroupCommit
    from feed_app.limits import Limits

MAX_POST_LENGTH = 1000


class Service(Protocol):
    limits: Limits
    posts: GroupCommit


def check_text(text: Any) -> str:
    """A post's text as sent, or 400 with what is wrong with it."""
    check_field("text", text, str)
    if not text.strip():
        raise ApiError(400, "text must not be empty")
    if len(text) > MAX_POST_LENGTH:
        raise ApiError(400, f"text must be at most {MAX_POST_LENGTH} characters")
    return text


async def create_post(service: Service, author: int, text: Any) -> Post:
    """Store and publish a post: 400 for its text, 429 past the author's post rate (limits.py),
    DatabaseUnavailable when PostgreSQL cannot take it."""
    text = check_text(text)
    await service.limits.post(author)
    return await service.posts.create(author, text)
