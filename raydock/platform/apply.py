"""Declarative deployments: what a deployment document is, how it is validated (errors name
the file, line and field), and what must change to make the platform match the documents.

`plan` is pure: it compares the documents with the platform's state (deployments, models,
keys) and lists the changes; `api_apply.py` gathers that state and carries the changes out.
A document means the deployment of its name on its model (the model its `model:` source
resolves to): names are unique per model only, so two models may each have a "chat". Apply
marks the deployments it creates or adopts (`appliedFrom`, the file that declares them);
`prune` only ever undeploys those.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from raydock.errors import ApiError, explained
from raydock.jsontypes import JsonInt
from raydock.platform import catalog, schemas
from raydock.platform.states import IMPORTING_MODEL, UNDEPLOYABLE_DEPLOYMENT, ModelStatus
from raydock.platform.states import DeploymentStatus as D

MAX_DOCUMENTS = 500
EDITABLE_FIELDS = schemas.EDITABLE_FIELDS
#: deploy-body fields that are not part of the deployment's desired state
NOT_STATE = ("name", "isDeployedPreviously", *EDITABLE_FIELDS)


class HuggingFaceRef(schemas._Body):
    repoId: str = Field(..., max_length=200, pattern=schemas.REPO_ID_PATTERN)
    revision: str | None = Field(None, min_length=1, max_length=255)
    connection: str | None = Field(
        None, max_length=100, description="A connection's name (private or gated repos)."
    )


SOURCES = ("zip", "catalog", "huggingFace", "id")


def _only(keys: list[str], others: list[str]) -> dict[str, Any]:
    """A JSON-schema branch: `keys` given and none of `others`."""
    return {"required": keys, "not": {"anyOf": [{"required": [o]} for o in others]}}


class ModelSource(schemas._Body):
    """Exactly one of: a zip (path relative to the file; `raydock apply` adds its sha256 and
    uploads it when the platform lacks it), a catalog entry, a Hugging Face repo, or the id
    of a model already on the platform (what `raydock get deployments -o yaml` writes)."""

    # the rule below, as the OpenAPI document states it (a source given as null is refused):
    # each branch names its keys and excludes every other source's
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                _only(["zip", "sha256"], [*SOURCES[1:], "connection"]),
                *(
                    _only(
                        [k],
                        [*(s for s in SOURCES if s != k), "sha256"]
                        + ([] if k == "catalog" else ["connection"]),
                    )
                    for k in SOURCES[1:]
                ),
            ]
        }
    )
    zip: str = Field(None, min_length=1, max_length=1000)
    sha256: str = Field(
        None,
        pattern=explained(r"^[0-9a-f]{64}$", "must be 64 lowercase hexadecimal digits (a sha256)"),
    )
    catalog: str = Field(None, min_length=1, max_length=200)
    connection: str = Field(
        None,
        min_length=1,
        max_length=100,
        description="With catalog: a connection's name (gated repos need one).",
    )
    huggingFace: HuggingFaceRef = Field(None)
    id: str = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of zip, catalog, huggingFace or id"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if (self.zip is None) != (self.sha256 is None):
            raise ValueError(
                "sha256 goes with a zip source, which needs it (raydock apply computes it)"
            )
        if self.connection is not None and self.catalog is None:
            raise ValueError(
                "connection goes with a catalog source (a huggingFace source names its own)"
            )
        return self


class KeySpec(schemas._Body):
    name: str = Field(..., min_length=1, max_length=200)
    limits: schemas.KeyLimits | None = None


class DeploymentSpec(schemas.DeployRequest):
    """One deployment document: the seed's deploy body (hyperParameters default to the
    platform's), its model's source, and the inference keys it should have (by name)."""

    kind: Literal["Deployment"] = "Deployment"
    model: ModelSource
    hyperParameters: schemas.HyperParameters = Field(default_factory=schemas.HyperParameters)
    apiKeys: list[KeySpec] = Field(default_factory=list, max_length=50)

    def deploy_body(self) -> dict[str, Any]:
        """The deploy body the deployment keeps (what a deploy or redeploy takes)."""
        return self.model_dump(include=set(schemas.DeployRequest.model_fields))


class ApplyDocument(schemas._Body):
    spec: DeploymentSpec = Field(..., description="One deployment document, as parsed.")
    source: str | None = Field(None, max_length=500, description="Its file, for messages.")
    line: JsonInt | None = Field(None, ge=1, description="The line it starts on.")
    lines: dict[str, JsonInt] = Field(
        default_factory=dict, description="Dotted field path -> line, for messages."
    )


class ApplyRequest(schemas._Body):
    documents: list[ApplyDocument] = Field(..., max_length=MAX_DOCUMENTS)
    dryRun: bool = Field(False, description="Only say what would change.")
    prune: bool = Field(
        False, description="Undeploy deployments apply manages that no document names."
    )


@dataclass
class Declared:
    spec: DeploymentSpec
    where: str  # "file:line" of its name (or "documents.N")
    source: str  # the file (or "documents.N"): what appliedFrom records
    doc: ApplyDocument
    index: int

    def at(self, *path: str) -> str:
        """`file:line` of one of its fields."""
        return _where(self.doc, self.index, path)


def _where(doc: Any, index: int, path: tuple[Any, ...] = ()) -> str:
    """`file:line` of the deepest part of `path` the document knows a line for (`doc`: an
    ApplyDocument, or the raw one of a body that failed validation)."""
    get = doc.get if isinstance(doc, dict) else lambda k: getattr(doc, k, None)
    source, line, lines = get("source"), get("line"), get("lines")
    if not isinstance(source, str) or not source:
        return f"documents.{index}"
    lines = lines if isinstance(lines, dict) else {}
    parts = [str(p) for p in path]
    while parts:
        found = lines.get(".".join(parts))
        if isinstance(found, int):
            return f"{source}:{found}"
        parts.pop()
    return f"{source}:{line if isinstance(line, int) else 1}"


def describe_errors(errors: list[dict[str, Any]], body: Any) -> list[tuple[str, str]]:
    """(field, message) for each validation error of an apply body: a document's problems
    as `file:line: field ...` (its range included), others as any body's."""
    docs = body.get("documents") if isinstance(body, dict) else None
    out = []
    for err in errors:
        loc = tuple(p for p in err.get("loc", ()) if p != "body")
        if len(loc) > 3 and loc[0] == "documents" and loc[2] == "spec" and isinstance(docs, list):
            i, rest = loc[1], loc[3:]
            field_, message = schemas.describe_error({**err, "loc": rest}, DeploymentSpec)
            raw = docs[i] if isinstance(i, int) and i < len(docs) else {}
            out.append((field_, f"{_where(raw, i, rest)}: {message}"))
        else:
            out.append(schemas.describe_error({**err, "loc": loc}, ApplyRequest))
    return out


