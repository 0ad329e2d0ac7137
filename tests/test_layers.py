"""feed_app's imports point one way: down a declared list of layers, and never round in a cycle.

Read statically from the source (every import statement, those under `if TYPE_CHECKING:` and
inside functions included), so a type hint cannot point up any more than a run-time import can.
"""

from __future__ import annotations

import ast
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "feed_app"

# Bottom first. A module may import modules of its own layer and of the layers below it. An entry
# names a module or a package (with everything in it).
LAYERS = [
    (
        "settings and formats",
        {"feed_app.config", "feed_app.wire", "feed_app.pids", "feed_app.once_per_turn"},
    ),
    ("the broker seam", {"feed_app.fanout"}),
    (
        "stores and connections",
        {"feed_app.horizon", "feed_app.metrics", "feed_app.db", "feed_app.auth", "feed_app.broker"},
    ),
    (
        "feeds",
        {
            "feed_app.sessions",
            "feed_app.relay",
            "feed_app.group_commit",
            "feed_app.path_check",
            "feed_app.revocations",
        },
    ),
    ("demo data", {"feed_app.demo"}),
    ("HTTP toolkit", {"feed_app.httpkit"}),
    ("HTTP edge, limits and posting", {"feed_app.edge", "feed_app.limits", "feed_app.posting"}),
    ("HTTP handlers", {"feed_app.handlers", "feed_app.login_handlers", "feed_app.feed_socket"}),
    ("wiring", {"feed_app.app"}),
]
HTTP_LAYERS = {"HTTP toolkit", "HTTP edge, limits and posting", "HTTP handlers", "wiring"}
HTTP_LIBRARIES = ("tornado.web", "tornado.websocket", "tornado.httpserver", "tornado.httputil")
# What the rest of the service must load without the web layer coming along.
BELOW_HTTP = ("feed_app.broker", "feed_app.config", "feed_app.wire")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every module the source of `name` imports: `from a import b` is a.b when that is a module
    of the package, else a."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules() else base)
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    return {name: {m for m in imports_of(name) if m in modules()} for name in modules()}


def layer_of(name: str) -> int | None:
    for index, (_, members) in enumerate(LAYERS):
        if any(name == member or name.startswith(member + ".") for member in members):
            return index
    return None


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph()[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_every_module_has_a_layer_and_every_layer_entry_a_module():
    unplaced = [name for name in modules() if name != PACKAGE and layer_of(name) is None]
    assert not unplaced, f"add these to LAYERS in {__name__}: {unplaced}"
    stale = [m for _, members in LAYERS for m in members if m not in modules()]
    assert not stale, f"no such modules: {stale}"


def test_imports_point_down_the_layers():
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for name, targets in graph().items()
        if name != PACKAGE
        for target in targets
        if target != PACKAGE and layer_of(target) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    cycles = {
        frozenset(other for other in reachable(name) if name in reachable(other))
        for name in modules()
        if name in reachable(name)
    }
    assert not cycles, "\n".join("a cycle through " + ", ".join(sorted(c)) for c in cycles)


def test_the_broker_settings_and_wire_formats_load_without_the_web_layer():
    for start in (name for name in modules() if name.startswith(BELOW_HTTP)):
        loaded = {start} | reachable(start)
        http = sorted(m for m in loaded if LAYERS[layer_of(m)][0] in HTTP_LAYERS)
        assert not http, f"{start} comes to import the HTTP layer: {http}"
        libraries = sorted(
            f"{m}: {i}" for m in loaded for i in imports_of(m) if i.startswith(HTTP_LIBRARIES)
        )
        assert not libraries, f"{start} comes to import the HTTP layer: {libraries}"


def test_pika_stays_in_the_broker_package():
    outside = [
        f"{name}: {target}"
        for name in modules()
        if not name.startswith("feed_app.broker")
        for target in imports_of(name)
        if target == "pika" or target.startswith("pika.")
    ]
    assert not outside, outside


def test_sessions_and_the_relay_reach_the_broker_only_through_the_seam():
    for name in ("feed_app.sessions", "feed_app.relay"):
        broker = sorted(t for t in imports_of(name) if t.startswith("feed_app.broker"))
        assert not broker, f"{name} imports {broker}: use feed_app.fanout"
