"""schemathesis against the whole OpenAPI document the gateway serves (management and
inference), with every check it has: the document and the server must agree on every status,
content type, header and body, also for the malformed requests it generates.

Checks (schemathesis 4.x runs all of its built-in checks by default; `CHECKS` names them so
that a check a later version adds, or one a config would switch off, shows up here):

- not_a_server_error: no 5xx for any request
- status_code_conformance: every status is one the operation documents
- content_type_conformance: every response's Content-Type is one the document gives it
- response_headers_conformance: documented response headers are present and valid
- response_schema_conformance: every body validates against the documented schema
  (errors against ErrorResponse)
- negative_data_rejection: a request that violates the document gets a 4xx
- positive_data_acceptance: a request that conforms gets a 2xx (or 401/403/404/409/429)
- missing_required_header: a request without a required header gets a 4xx
- unsupported_method: a method the path does not document gets a 405
- allow_header_conformance: the `Allow` header (of an OPTIONS reply) names exactly the path's
  documented methods
- ignored_auth: an operation that declares a security scheme refuses no key or a wrong one
- use_after_free: a resource deleted with DELETE is gone (stateful test)
- ensure_resource_availability: a resource just created can be read (stateful test)
- object_level_authorization: one identity cannot read another's objects. It needs several
  identities configured as peers (WFC auth); raydock's management keys all see every object by
  design, and a deployment key's scope is checked by ignored_auth's wrong-key probe and by
  test_hostile, so it runs here without peers and asserts nothing.

Bounds: the file's tests take about 2½ minutes on a 2-core machine (MAX_EXAMPLES per operation
besides the coverage phase's own cases, no shrinking, STATEFUL_EXAMPLES short scenarios;
inference replies are capped at MAX_TOKENS tokens and N_CAP choices). A deeper run:
RAYDOCK_SCHEMATHESIS_EXAMPLES=200 (about 3½ minutes).
"""

from __future__ import annotations

import os

import hypothesis
import pytest
import schemathesis
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

from raydock.serve_apps.protocol import MAX_TOKENS_LIMIT
from tests.e2e.conftest import Live, Platform

pytestmark = pytest.mark.e2e

# fuzzing examples per operation (the coverage phase adds its own); more for a deeper run
MAX_EXAMPLES = int(os.environ.get("RAYDOCK_SCHEMATHESIS_EXAMPLES", "6"))
STATEFUL_EXAMPLES = 40  # scenarios, of at most STATEFUL_STEPS requests each
STATEFUL_STEPS = 8
STATEFUL_RUNS = 8  # ...in this many runs (see test_stateful)
MAX_TOKENS = 4  # generated inference requests decode at most this many tokens...
N_CAP = 2  # ...in at most this many choices
TIMEOUT_S = 30  # per request: the slowest legitimate one is an inference call of MAX_TOKENS

ALL_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
    "use_after_free",
    "ensure_resource_availability",
    "object_level_authorization",
)


def test_every_check_schemathesis_offers_is_enabled():
    load_all_checks()
    assert set(CHECKS.get_all_names()) == set(ALL_CHECKS)


# ------------------------------------------------------------------ the schema under test


@pytest.fixture(scope="session")
def protected(platform: Platform, live: Live) -> set[str]:
    """Ids of everything that existed before schemathesis ran: the objects later test files
    use (the live deployment, its model and key, the admin). schemathesis may create and
    destroy what it creates, but must not change or delete these (see `guard`)."""
    client = platform.client
    ids = {platform.client.get("/me")["userId"], "me"}  # the admin: whose key runs the tests
    for model in client.every("/models", "models", "modelId"):
        ids.add(model["modelId"])
        for dep in client.get(f"/models/{model['modelId']}/deployments")["deployments"]:
            ids.add(dep["deploymentId"])
            for key in client.get(f"/deployments/{dep['deploymentId']}/api-keys")["apiKeys"]:
                ids.add(key["keyId"])
    return ids


