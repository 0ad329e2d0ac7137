"""The figures that compare the fan-out modes with each other and with the ceilings, computed from
a load test's results (they go into its JSON and under its table).

- each mode as a share of the ceilings: its deliveries/s over the bare Tornado push server's and
  over the lower of the two ceilings; with --saturate, its most deliveries/s in a step too;
- each mode's service CPU per delivery against the floor (one prebuilt frame written to each
  socket): the floor's CPU per write over the mode's;
- each mode's p99 over its p50 (with --saturate, at half the rate it held);
- process over session, when both ran: CPU per delivery (service, RabbitMQ), deliveries/s, at
  saturation too, latency, ready time and memory per session.
"""

from __future__ import annotations

from typing import Any

from bench.lib.feedclient import ratio


def _get(tree: dict[str, Any] | None, *path: str) -> Any:
    """tree[path[0]][path[1]]... or None where something is missing."""
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


# name -> where the figure is in one mode's results
FIGURES = {
    "service_cpu_us_per_delivery": ("phase", "resources", "service_cpu_us_per_delivery"),
    "rabbitmq_cpu_us_per_delivery": ("phase", "resources", "rabbitmq_cpu_us_per_delivery"),
    "deliveries_per_s": ("phase", "deliveries", "achieved_per_s"),
    "deliveries_per_s_at_saturation": ("saturation", "deliveries_per_s_max"),
    "rate_held": ("saturation", "rate_held"),
    "create_receive_p50_ms": ("phase", "latency_ms", "p50"),
    "create_receive_p99_ms": ("phase", "latency_ms", "p99"),
    "ready_p99_ms": ("sessions", "ready_ms", "p99"),
    "service_bytes_per_session": ("memory", "service_bytes_per_session"),
    "rabbitmq_bytes_per_session": ("memory", "rabbitmq_bytes_per_session"),
    "rabbitmq_queue_bytes_per_session": ("rabbitmq", "queue_bytes_per_session"),
    "rabbitmq_bindings": ("rabbitmq", "run_bindings"),
}


def per_mode(run: dict[str, Any], ceilings: dict[str, Any] | None) -> dict[str, Any]:
    bare = _get(ceilings, "bare_push", "deliveries_per_s")
    lower = _get(ceilings, "lower_per_s")
    achieved = _get(run, *FIGURES["deliveries_per_s"])
    saturated = _get(run, *FIGURES["deliveries_per_s_at_saturation"])
    floor_us = _get(ceilings, "bare_push", "floor", "server_cpu_us_per_write")
    service_us = _get(run, *FIGURES["service_cpu_us_per_delivery"])
    return {
        "share_of_bare_push": ratio(achieved, bare, 3),
        # The floor's CPU per write over the mode's per delivery: 1.0 would be a service whose
        # every cost beyond one prebuilt write per socket is gone.
        "cpu_share_of_floor": ratio(floor_us, service_us, 3),
        "share_of_lower_ceiling": ratio(achieved, lower, 3),
        "saturation_share_of_bare_push": ratio(saturated, bare, 3),
        "p99_over_p50": ratio(
            _get(run, *FIGURES["create_receive_p99_ms"]),
            _get(run, *FIGURES["create_receive_p50_ms"]),
            2,
        ),
    }


def compare(results: dict[str, Any]) -> dict[str, Any]:
    runs, ceilings = results["runs"], results.get("ceilings")
    comparison: dict[str, Any] = {mode: per_mode(run, ceilings) for mode, run in runs.items()}
    if "session" in runs and "process" in runs:
        comparison["process_over_session"] = {
            name: ratio(_get(runs["process"], *path), _get(runs["session"], *path), 3)
            for name, path in FIGURES.items()
        }
    return comparison
