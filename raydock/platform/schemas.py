"""Request bodies of the management API, with the seed's parameter ranges.

These models are the single definition of every allowed range: FastAPI validates with them,
the OpenAPI document is generated from them, and `describe_error` reads the range back to
tell the user what is allowed.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from raydock import params
from raydock.config import hardware_profiles
from raydock.errors import ApiError, describe_validation_error, explained
from raydock.jsontypes import (  # noqa: F401 (re-exported for the API's routes)
    EMAIL_PATTERN,
    NOT_BLANK,
    ZIP_NAME_PATTERN,
    JsonInt,
    nul_at,
    refuse_non_json_integers,
)
from raydock.optimizers import plan

#: One tag: what lists and filters show in a line; a deployment or model has at most MAX_TAGS.
MAX_TAG_CHARS = 100
Tag = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TAG_CHARS)]
MAX_TAGS = 50

DEFAULT_TIMEOUT_S = params.TIMEOUT_S.default

#: why a body's or form's field is refused for a NUL character (after "<field>: "): no
#: text the platform keeps may hold one (jsontypes.NUL)
NUL_MESSAGE = "{at}must not contain a NUL character (\\u0000)"


class _Body(BaseModel):
    # strict: a value must have the JSON type the document gives it (lax mode would read
    # "yes" or 1 as a boolean and "5" as a number)
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _json_integers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_non_json_integers(cls, value, info)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # a 422 naming the field, where PostgreSQL would have failed the request (500)
        if (at := nul_at(value)) is not None:
            raise PydanticCustomError("nul_character", NUL_MESSAGE, {"at": at})
        return value


class HyperParameters(_Body):
    temperature: float = params.TEMPERATURE.field("Sampling temperature")
    maxTokens: JsonInt = Field(
        params.MAX_TOKENS.default,
        ge=0,
        le=params.MAX_TOKENS.hi,
        description=f"Default max tokens to generate, 0–{params.MAX_TOKENS.hi} "
        f"(0: {params.MAX_TOKENS.default}).",
    )
    topP: float = params.TOP_P.field("Nucleus sampling mass")
    topK: JsonInt = params.TOP_K.field("Top-k filtering")
    stopSequence: list[str] = Field(
        default_factory=list,
        max_length=params.MAX_STOP_SEQUENCES,
        description=f"Up to {params.MAX_STOP_SEQUENCES} stop sequences.",
    )

    @field_validator("stopSequence")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v


class ScalingParameters(_Body):
    maxBatchSize: JsonInt = params.MAX_BATCH_SIZE.field("Sequences decoded together")
    minReplicas: JsonInt = Field(1, ge=1, le=10, description="Minimum replicas, 1–10.")
    maxReplicas: JsonInt = Field(2, ge=1, le=50, description="Maximum replicas, 1–50.")
    scaleUpDelay: JsonInt = Field(
        30, ge=1, le=1000, description="Seconds before scaling up, 1–1000."
    )
    # the seed's minimum is 50; shorter delays serve development clusters (and the 1 → 2 → 1
    # autoscaling test), at the price of flapping when load comes in bursts
    scaleDownDelay: JsonInt = Field(
        600, ge=1, le=2000, description="Seconds before scaling down, 1–2000."
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> ScalingParameters:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(
                f"minReplicas ({self.minReplicas}) must not exceed maxReplicas ({self.maxReplicas})"
            )
        return self


class OptimizationInfo(_Body):
    optimizationType: Literal[plan.OPTIMIZATION_TYPES] = Field(
        "", description="'' skips optimization (transformers); ctranslate2 or vllm."
    )
    quantizationType: Literal[plan.QUANTIZATION_TYPES] = Field(
        "", description="Checked against the engine and the deviceType's hardware (400)."
    )


class AdapterParameters(_Body):
    """Serving adapters of this deployment's base model by request (`model: "<deployment>:
    <adapter>"`): how many a replica keeps loaded, and how large their rank may be."""

    maxLoadedAdapters: JsonInt | None = params.MAX_LOADED_ADAPTERS.field(
        "Adapters a replica keeps loaded (least recently used leave; 0: none; null: "
        f"{params.MAX_LOADED_ADAPTERS.default}, but 0 on the vLLM engine, whose adapter "
        "support slows every step whether or not an adapter is used)",
        default=None,
    )
    maxAdapterRank: JsonInt = params.MAX_ADAPTER_RANK.field("Largest LoRA rank loaded")


class RoutingParameters(_Body):
    """How requests pick one of the deployment's replicas (README "Prefix-cache-aware
    routing")."""

    prefixCacheAffinity: bool | None = Field(
        None,
        description="Send requests whose prompts share a long prefix to the replica that "
        "served it (its KV cache holds it) while it is not overloaded; applies when "
        "maxReplicas > 1. Null: on for the vLLM engine, off for the others.",
    )
    imbalanceThreshold: JsonInt | None = params.PREFIX_IMBALANCE.field(
        "Requests in flight a prefix's replica may have beyond the least-loaded one before "
        "the prefix goes elsewhere (null: half of maxBatchSize)",
        default=None,
    )


