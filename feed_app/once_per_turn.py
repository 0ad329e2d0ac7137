"""Work asked for many times in one event-loop turn, done once at its end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class OncePerTurn:
    """Runs `work` once, at the end of the current event-loop turn, however often it was asked
    for during the turn: one post fans out to many sessions in one turn, and what each of them
    asks of the broker (acks, binds) then goes out as one burst instead of one frame each; the
    posts asked for in one turn go to PostgreSQL as one batch (group_commit.py)."""

    def __init__(self, work: Callable[[], None]) -> None:
        self._work = work
        self._scheduled = False

    @property
    def asked(self) -> bool:
        """Asked for in this turn, and not yet run."""
        return self._scheduled

    def ask(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False  # first: work asked for by the work itself runs next turn
        self._work()