def parse(body: dict[str, Any]) -> ApplyRequest:
    """An apply body, or a 422 naming every problem (what the API's handler answers)."""
    try:
        return ApplyRequest.model_validate(body)
    except ValidationError as exc:
        problems = describe_errors(exc.errors(), body)
        message = "; ".join(m for _, m in problems)
        raise ApiError(422, message, problems[0][0], "validation_error") from None


def declare(documents: list[ApplyDocument]) -> list[Declared]:
    """The validated documents, once their keys' names are known not to clash: a document
    naming a key twice is a 409 naming both places. (Two documents declaring one deployment
    are found by `plan`: which model a source means depends on the platform.)"""
    problems: list[str] = []
    declared: list[Declared] = []
    for i, doc in enumerate(documents):
        d = Declared(doc.spec, _where(doc, i, ("name",)), doc.source or f"documents.{i}", doc, i)
        keys: dict[str, str] = {}
        for n, key in enumerate(d.spec.apiKeys):
            at = d.at("apiKeys", str(n), "name")
            if key.name in keys:
                problems.append(f"{at}: apiKeys.{n}.name: {key.name!r} is also at {keys[key.name]}")
            keys.setdefault(key.name, at)
        declared.append(d)
    if problems:
        raise ApiError(409, "; ".join(problems), "name", "duplicate_name")
    return declared


# ------------------------------------------------------------------ planning


@dataclass
class State:
    """What the platform holds, as its API views show it."""

    deployments: list[dict[str, Any]]
    models: list[dict[str, Any]]
    keys: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by deployment id
    connections: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Resolved:
    """A document's model: found on the platform (`model`), or what bringing it takes."""

    model: dict[str, Any] | None
    # retry: `model` is the one the document's deployment waits for, and its import failed
    needs: Literal["", "upload", "download", "retry"] = ""
    origin: dict[str, Any] | None = None  # a download's: repo, revision, connection


class PlanError(ApiError):
    pass