class DeployRequest(_Body):
    name: str = Field(..., min_length=1, max_length=200, description="Deployment name.")
    hyperParameters: HyperParameters
    scalingParameters: ScalingParameters = Field(default_factory=ScalingParameters)
    deviceType: str = Field(..., description="A deviceType from configs/hardware.yaml.")
    optimizationInfo: OptimizationInfo = Field(default_factory=OptimizationInfo)
    adapterParameters: AdapterParameters = Field(default_factory=AdapterParameters)
    routingParameters: RoutingParameters = Field(default_factory=RoutingParameters)
    isDeployedPreviously: bool = False
    description: str = Field("", max_length=2000)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    timeout: JsonInt = params.TIMEOUT_S.field("Endpoint timeout in seconds")

    @field_validator("name")
    @classmethod
    def _strip_name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name must not be blank")
        return v.strip()

    @field_validator("deviceType")
    @classmethod
    def _known_device(cls, v: str) -> str:
        allowed = list(hardware_profiles())
        if v not in allowed:
            raise ValueError(f"deviceType must be one of {', '.join(allowed)}")
        return v


class ModelUpdate(_Body):
    description: str | None = Field(None, max_length=2000)
    tags: list[Tag] | None = Field(None, max_length=MAX_TAGS)
    name: str | None = Field(None, description="Not editable; present only to refuse it.")

    @field_validator("name")
    @classmethod
    def _name_frozen(cls, v: str | None) -> None:
        if v is not None:
            raise ValueError("the model name is not editable (it is derived from the file name)")
        return None


class DeploymentUpdate(_Body):
    description: str | None = Field(None, max_length=2000)
    tags: list[Tag] | None = Field(None, max_length=MAX_TAGS)
    timeout: JsonInt | None = params.TIMEOUT_S.field("Endpoint timeout in seconds", default=None)


#: deploy-body fields a change of which needs no redeploy (PATCH /deployments/{id})
EDITABLE_FIELDS = tuple(DeploymentUpdate.model_fields)


class KeyLimits(_Body):
    """A key's limits, for all replicas and nodes of its deployment together; null or left
    out: none. Over a limit, a request gets 429 with Retry-After."""

    requestsPerMinute: JsonInt | None = params.REQUESTS_PER_MINUTE.field(
        "Requests admitted per rolling minute", default=None
    )
    tokensPerMinute: JsonInt | None = params.TOKENS_PER_MINUTE.field(
        "Prompt + completion tokens per rolling minute", default=None
    )
    tokensPerDay: JsonInt | None = params.TOKENS_PER_DAY.field(
        "Prompt + completion tokens per UTC day (a budget; 80 % and 100 % notify)", default=None
    )


#: a name that is not only whitespace (a user's, a key's, a connection's)
NAME_PATTERN = explained(NOT_BLANK, "must not be blank")


class KeyCreate(_Body):
    name: str = Field(..., min_length=1, max_length=200, pattern=NAME_PATTERN)
    limits: KeyLimits | None = None


class KeyUpdate(_Body):
    limits: KeyLimits = Field(
        ..., description="Limits to change: a field set to null removes it, one left out stays."
    )


class UserCreate(_Body):
    name: str = Field(..., min_length=1, max_length=200, pattern=NAME_PATTERN)
    email: str | None = Field(
        None,
        max_length=320,
        pattern=explained(EMAIL_PATTERN, "must be an email address: name@domain, no spaces"),
    )
    isAdmin: bool = False


class _ImportKind(_Body):
    """A base model, or an adapter onto the base model it names."""

    kind: Literal["base", "adapter"] = "base"
    baseModelId: str | None = Field(
        None, validate_default=True, description="The base model of an adapter (required)."
    )

    @field_validator("baseModelId")
    @classmethod
    def _adapter_has_base(cls, v: str | None, info: ValidationInfo) -> str | None:
        if problem := import_kind_problem(info.data.get("kind"), v):
            raise ValueError(problem)
        return v


def import_kind_problem(kind: str | None, base_model_id: str | None) -> str | None:
    """Why `kind` and `baseModelId` do not go together (None: they do): an adapter names its
    base, a base model names none (it would be listed and refused as an adapter of it)."""
    if kind == "adapter" and not base_model_id:
        return "baseModelId is required to import an adapter"
    if kind == "base" and base_model_id:
        return "baseModelId is only for kind 'adapter'; a base model takes none"
    return None


