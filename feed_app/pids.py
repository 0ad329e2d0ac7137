"""Whether a process exists, for the tools that find pids they did not start: run.py (the metrics
directories of earlier runs) and deploy/ (a cluster's processes started by an earlier command)."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
