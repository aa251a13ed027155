"""Deploy body validation: the seed's ranges, and messages that name field and range."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raydock.client import default_deploy_body
from raydock.platform.schemas import (
    DeployRequest,
    UploadSessionStart,
    UserCreate,
    describe_error,
)


def errors_for(**overrides) -> list[str]:
    body = default_deploy_body("x", **overrides)
    with pytest.raises(ValidationError) as exc:
        DeployRequest.model_validate(body)
    return [describe_error(e, DeployRequest)[1] for e in exc.value.errors()]


@pytest.mark.parametrize(
    ("group", "field", "value", "lo", "hi"),
    [
        ("hyperParameters", "temperature", 2.5, 0, 2),
        ("hyperParameters", "maxTokens", 513, 0, 512),
        ("hyperParameters", "topP", -0.1, 0, 1),
        ("hyperParameters", "topK", 0, 1, 100),
        ("scalingParameters", "maxBatchSize", 257, 1, 256),
        ("scalingParameters", "minReplicas", 0, 1, 10),
        ("scalingParameters", "maxReplicas", 51, 1, 50),
        ("scalingParameters", "scaleUpDelay", 1001, 1, 1000),
        ("scalingParameters", "scaleDownDelay", 0, 1, 2000),
    ],
)
def test_out_of_range_names_field_and_range(group, field, value, lo, hi):
    overrides = {group: {field: value}}
    if group == "scalingParameters" and field == "minReplicas":
        overrides[group]["maxReplicas"] = 1
    (msg,) = errors_for(**overrides)
    assert msg.startswith(f"{group}.{field} must be between {lo} and {hi}")


def test_timeout_range_and_device_type():
    (msg,) = errors_for(timeout=29)
    assert msg == "timeout must be between 30 and 180 (got 29)"
    (msg,) = errors_for(deviceType="g9.huge")
    assert "deviceType" in msg and "cpu-small" in msg and "g5.xlarge" in msg


def test_min_replicas_above_max():
    (msg,) = errors_for(scalingParameters={"minReplicas": 3, "maxReplicas": 2})
    assert "minReplicas (3) must not exceed maxReplicas (2)" in msg


def test_seed_sample_body_is_valid():
    body = default_deploy_body("Flant5_model", "g5.xlarge")
    body["scalingParameters"] = {
        "maxBatchSize": 10,
        "minReplicas": 1,
        "maxReplicas": 2,
        "scaleUpDelay": 30,
        "scaleDownDelay": 600,
    }
    assert DeployRequest.model_validate(body).scalingParameters.scaleDownDelay == 600


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (UserCreate, {"name": "x", "isAdmin": "yes"}, "isAdmin"),
        (UserCreate, {"name": "x", "isAdmin": 1}, "isAdmin"),
        (DeployRequest, {"timeout": "60"}, "timeout"),
        (DeployRequest, {"isDeployedPreviously": 0}, "isDeployedPreviously"),
    ],
)
def test_values_of_another_json_type_are_refused(model, body, field):
    """The document's types hold: no "yes" or 1 read as a boolean, no "60" as a number."""
    if model is DeployRequest:
        body = default_deploy_body("x") | body
    with pytest.raises(ValidationError) as exc:
        model.model_validate(body)
    assert [describe_error(e, model)[0] for e in exc.value.errors()] == [field]


def test_an_adapter_upload_names_its_base_model():
    body = {"fileName": "a.zip", "totalSize": 1, "totalChunks": 1, "kind": "adapter"}
    for missing in ({}, {"baseModelId": ""}, {"baseModelId": None}):
        with pytest.raises(ValidationError) as exc:
            UploadSessionStart.model_validate(body | missing)
        (err,) = exc.value.errors()
        assert describe_error(err, UploadSessionStart)[0] == "baseModelId"
    assert UploadSessionStart.model_validate(body | {"baseModelId": "cm-1"}).baseModelId
    assert UploadSessionStart.model_validate(body | {"kind": "base"}).baseModelId is None


def test_a_number_without_fraction_is_an_integer():
    """JSON has one number type: 60.0 is the integer 60 (JSON Schema agrees), 60.5 is none."""
    body = default_deploy_body("x", timeout=60.0)
    body["scalingParameters"] |= {"minReplicas": 2.0, "maxReplicas": 3.0}
    parsed = DeployRequest.model_validate(body)
    assert parsed.timeout == 60 and isinstance(parsed.timeout, int)
    assert parsed.scalingParameters.maxReplicas == 3
    (msg,) = errors_for(timeout=60.5)
    assert msg == "timeout must be a whole number"


def test_an_upload_size_fits_the_database():
    body = {"fileName": "a.zip", "totalChunks": 1, "totalSize": 2**63}  # was a 500 on insert
    assert UploadSessionStart.model_validate(body | {"totalSize": 2**53}).totalSize == 2**53
    with pytest.raises(ValidationError) as exc:
        UploadSessionStart.model_validate(body)
    assert describe_error(exc.value.errors()[0], UploadSessionStart)[0] == "totalSize"


@pytest.mark.parametrize("name", ["\x1e", " \u3000 ", "\x85", "\ufeffx", "a"])
def test_blank_is_what_the_document_says(name):
    """The document's NOT_BLANK pattern and the validator's str.strip() agree (`\\S` did not:
    JSON Schema's regex dialect does not count \\x1e as whitespace, Python does)."""
    import re

    from raydock.platform.schemas import NOT_BLANK

    body = default_deploy_body("x") | {"name": name}
    try:
        DeployRequest.model_validate(body)
        valid = True
    except ValidationError:
        valid = False
    assert valid == bool(re.search(NOT_BLANK, name))


@pytest.mark.parametrize("email", ["a@b.c", "a b@c.d", "a\x85@b.c", "a\x1e@b.c", "a@b"])
def test_email_pattern_reads_alike_in_python_and_pydantic(email):
    import re

    from raydock.platform.schemas import EMAIL_PATTERN

    try:
        UserCreate.model_validate({"name": "x", "email": email})
        valid = True
    except ValidationError:
        valid = False
    assert valid == bool(re.search(EMAIL_PATTERN, email))