class UploadSessionStart(_ImportKind):
    fileName: str = Field(
        ...,
        min_length=5,
        max_length=300,
        pattern=explained(ZIP_NAME_PATTERN, "must be a file name ending in .zip, without a folder"),
    )
    # 2**53: what the database's 64-bit integer holds, and JSON numbers carry exactly
    totalSize: JsonInt = Field(..., gt=0, le=2**53, description="Bytes, at most 2^53.")
    totalChunks: JsonInt = Field(..., ge=1, le=100_000)
    description: str = Field("", max_length=2000)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)


REPO_ID_PATTERN = explained(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$",
    "must be a Hugging Face repo id, `name` or `owner/name`: each part 1–96 letters, digits, "
    "'_', '.', '-', starting with a letter or digit",
)


class ConnectionCreate(_Body):
    name: str = Field(
        ..., min_length=1, max_length=100, pattern=NAME_PATTERN, description="Unique name."
    )
    token: str = Field(
        ...,
        min_length=1,
        max_length=1000,
        # visible ASCII: what tokens are made of, read alike by Python and JSON Schema
        pattern=explained(r"^[!-~]+$", "may hold visible ASCII characters only (no spaces)"),
        description="A Hugging Face access token; stored encrypted, never returned.",
    )
    verify: bool = Field(True, description="Check the token with the Hub before storing it.")


class HuggingFaceSource(_Body):
    repoId: str = Field(
        ...,
        max_length=200,
        pattern=REPO_ID_PATTERN,
        description="A Hugging Face model repo, e.g. Qwen/Qwen2.5-0.5B-Instruct.",
    )
    revision: str | None = Field(
        None, min_length=1, max_length=255, description="Branch, tag or commit (default main)."
    )
    connectionId: str | None = Field(
        None, max_length=64, description="A stored connection, for private or gated repos."
    )


class HuggingFaceImport(HuggingFaceSource, _ImportKind):
    description: str = Field("", max_length=2000)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)


class HuggingFaceDeploy(HuggingFaceSource, DeployRequest):
    """The seed's "Deploy a model from Hugging Face": general details, the repo and its
    connection, then parameters and hardware; imports, then deploys."""


class CatalogDeploy(DeployRequest):
    connectionId: str | None = Field(
        None, max_length=64, description="A connection, for gated catalog models."
    )


def refuse_nul(**fields: str | None) -> None:
    """A multipart form's text fields, held to the rule of JSON bodies (_Body._no_nul)."""
    for name, value in fields.items():
        if (at := nul_at(value)) is not None:
            message = f"{name}: " + NUL_MESSAGE.format(at=at)
            raise ApiError(422, message, name, "validation_error")


def parse_tags(text: str) -> list[str]:
    """Comma-separated tags of a multipart form, held to the same limits as JSON bodies."""
    tags = [t.strip() for t in text.split(",") if t.strip()]
    if len(tags) > MAX_TAGS:
        raise ApiError(422, f"tags: at most {MAX_TAGS} tags (got {len(tags)})", "tags")
    for i, tag in enumerate(tags):
        if len(tag) > MAX_TAG_CHARS:
            raise ApiError(
                422, f"tags.{i}: at most {MAX_TAG_CHARS} characters (got {len(tag)})", f"tags.{i}"
            )
    return tags


# ---- validation errors: errors.describe_validation_error names the field and what it
# allows (ranges, lengths and patterns read back from these models)

describe_error = describe_validation_error


# ---- notifications: a user's own webhook (platform/notify.py)

# what no URL may contain: whitespace (jsontypes' class) and control characters
_SPACE = NOT_BLANK[2:-1] + "\\u0000-\\u001f\\u007f"
WEBHOOK_URL_PATTERN = f"^https?://[^/?#@{_SPACE}]+(?:[/?#][^{_SPACE}]*)?$"
MAX_WEBHOOK_URL = 2000


def stored_deploy_config(config: dict[str, Any]) -> DeployRequest | str:
    """A configuration stored earlier (a deployment's last one, a history version) as a
    DeployRequest, or why it is not valid any more (e.g. its deviceType left hardware.yaml)."""
    try:
        return DeployRequest.model_validate(config)
    except ValidationError as exc:
        return "; ".join(describe_error(e, DeployRequest)[1] for e in exc.errors())


class WebhookSet(_Body):
    url: str = Field(
        ...,
        max_length=MAX_WEBHOOK_URL,
        # documented as a pattern, checked by the validator (which can say what is wrong)
        json_schema_extra={"pattern": WEBHOOK_URL_PATTERN},
        description="Where raydock POSTs your events: an http:// or https:// URL with a host "
        f"(no user info, no spaces), at most {MAX_WEBHOOK_URL} characters.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.fullmatch(WEBHOOK_URL_PATTERN, v):
            raise ValueError(
                "url must be an http:// or https:// URL with a host, without spaces or user info"
            )
        return v  # its host and port: notify.webhook_address (400 webhook_address_refused)