def _origin(model: dict[str, Any]) -> dict[str, Any]:
    return (model.get("metadata") or {}).get("origin") or {}


def _pick(candidates: list[dict[str, Any]], current: list[str]) -> dict[str, Any] | None:
    """Of the models that match a document's source (several may: imported twice, or by
    hand too), the one a deployment of the document's name serves (`current`: the models of
    the managed ones first, then of hand-made ones apply would adopt), else the newest READY
    one, else the newest (the registry lists models newest first)."""
    for model_id in current:
        mine = [m for m in candidates if m["modelId"] == model_id]
        if mine:
            return mine[0]
    ready = [m for m in candidates if m["status"] == ModelStatus.READY]
    return (ready or candidates or [None])[0]


def _named(d: Declared, state: State) -> list[dict[str, Any]]:
    """The deployments of the document's name, on any model: the ones apply manages first,
    newest first in each group."""
    named = [x for x in reversed(state.deployments) if x["name"] == d.spec.name]
    return sorted(named, key=lambda x: not x.get("appliedFrom"))


def resolve_model(d: Declared, state: State) -> Resolved:
    """The model a document's source means. Several may match it (imported twice): the one
    a deployment of the document's name serves, so that the document keeps meaning it."""
    src = d.spec.model
    named = _named(d, state)
    current = [x["modelId"] for x in named]
    managed = {x["modelId"] for x in named if x.get("appliedFrom")}
    if src.id:
        model = next((m for m in state.models if m["modelId"] == src.id), None)
        if model is None:
            raise PlanError(
                404,
                f"{d.at('model', 'id')}: model.id: no model {src.id} on the platform",
                "model.id",
            )
        if model["status"] == ModelStatus.IMPORT_FAILED:  # its deploy could only fail
            raise PlanError(
                409,
                f"{d.at('model', 'id')}: model.id: model {src.id}'s import failed "
                f"({model.get('error') or 'see the model'}): name a READY model, or retry a "
                f"download's import first (POST /api/public/models/{src.id}/retry-import)",
                "model.id",
            )
        return Resolved(model)
    if src.zip:
        same = [m for m in state.models if m["source"] == "file" and m["checksum"] == src.sha256]
        ready = _pick([m for m in same if m["status"] == ModelStatus.READY], current)
        return Resolved(ready) if ready else Resolved(None, "upload")
    if src.catalog:
        try:
            entry = catalog.get(src.catalog)
        except ApiError:
            raise PlanError(
                404,
                f"{d.at('model', 'catalog')}: model.catalog: no catalog entry {src.catalog!r} "
                "(raydock catalog lists them)",
                "model.catalog",
            ) from None
        found = [m for m in state.models if _origin(m).get("catalogId") == entry["id"]]
        connection_id = _connection_id(d, src.connection, ("model", "connection"), state)
        if not found:
            try:  # a gated repo without a connection: its download can only fail
                catalog.check_import(entry, connection_id, "model.connection")
            except ApiError as exc:
                where = d.at("model", "catalog")
                raise PlanError(exc.status, f"{where}: {exc.message}", exc.param) from None
        origin = {**catalog.origin(entry), "connectionId": connection_id}
    else:
        hf = src.huggingFace
        assert hf is not None
        connection_id = _connection_id(
            d, hf.connection, ("model", "huggingFace", "connection"), state
        )
        found = [
            m
            for m in state.models
            if m["source"] == "hugging_face"
            and _origin(m).get("repoId") == hf.repoId
            and _origin(m).get("revision") == hf.revision
        ]
        origin = {"repoId": hf.repoId, "revision": hf.revision, "connectionId": connection_id}
    waited_for = _pick(found, current)
    if waited_for is not None and waited_for["modelId"] in managed:
        failed = waited_for["status"] == ModelStatus.IMPORT_FAILED
        return Resolved(waited_for, "retry" if failed else "", origin)
    usable = _pick([m for m in found if m["status"] != ModelStatus.IMPORT_FAILED], current)
    return Resolved(usable, origin=origin) if usable else Resolved(None, "download", origin)


def _connection_id(
    d: Declared, name: str | None, path: tuple[str, ...], state: State
) -> str | None:
    """The id of the connection a document names (404 naming the field when none has it)."""
    if not name:
        return None
    by_name = {c["name"]: c["connectionId"] for c in state.connections}
    if name not in by_name:
        field = ".".join(path)
        raise PlanError(
            404,
            f"{d.at(*path)}: {field}: no connection named {name!r} (raydock connections list)",
            field,
        )
    return by_name[name]


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{path}.{k}" if path else k))
        return out
    return {path: value}


