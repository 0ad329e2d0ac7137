"""The saturation search of the load test (`--saturate`): the highest posting rate a service holds.

A step posts at one rate for a while on the same open sessions. It holds that rate when every
post was accepted, the posts went out at the rate, nothing was lost or duplicated, and the
deliveries kept up: achieved deliveries/s within `tolerance` of expected.

From the start rate the search multiplies the rate by `factor` while every step holds, divides
it while none has, then bisects between the highest rate held and the lowest not held,
`refine` times. It is bounded by `max_steps` steps, and it stops at once after a step that lost
or duplicated a delivery: its posts may still be on their way, so the next step would start
behind, and a service that loses posts has no throughput worth measuring.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

Step = Callable[[float], Awaitable[dict[str, Any]]]  # rate -> a posting phase's results


def why_not_held(phase: dict[str, Any], tolerance: float) -> str | None:
    """None when the phase held its rate, else why not."""
    posts, deliveries = phase["posts"], phase["deliveries"]
    refused = posts["planned"] - posts["accepted"]
    if refused:
        return f"{refused} of {posts['planned']} posts not sent or not accepted"
    sent_rate = posts["achieved_rate"] or 0.0
    if sent_rate < (1 - tolerance) * phase["rate"]:
        return f"posting fell behind: {sent_rate:g} of {phase['rate']:g} posts/s"
    if _broken(phase):
        return "deliveries lost or duplicated"
    expected, achieved = deliveries["expected_per_s"], deliveries["achieved_per_s"] or 0.0
    if expected and achieved < (1 - tolerance) * expected:
        return f"deliveries fell behind: {achieved:g} of {expected:g}/s"
    return None


def _broken(phase: dict[str, Any]) -> bool:
    deliveries = phase["deliveries"]
    return bool(
        deliveries["lost"] or deliveries["lost_to_closed_sessions"] or deliveries["duplicated"]
    )


async def search(
    run_step: Step,
    *,
    start: float,
    factor: float,
    max_steps: int,
    refine: int,
    tolerance: float,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    held, not_held = 0.0, math.inf  # highest rate held, lowest rate not held
    stopped = None
    rate = start
    for _ in range(max_steps):
        phase = await run_step(rate)
        why_not = why_not_held(phase, tolerance)
        steps.append({**phase, "held": why_not is None, "why_not": why_not})
        if why_not is None:
            held = max(held, rate)
        else:
            not_held = min(not_held, rate)
        if _broken(phase):
            stopped = f"step at {rate:g} posts/s lost or duplicated deliveries"
            break
        if held and not_held < math.inf:
            if refine <= 0:
                break
            refine -= 1
            rate = (held + not_held) / 2
        else:
            rate = rate * factor if held else rate / factor
    else:
        stopped = f"after {max_steps} steps" if not (held and not_held < math.inf) else None
    achieved = [s["deliveries"]["achieved_per_s"] or 0.0 for s in steps]
    at_held = [s["deliveries"]["achieved_per_s"] for s in steps if s["held"] and s["rate"] == held]
    return {
        "rate_held": held or None,
        "lowest_rate_not_held": None if not_held == math.inf else not_held,
        "deliveries_per_s_held": at_held[0] if at_held else None,
        # What the service delivered at most, overloaded steps included: its throughput.
        "deliveries_per_s_max": max(achieved, default=None),
        "stopped": stopped,
        "steps": steps,
    }
