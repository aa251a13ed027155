"""A failed deploy reports the replica's own exception, not Serve's generic app message."""

from __future__ import annotations

from types import SimpleNamespace

from raydock.platform.lifecycle import failure_reason

SERVE_MESSAGE = """The deployment failed to start 3 times in a row. This may be due to a problem \
with its constructor or initial health check failing. See controller logs for details. Error:
Traceback (most recent call last):
  File "/x/site-packages/ray/serve/_private/replica.py", line 1090, in initialize_callable
    await self._user_callable_wrapper.initialize_callable()
ray.exceptions.RayTaskError(RuntimeError): ray::ServeReplica:dp-1:engine.initialize()
RuntimeError: Error(s) in loading state_dict for LlamaForCausalLM:
	size mismatch for model.layers.0.mlp.up_proj.weight: copying a param with shape [128, 64]
"""


def app(message: str | None, app_message: str = "Failed to update the deployments ['engine']."):
    deployment = SimpleNamespace(message=message)
    return SimpleNamespace(
        deployments={"engine": deployment}, message=app_message, status="DEPLOY_FAILED"
    )


def test_the_replicas_exception_is_the_reason():
    reason = failure_reason(app(SERVE_MESSAGE))
    assert reason.startswith("a replica failed to start: RuntimeError: Error(s) in loading")
    assert "size mismatch for model.layers.0.mlp.up_proj.weight" in reason


def test_without_an_exception_the_apps_message_stays():
    assert failure_reason(app("")) == "Failed to update the deployments ['engine']."
    assert failure_reason(app(None, app_message="")) == "DEPLOY_FAILED"


VLLM_CONFIG_MESSAGE = """The deployment failed to start 3 times in a row. Error:
Traceback (most recent call last):
ray.exceptions.RayTaskError(ValidationError): ray::ServeReplica:dp-1:engine.initialize()
pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig
  Value error, torch.float32 is not supported for quantization method awq. Supported dtypes: \
[torch.float16, torch.bfloat16] [type=value_error, input_value=ArgsKwargs((), {}), input_type=A]
    For further information visit https://errors.pydantic.dev/2.12/v/value_error
"""


def test_a_validation_error_says_what_failed_validation():
    """vLLM refusing its configuration: the reason was only "1 validation error for
    VllmConfig", what was wrong only in the controller's log."""
    reason = failure_reason(app(VLLM_CONFIG_MESSAGE))
    assert "1 validation error for VllmConfig" in reason
    assert "torch.float32 is not supported for quantization method awq" in reason
    assert "input_value" not in reason
