"""A refused field reads as raydock's other messages do: the field named and what it allows
said in words (errors.describe_validation_error), never pydantic's own phrasing."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from raydock import errors
from raydock.client import default_deploy_body
from raydock.platform.api import app

#: pydantic's phrasing, which no message may carry
PYDANTIC = re.compile(
    r"Value error|Assertion failed|String should|Input should|Field required|Extra inputs|"
    r"should match pattern|\^\[|instance of"
)


def _body_models() -> set[type[BaseModel]]:
    """Every model a management route's body is validated with, nested ones too."""
    found: set[type[BaseModel]] = set()
    todo = [
        r.body_field.field_info.annotation for r in app.routes if getattr(r, "body_field", None)
    ]
    while todo:
        model = todo.pop()
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or model in found:
            continue
        found.add(model)
        todo += [errors._model_in(f.annotation) for f in model.model_fields.values()]
    return found


def test_every_pattern_of_a_request_body_is_said_in_words():
    """A pattern added to a body model without words (errors.explained) fails here, unless
    it is one character class, which is put in words by itself."""
    patterns = []
    for model in _body_models():
        for name, info in model.model_fields.items():
            for m in info.metadata:
                if getattr(m, "pattern", None):
                    patterns.append((f"{model.__name__}.{name}", m.pattern, info))
    assert len(patterns) >= 5  # repo ids, tokens, emails, zip names, sha256
    for where, pattern, info in patterns:
        words = errors.pattern_words(pattern, info)
        assert not words.startswith("must match the regular expression"), where


class Named(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    code: str = Field("AB", pattern=r"^[A-Z]{2}$")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "a b"}, "name may hold letters, digits, '_', '.', '-' (1–64 characters)"),
        ({"name": "ab", "code": "abc"}, "code may hold capital letters (2 characters)"),
        ({}, "name is required"),
        ({"name": "x" * 65}, "name: at most 64 characters (got 65)"),
        ({"name": "a", "nmae": 1}, "nmae: unknown field (allowed: name, code)"),
    ],
)
def test_an_app_with_raydocks_errors_says_what_is_allowed(body, message):
    """Any app errors.install serves (either plane's) answers in words, with `detail`."""
    test_app = FastAPI()
    errors.install(test_app)

    @test_app.post("/named")
    async def named(named: Named):
        return named

    r = TestClient(test_app).post("/named", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert message in error["message"], error["message"]
    assert not PYDANTIC.search(error["message"])
    assert error["code"] == "validation_error" and r.json()["detail"][0]["field"] == error["param"]


def test_the_management_api_refuses_in_its_own_words(api):
    """Bodies and query parameters of the real routes: the field, what it allows, the
    status and body shape as before (422, `detail` naming each field)."""
    _, admin_key = api
    deploy = default_deploy_body("d")
    cases = [
        (
            "POST",
            "/public/models/cm-x/deploy?modelType=openSource",
            deploy | {"name": " "},
            "name must not be blank",
        ),
        (
            "POST",
            "/public/models/cm-x/deploy?modelType=openSource",
            deploy | {"deviceType": "tpu"},
            "deviceType must be one of ",
        ),
        (
            "POST",
            "/public/models/cm-x/deploy?modelType=openSource",
            deploy | {"scalingParameters": {"minReplicas": 3, "maxReplicas": 2}},
            "scalingParameters: minReplicas (3) must not exceed maxReplicas (2)",
        ),
        (
            "POST",
            "/public/models/cm-x/deploy?modelType=openSource",
            deploy | {"hyperParameters": []},
            "hyperParameters must be an object",
        ),
        (
            "POST",
            "/public/users",
            {"name": "x", "email": "no-at"},
            "email must be an email address",
        ),
        (
            "POST",
            "/public/connections",
            {"name": "c", "token": "has space"},
            "token may hold visible ASCII characters only",
        ),
        ("POST", "/public/users", {"name": " \t"}, "name must not be blank"),
        ("POST", "/public/connections", {"name": "\u3000", "token": "t"}, "name must not be blank"),
        (
            "POST",
            "/public/deployments/dep-x/api-keys",
            {"name": "  "},
            "name must not be blank",
        ),
        (
            "POST",
            "/public/models/import/huggingface",
            {"repoId": "a b"},
            "repoId must be a Hugging Face repo id",
        ),
        (
            "POST",
            "/public/files/session/start",
            {"fileName": "model.tar", "totalSize": 1, "totalChunks": 1},
            "fileName must be a file name ending in .zip",
        ),
        ("POST", "/public/deployments/dp-x/api-keys", {"name": ""}, "name: at least 1 character"),
        (
            "POST",
            "/public/deployments/dp-x/api-keys",
            {"name": "k", "limit": {}},
            "limit: unknown field (allowed: name, limits)",
        ),
        (
            "PATCH",
            "/public/deployments/dp-x",
            {"name": "renamed"},
            "name: unknown field (allowed: description, tags, timeout)",
        ),
        (
            "POST",
            "/public/deployments/dp-x/rollback?version=0",
            None,
            "version must be at least 1 (got 0)",
        ),
        (
            "POST",
            "/public/apply",
            {
                "documents": [
                    {
                        "spec": {
                            "name": "a",
                            "deviceType": "cpu-small",
                            "model": {"zip": "a.zip", "sha256": "ABC"},
                        }
                    }
                ]
            },
            "documents.0: model.sha256 must be 64 lowercase hexadecimal digits",
        ),
    ]
    with TestClient(app) as http:
        for method, url, body, expected in cases:
            r = http.request(method, url, json=body, headers={"X-api-key": admin_key})
            assert r.status_code == 422, (url, r.text)
            error = r.json()["error"]
            assert expected in error["message"], (url, error["message"])
            assert not PYDANTIC.search(error["message"]), (url, error["message"])
            assert error["code"] == "validation_error" and error["param"]
            assert [d["field"] for d in r.json()["detail"]][0] == error["param"]


def test_an_exclusive_bound_is_not_said_as_between():
    class Sized(BaseModel):
        size: int = Field(1, gt=0, le=10)
        count: int = Field(1, ge=0, le=10)

    def said(body: dict) -> str:
        with pytest.raises(ValueError) as exc:
            Sized.model_validate(body)
        return errors.describe_validation_error(exc.value.errors()[0], Sized)[1]

    assert said({"size": 0}) == "size must be greater than 0 and at most 10 (got 0)"
    assert said({"count": 11}) == "count must be between 0 and 10 (got 11)"
