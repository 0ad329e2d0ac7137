"""The OpenAPI document is valid, served, and names every route the application has."""

import json

import pytest
import tornado.web
from openapi_spec_validator import validate
from tornado.httpclient import AsyncHTTPClient

from tests import contract

METHODS = ("get", "head", "post", "put", "delete", "patch", "options")


def test_the_document_is_valid_openapi_3_1():
    validate(contract.document())
    assert contract.document()["openapi"].startswith("3.1")


def implemented_methods(handler: type[tornado.web.RequestHandler]) -> set[str]:
    """The methods a handler class answers other than with 405."""
    return {
        method
        for method in METHODS
        if getattr(handler, method) is not getattr(tornado.web.RequestHandler, method)
    }


def test_every_route_of_the_app_is_documented_and_every_documented_route_exists(app):
    documented = contract.document()["paths"]
    seen = set()
    for rule in app.wildcard_router.rules:
        regex = rule.matcher.regex
        templates = [t for t in documented if regex.fullmatch(contract_example(t))]
        assert len(templates) == 1, f"route {regex.pattern} is documented as {templates}"
        [template] = templates
        seen.add(template)
        methods = set(documented[template])
        assert methods == implemented_methods(rule.target), (template, methods)
    assert seen == set(documented), f"documented but not routed: {set(documented) - seen}"


def contract_example(template: str) -> str:
    """A concrete path for a template: each parameter becomes 1."""
    return contract.template_regex(template).pattern.replace("[^/]+", "1").replace("\\", "")


def test_a_route_missing_from_the_document_is_found(app):
    app.wildcard_router.add_rules([(r"/post/undocumented", tornado.web.RequestHandler)])
    with pytest.raises(AssertionError, match="undocumented"):
        test_every_route_of_the_app_is_documented_and_every_documented_route_exists(app)


@pytest.mark.gen_test
async def test_the_document_is_served_as_checked_in(base_url, http_server):
    response = await AsyncHTTPClient().fetch(base_url + "/openapi.json")
    assert response.headers["Content-Type"].startswith("application/json")
    assert json.loads(response.body) == contract.document()