def differences(current: dict[str, Any], desired: dict[str, Any]) -> list[str]:
    """`field: old → new` for every leaf that differs."""
    a, b = _flat(current), _flat(desired)
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def serving_state(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a deploy body a change of which needs a redeploy, defaults filled in."""
    try:
        body = schemas.DeployRequest.model_validate(config).model_dump()
    except ValidationError:  # a config stored by an older raydock: compare as it is
        body = dict(config)
    return {k: v for k, v in body.items() if k not in NOT_STATE}


def _editable(dep: dict[str, Any]) -> dict[str, Any]:
    return {"description": dep["description"], "tags": dep["tags"], "timeout": dep["timeout"]}


def _find_deployment(d: Declared, model: dict[str, Any] | None, state: State) -> dict | None:
    """The deployment a document means: the one of its name on its model, whether apply
    manages it or it was made by hand (apply adopts it then). None when its model is still
    to be imported."""
    if model is None:
        return None
    mine = [
        x
        for x in _named(d, state)  # one: a model's deployment names are unique
        if x["modelId"] == model["modelId"]
    ]
    return mine[0] if mine else None


def model_label(model: dict[str, Any]) -> str:
    """How a change names the model its deployment is on (plan output: which "chat")."""
    name = model.get("name")
    return f"model {model['modelId']}" + (f" ({name})" if name else "")


def source_label(src: ModelSource) -> str:
    """How a change names a model that is still to be uploaded or imported."""
    if src.zip:
        return f"zip {src.zip}"
    if src.catalog:
        return f"catalog {src.catalog}"
    if src.huggingFace:
        hf = src.huggingFace
        return f"huggingFace {hf.repoId}" + (f"@{hf.revision}" if hf.revision else "")
    return f"model {src.id}"


#: what a key's change repeats of its deployment's (which deployment it is about)
OWNER_FIELDS = ("deploymentId", "modelId", "model")


def _key_changes(
    d: Declared, dep: dict[str, Any] | None, owner: dict[str, Any], state: State
) -> list[dict[str, Any]]:
    """A document's keys' changes; `owner`: its deployment's change."""
    existing = {k["name"]: k for k in state.keys.get(dep["deploymentId"], [])} if dep else {}
    out = []
    for key in d.spec.apiKeys:
        want = {k: v for k, v in (key.limits.model_dump() if key.limits else {}).items() if v}
        change = {
            "kind": "apiKey",
            "name": key.name,
            "deployment": d.spec.name,
            **{k: owner[k] for k in OWNER_FIELDS},
            "source": d.where,
            "document": d.index,
        }
        have = existing.get(key.name)
        if have is None:
            out.append(change | {"action": "create", "limits": want})
            continue
        now = {k: v for k, v in (have.get("limits") or {}).items() if v}
        if now != want:
            out.append(
                change
                | {"action": "update", "keyId": have["keyId"], "limits": want}
                | {"details": differences({"limits": now}, {"limits": want})}
            )
        else:
            out.append(change | {"action": "unchanged", "keyId": have["keyId"]})
    return out


def plan_deployment(d: Declared, state: State) -> list[dict[str, Any]]:
    """The changes one document asks for: its deployment's, then its keys'."""
    resolved = resolve_model(d, state)
    model = resolved.model
    dep = _find_deployment(d, model, state)
    body = d.spec.deploy_body()
    change: dict[str, Any] = {
        "kind": "deployment",
        "name": d.spec.name,
        "source": d.where,
        "appliedFrom": d.source,
        "details": [],
        "modelId": model["modelId"] if model else None,
        "model": model_label(model) if model else source_label(d.spec.model),
        "deploymentId": dep["deploymentId"] if dep else None,
        "config": body,
        "document": d.index,
    }
    if dep is None:
        if model is not None and model["status"] in IMPORTING_MODEL:
            raise PlanError(
                409,
                f"{d.at('model')}: model: {model['modelId']} is still being imported "
                f"({model['status']}); apply again when it is READY",
                "model",
            )
        action = {"": "create", "upload": "upload-and-create", "download": "import-and-create"}
        change["action"] = action[resolved.needs]
        change["origin"] = resolved.origin
        if resolved.needs == "upload":
            change["details"] = [f"model: zip {d.spec.model.zip} is not on the platform"]
        elif resolved.needs == "download":
            change["details"] = [f"model: imported from {resolved.origin}"]
        return [change, *_key_changes(d, None, change, state)]
    change["adopted"] = not dep.get("appliedFrom")  # made by hand: apply manages it now
    change["mark"] = dep.get("appliedFrom") != d.source
    state_diff = differences(serving_state(dep["config"]), serving_state(body))
    edit_diff = differences(_editable(dep), {k: body[k] for k in EDITABLE_FIELDS})
    status = dep["status"]
    waiting_for_import = status == D.READY_TO_DEPLOY and model["status"] in IMPORTING_MODEL
    if resolved.needs == "retry":  # it never deployed: it deploys once the retry is READY
        if state_diff or edit_diff:
            raise PlanError(
                409,
                f"{d.where}: deployment {d.spec.name!r} waits for model {model['modelId']}, "
                "whose import failed: apply the file unchanged to retry the import, or delete "
                "the deployment to apply the change",
                "model",
            )
        why = f"model {model['modelId']}'s import failed: {model.get('error') or 'see the model'}"
        change |= {"action": "retry-import", "details": [why]}
    elif status in (D.OPTIMIZING, D.DEPLOYING) or waiting_for_import:
        if state_diff or edit_diff:
            raise PlanError(
                409,
                f"{d.where}: deployment {d.spec.name!r} is {status}; apply the change when "
                "that ends",
                "name",
            )
        change |= {"action": "wait", "details": [f"already {status}"]}
    elif state_diff:
        change |= {"action": "redeploy", "details": state_diff + edit_diff}
    elif status != D.DEPLOYED:
        change |= {"action": "deploy", "details": [f"is {status}"] + edit_diff}
    elif edit_diff:
        change |= {"action": "update", "details": edit_diff}
    else:
        change["action"] = "unchanged"
    return [change, *_key_changes(d, dep, change, state)]


def _model_key(d: Declared, change: dict[str, Any]) -> tuple:
    """The model a document's deployment is on: one on the platform, or the zip or repo
    apply will import (documents naming the same one share it)."""
    if change["modelId"]:
        return ("model", change["modelId"])
    if change.get("origin"):
        return ("repo", change["origin"]["repoId"], change["origin"].get("revision"))
    return ("zip", d.spec.model.sha256)


def _declared_twice(d: Declared, first: Declared, change: dict[str, Any]) -> PlanError:
    return PlanError(
        409,
        f"{d.where}: name: {d.spec.name!r} is also declared at {first.where}, on the same "
        f"model ({change['model']})",
        "name",
        "duplicate_name",
    )


def _left_behind(
    d: Declared, change: dict[str, Any], declared: set[tuple[str, str]], state: State
) -> list[dict[str, Any]]:
    """Deployments of the document's name that its file declared on another model and no
    document declares any more: its `model:` source changed. Not moved: the document means
    a deployment on the new model, and the old one is left to --prune."""
    return [
        x
        for x in _named(d, state)
        if x.get("appliedFrom") == d.source
        and x["modelId"] != change["modelId"]
        and (x["name"], x["modelId"]) not in declared
        and x["status"] != D.UNDEPLOYED
    ]


def _label_of(model_id: str, state: State) -> str:
    model = next((m for m in state.models if m["modelId"] == model_id), None)
    return model_label(model or {"modelId": model_id})


def _prune_change(dep: dict[str, Any], state: State) -> dict[str, Any]:
    return {
        "kind": "deployment",
        "name": dep["name"],
        "source": dep["appliedFrom"],
        "deploymentId": dep["deploymentId"],
        "modelId": dep["modelId"],
        "model": _label_of(dep["modelId"], state),
        "action": "undeploy",
        "details": ["no file names it"],
    }


def plan(declared: list[Declared], state: State, prune: bool) -> list[dict[str, Any]]:
    """Every change, in document order, then what --prune undeploys; a PlanError names every
    document that cannot be applied (nothing is applied then), two documents declaring the
    same deployment (its name on one model) too."""
    changes: list[dict[str, Any]] = []
    problems: list[PlanError] = []
    downloads: dict[tuple, Declared] = {}  # a repo at a revision -> the document importing it
    seen: dict[tuple, Declared] = {}  # (name, model) -> the document declaring it
    ours: list[tuple[Declared, dict[str, Any]]] = []  # each document, its deployment's change
    for d in declared:
        try:
            planned = plan_deployment(d, state)
        except PlanError as exc:
            problems.append(exc)
            continue
        first = seen.setdefault((d.spec.name, _model_key(d, planned[0])), d)
        if first is not d:
            problems.append(_declared_twice(d, first, planned[0]))
            continue
        if planned[0]["action"] == "import-and-create":
            origin = planned[0]["origin"]
            importer = downloads.setdefault((origin["repoId"], origin.get("revision")), d)
            if importer is not d:  # imported once: this one is created when it is READY
                name = importer.spec.name
                why = f"its model is imported for deployment {name!r}; created once it is READY"
                for c in planned:
                    c |= {"action": "wait", "details": [why], "after": name}
        ours.append((d, planned[0]))
        changes.extend(planned)
    if problems:
        first_problem = problems[0]
        message = "; ".join(p.message for p in problems)
        raise PlanError(first_problem.status, message, first_problem.param, first_problem.code)
    kept = {(c["name"], c["modelId"]) for _, c in ours if c["modelId"]}
    for d, change in ours:
        for old in _left_behind(d, change, kept, state):
            fate = "--prune undeploys it (below)" if prune else "it stays (--prune undeploys it)"
            change["details"].append(
                f"model: {d.spec.name!r} on {_label_of(old['modelId'], state)}, which this "
                f"file declared before, is not moved: {fate}"
            )
    if prune:
        for dep in state.deployments:
            if not dep.get("appliedFrom") or (dep["name"], dep["modelId"]) in kept:
                continue
            if dep["status"] in UNDEPLOYABLE_DEPLOYMENT:  # a starting one: its deploy cancelled
                changes.append(_prune_change(dep, state))
    return changes


def uploads_needed(changes: list[dict[str, Any]], declared: list[Declared]) -> list[dict]:
    """The zips the platform lacks, once each ({"source", "zip", "sha256"}: the first
    document that names it): documents that name one zip share its one import."""
    uploads: dict[str, dict[str, Any]] = {}
    for c in changes:
        if c["kind"] == "deployment" and c["action"] == "upload-and-create":
            model = declared[c["document"]].spec.model
            uploads.setdefault(
                model.sha256, {"source": c["source"], "zip": model.zip, "sha256": model.sha256}
            )
    return list(uploads.values())


# ------------------------------------------------------------------ export


def source_of(model: dict[str, Any]) -> dict[str, Any]:
    """A model's source as a document names it."""
    origin = _origin(model)
    if model["source"] == "platform_hosted" and origin.get("catalogId"):
        ref = {"catalog": origin["catalogId"]}
        if origin.get("connection"):
            ref["connection"] = origin["connection"]
        return ref
    if model["source"] == "hugging_face" and origin.get("repoId"):
        ref = {"repoId": origin["repoId"]}
        if origin.get("revision"):
            ref["revision"] = origin["revision"]
        if origin.get("connection"):
            ref["connection"] = origin["connection"]
        return {"huggingFace": ref}
    return {"id": model["modelId"]}  # an uploaded zip is not where the file will be


def export_all(
    deployments: list[dict[str, Any]],
    models: list[dict[str, Any]],
    keys: list[list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Deployments (with each one's keys) as the documents that declare them. A model is
    named by its source, or by its id where two deployments of one name are on models of
    the same source (imported twice): that source alone would mean one model for both."""
    by_id = {m["modelId"]: m for m in models}
    docs = [export(d, by_id[d["modelId"]], k) for d, k in zip(deployments, keys, strict=True)]
    same = Counter((doc["name"], json.dumps(doc["model"], sort_keys=True)) for doc in docs)
    for dep, doc in zip(deployments, docs, strict=True):
        if same[doc["name"], json.dumps(doc["model"], sort_keys=True)] > 1:
            doc["model"] = {"id": dep["modelId"]}
    return docs


def export(dep: dict[str, Any], model: dict[str, Any], keys: list[dict[str, Any]]) -> dict:
    """A live deployment as the document that declares it (applying it changes nothing)."""
    body = serving_state(dep["config"])
    doc: dict[str, Any] = {"kind": "Deployment", "name": dep["name"], "model": source_of(model)}
    doc |= body
    doc |= _editable(dep)
    wanted = []
    for k in keys:
        limits = {n: v for n, v in (k.get("limits") or {}).items() if v}
        wanted.append({"name": k["name"], **({"limits": limits} if limits else {})})
    if wanted:
        doc["apiKeys"] = wanted
    return doc
