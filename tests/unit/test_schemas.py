"""Deploy body validation: the seed's ranges, and messages that name field and range."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raydock.client import default_deploy_body
from raydock.platform.schemas import DeployRequest, describe_error


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
