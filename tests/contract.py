"""The OpenAPI document (feed_app/openapi.json) as a test oracle: which operation a request is,
which statuses it may answer, and whether a body matches the documented schema."""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema

DOCUMENT_PATH = pathlib.Path(__file__).resolve().parent.parent / "feed_app" / "openapi.json"
_BASE = "urn:feed-openapi"


@functools.cache
def document() -> dict[str, Any]:
    return json.loads(DOCUMENT_PATH.read_text())


@functools.cache
def _registry() -> referencing.Registry:
    resource = referencing.jsonschema.DRAFT202012.create_resource(document())
    return referencing.Registry().with_resource(_BASE, resource)


def _pointer(*parts: str) -> str:
    return "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def template_regex(template: str) -> re.Pattern:
    """/user/get/{id} -> a regex matching /user/get/<anything but a slash>."""
    parts = re.split(r"\{[^}]+\}", template)
    return re.compile("[^/]+".join(re.escape(part) for part in parts))


def operation_path(path: str) -> str | None:
    """The documented path template a request path (without its query) belongs to."""
    for template in document()["paths"]:
        if template_regex(template).fullmatch(path):
            return template
    return None


def response(template: str, method: str, status: int) -> tuple[dict[str, Any], str] | None:
    """The documented response object, references followed, and its JSON pointer; None if this
    status is not documented for the operation."""
    pointer = _pointer("paths", template, method.lower(), "responses", str(status))
    node = _at(pointer)
    while node is not None and "$ref" in node:
        pointer = node["$ref"].removeprefix("#/")
        node = _at(pointer)
    return None if node is None else (node, pointer)


def _at(pointer: str) -> Any:
    node: Any = document()
    for part in pointer.split("/"):
        if not isinstance(node, dict):
            return None
        node = node.get(part.replace("~1", "/").replace("~0", "~"))
    return node


def check(method: str, path: str, status: int, body: Any, content_type: str = "") -> None:
    """Fail unless this answer is documented: a documented path answers a documented status,
    with a JSON body that matches its schema. An undocumented path may only answer 404."""
    path = path.split("?", 1)[0]
    template = operation_path(path)
    if template is None:
        assert status == 404, f"{method} {path} answered {status} but is not in the document"
        return
    operation = document()["paths"][template].get(method.lower())
    if operation is None:
        assert status == 405, f"{method} {template} answered {status} but is not documented"
        return
    documented = response(template, method, status)
    assert documented is not None, f"{method} {template}: status {status} is not documented"
    answer, pointer = documented
    if "application/json" not in answer.get("content", {}):
        return
    assert content_type.startswith("application/json"), (method, template, content_type)
    schema = {"$ref": f"{_BASE}#/{pointer}/{_pointer('content', 'application/json', 'schema')}"}
    validator = jsonschema.Draft202012Validator(
        schema, registry=_registry(), format_checker=jsonschema.FormatChecker()
    )
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: {errors[0].message} in {body!r}"