@pytest.fixture(scope="session")
def api_schema(platform: Platform, live: Live):
    dep = live.deployment
    config = schemathesis.Config.from_dict(
        {
            "request-timeout": TIMEOUT_S,
            # failures show every value (the keys are this session's throwaway ones)
            "output": {"sanitization": {"enabled": False}},
            "generation": {"max-examples": MAX_EXAMPLES, "no-shrink": True},
            "checks": {name: {"enabled": True} for name in ALL_CHECKS},
            # the keys for the document's security schemes (openapi_doc.SECURITY_SCHEMES)
            "auth": {
                "openapi": {
                    "ManagementKey": {"api_key": platform.admin_key},
                    "DeploymentKey": {"bearer": live.key},
                }
            },
            # inference on the live deployment (a random id is a 404 before any validation);
            # management ids stay random: they exercise the 404s, and leave the live objects be
            "parameters": {"path.deployment_id": dep["deploymentId"]},
        }
    )
    return schemathesis.openapi.from_url(f"{platform.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    """schemathesis 4.32 reads `request.node._nodeid` to name each operation's subtest; pytest
    9.2 keeps the id elsewhere (`nodeid` is a property now). Give it the attribute it reads."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def cap_generation(case) -> None:
    """Keep generated inference requests cheap: at most MAX_TOKENS tokens and N_CAP choices.
    Only valid values are lowered (an invalid one is what a negative case tests)."""
    body = case.body
    if case.path.startswith("/api/") or not isinstance(body, dict):
        return
    for field, cap, limit in (
        ("max_tokens", MAX_TOKENS, MAX_TOKENS_LIMIT),
        ("max_completion_tokens", MAX_TOKENS, MAX_TOKENS_LIMIT),
        ("max_output_tokens", MAX_TOKENS, MAX_TOKENS_LIMIT),  # the Responses API's name
        ("n", N_CAP, 8),
    ):
        value = body.get(field)
        if type(value) in (int, float) and 1 <= value <= limit and value == int(value):
            body[field] = min(int(value), cap)
    # no limit (absent, or null: both mean the deployment's default of 512) decodes for
    # seconds; such cases were a third of the file's time
    if case.path.endswith("/responses"):
        if body.get("max_output_tokens") is None:
            body["max_output_tokens"] = MAX_TOKENS
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS


DESTRUCTIVE = {"DELETE", "PATCH", "PUT"}
# POSTs that change or start work on the object their path names (creating a key, exporting
# or reading are harmless)
DESTRUCTIVE_POSTS = (
    "/deploy",
    "/redeploy",
    "/retrigger",
    "/undeploy",
    "/rollback",
    "/complete",
    "/chunks/",
    "/rotate-key",
)


def guard(case, protected: set[str]) -> None:
    """Never let a generated request change or delete an object later test files rely on."""
    method = case.method.upper()
    changes = method in DESTRUCTIVE or (
        method == "POST" and any(p in case.path for p in DESTRUCTIVE_POSTS)
    )
    touched = {str(v) for v in (case.path_parameters or {}).values()}
    hypothesis.assume(not (changes and case.path.startswith("/api/") and touched & protected))


# Refusals of a schema-valid request that no OpenAPI document can rule out, by operation
# (matched on the error body's `code`, or `param`): positive_data_acceptance allows exactly
# these, and still fails any other 4xx for a conforming request.
# - inference: what only the deployment can judge (openapi_doc.INFERENCE_400): whether its
#   engine can enforce a JSON schema's keywords, a regex (Rust dialect) or a grammar, or take
#   a penalty; its vocabulary (logit_bias ids) and context length; its chat template; and two
#   cross-field rules JSON Schema cannot state briefly (one output format at most, tool_choice
#   naming a declared tool)
DEPLOYMENT_REFUSALS = {
    "unsupported_schema",
    "unsupported_parameter",
    "context_length_exceeded",
    "invalid_messages",
}
# - management: what only the cluster, the Hub or the network can judge (where a webhook's
#   host resolves); whether the cluster has the
#   deviceType's GPUs, whether its hardware runs the optimization, whether the model fits
#   it, whether a Hugging Face token authenticates; (413) whether an upload's totalSize
#   fits the platform's archive limit and its free disk; and a cross-field rule JSON Schema
#   cannot state: an upload's totalChunks against its totalSize and the chunk limit
MANAGEMENT_REFUSALS = {
    "device_unavailable",
    "invalid_optimization",
    "insufficient_memory",
    "invalid_token",
    "archive_too_large",
    "insufficient_storage",
    "invalid_chunking",
    "invalid_period",  # GET /usage: start before end, a span by minute or hour
    "webhook_address_refused",  # where a webhook's host resolves (the network's to say)
}
# - POST /models/import: the upload's file name must end in .zip (it names the model); OpenAPI
#   cannot constrain a multipart part's file name, and schemathesis sends none
IMPORT_FILE_NAME = "file"


def positive_data_acceptance_but_what_no_document_can_state(ctx, response, case):
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        refused = response.status_code in (400, 413)
        error = (response.json() or {}).get("error", {}) if refused else {}
        if case.path.startswith("/api/"):
            if case.path.endswith("/models/import") and error.get("param") == IMPORT_FILE_NAME:
                return None
            if error.get("code") in MANAGEMENT_REFUSALS:
                return None
        elif error.get("code") in DEPLOYMENT_REFUSALS:
            return None
        raise


@schema.parametrize()
@hypothesis.settings(
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
def test_api(case, protected):
    guard(case, protected)
    cap_generation(case)
    case.call_and_validate(
        excluded_checks=[positive_data_acceptance],
        additional_checks=[positive_data_acceptance_but_what_no_document_can_state],
    )


def test_stateful(api_schema, protected):
    """Sequences along the links schemathesis infers (an id one response names, used by the
    next request): use_after_free and ensure_resource_availability check these."""

    class Workflow(api_schema.as_state_machine()):
        def before_call(self, case):
            guard(case, protected)
            cap_generation(case)

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(
                response,
                excluded_checks=[positive_data_acceptance],
                additional_checks=[positive_data_acceptance_but_what_no_document_can_state],
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    settings = hypothesis.settings(
        max_examples=STATEFUL_EXAMPLES // STATEFUL_RUNS,
        stateful_step_count=STATEFUL_STEPS,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    # The server's state outlives a scenario (models, names, keys made earlier), so the same
    # choices can meet a different bundle, and hypothesis then abandons its whole run
    # (FlakyStrategyDefinition: it says nothing about the API; a failed check raises its own
    # error). Several short runs, each with a fresh choice tree, keep that from ending the test.
    completed = 0
    for _ in range(STATEFUL_RUNS):
        try:
            Workflow.run(settings=settings)
            completed += 1
        except FlakyStrategyDefinition:
            continue
    assert completed >= STATEFUL_RUNS // 2, f"only {completed} of {STATEFUL_RUNS} runs finished"
