"""`raydock models|deployments|keys|users|jobs|history|usage|uploads`: the management API's
resources from the command line, each with `-o table|json|yaml` and `--url`/`--key` (else
RAYDOCK_URL / RAYDOCK_API_KEY). The API decides everything; these commands only call it and
print. A model, deployment or key is given by its id or its name (`model_id`,
`deployment_id`, `key_id`). Errors are one line (the API's message) with exit status 1
(raydock/cli.py's `main`)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

Columns = list[tuple[str, Callable[[dict[str, Any]], Any]]]


def emit(data: Any, fmt: str, columns: Columns | None = None, rows_of: str | None = None) -> None:
    """Print `data` as JSON, YAML, or a table of `columns` over `data[rows_of]` (or `data`)."""
    if fmt == "json":
        print(json.dumps(data, indent=2))
    elif fmt == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    elif columns is None:  # one object: key/value lines
        for key, value in data.items():
            shown = json.dumps(value) if isinstance(value, dict | list) else value
            print(f"{key:22} {shown}")
    else:
        rows = data[rows_of] if rows_of else data
        table = [[h for h, _ in columns]] + [
            ["-" if get(r) is None else str(get(r)) for _, get in columns] for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


MODEL_COLUMNS: Columns = [
    ("ID", lambda m: m["modelId"]),
    ("NAME", lambda m: m["name"][:40]),
    ("KIND", lambda m: m["kind"]),
    ("SOURCE", lambda m: m["sourceLabel"]),
    ("STATUS", lambda m: m["statusLabel"]),
    ("ACTIVE", lambda m: m["activeDeployments"]),
    ("FAILED", lambda m: m["deploymentFailed"]),
]
DEPLOYMENT_COLUMNS: Columns = [
    ("ID", lambda d: d["deploymentId"]),
    ("NAME", lambda d: d["name"]),
    ("STATUS", lambda d: d["status"]),
    ("DEVICE", lambda d: d["config"].get("deviceType")),
    ("MODEL", lambda d: d["modelId"]),
]
VERSION_COLUMNS: Columns = [
    ("VERSION", lambda v: v.get("name")),
    ("RESULT", lambda v: v.get("result")),
    ("STARTED", lambda v: v.get("startedAt")),
    ("ENDED", lambda v: v.get("endedAt")),
    ("UNDEPLOYED", lambda v: (v.get("undeployment") or {}).get("endedAt")),
]
KEY_COLUMNS: Columns = [
    ("ID", lambda k: k["keyId"]),
    ("NAME", lambda k: k["name"]),
    ("PREFIX", lambda k: k.get("prefix")),
    ("CREATED", lambda k: k.get("createdAt")),
    ("LAST USED", lambda k: k.get("lastUsedAt")),
    ("LIMITS", lambda k: _limits(k.get("limits"))),
]


def _limits(limits: dict[str, Any] | None) -> str | None:
    set_ = {k: v for k, v in (limits or {}).items() if v is not None}
    return " ".join(f"{k}={v}" for k, v in set_.items()) or None


USAGE_COLUMNS: Columns = [
    ("PERIOD", lambda r: r.get("period")),
    ("DEPLOYMENT", lambda r: r.get("deploymentId")),
    ("ADAPTER", lambda r: r.get("adapterId") or None),
    ("KEY", lambda r: r.get("keyId")),
    ("REQUESTS", lambda r: r["requests"]),
    ("PROMPT", lambda r: r["promptTokens"]),
    ("COMPLETION", lambda r: r["completionTokens"]),
]


# ------------------------------------------------------------------ ids or names

#: the ids the platform makes: a prefix, a dash and a UUID (registry.py's db.new_id)
_UUID = r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}"
Rows = Callable[[], list[dict[str, Any]]]


def resolve(ref: str, option: str, kind: str, prefix: str, rows: Rows, id_field: str) -> str:
    """The id of the one `kind` whose id or name is `ref`, given as `option`. A value shaped
    like the kind's ids is taken as given, unlisted: the API answers for an unknown one, and
    usage still counts a deployment deleted since. Anything else is looked up in `rows()`;
    none, or several of that name, is an error naming `option` and `ref` (exit 1)."""
    if re.fullmatch(f"{prefix}-{_UUID}", ref):
        return ref
    listed = rows()
    if any(r[id_field] == ref for r in listed):
        return ref
    named = [r[id_field] for r in listed if r.get("name") == ref]
    if len(named) == 1:
        return named[0]
    if not named:
        raise SystemExit(f"raydock: {option} {ref!r}: no {kind} has this id or name")
    raise SystemExit(
        f"raydock: {option} {ref!r}: {len(named)} {kind}s have this name "
        f"({', '.join(named)}): give the id of one"
    )


def model_id(client: Any, ref: str, option: str = "MODEL") -> str:
    """A model's id from its id or its name."""
    return resolve(ref, option, "model", "cm", lambda: _all_models(client), "modelId")


def deployment_id(client: Any, ref: str, option: str = "DEPLOYMENT") -> str:
    """A deployment's id from its id or its name (of every model's deployments)."""
    return resolve(
        ref, option, "deployment", "dp", lambda: _all_deployments(client, None), "deploymentId"
    )


def key_id(client: Any, deployment: str | None, ref: str, option: str = "KEY") -> str:
    """An inference key's id from its id or its name, which is its deployment's to give."""

    def keys() -> list[dict[str, Any]]:
        if deployment is None:
            raise SystemExit(f"raydock: {option} {ref!r}: a key's name needs its --deployment")
        return client.get(f"/deployments/{deployment}/api-keys")["apiKeys"]

    return resolve(ref, option, "API key", "key", keys, "keyId")


# ------------------------------------------------------------------ waiting, with progress


def follow(client: Any, ref: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
    """Wait for a deployment job (deploy, redeploy, re-trigger, undeploy) with a progress bar
    showing the job's percentage and the deployment's status; returns the job."""
    from tqdm import tqdm

    dep_id = ref.get("deploymentId")
    # the job's id on the bar: Ctrl-C stops the following, not the job (`raydock jobs show`)
    desc = f"{ref.get('action', 'job').lower()} {ref['dockStatusId']}"
    with tqdm(total=100, desc=desc, unit="%", disable=quiet) as bar:

        def on_job(job: dict[str, Any]) -> None:
            bar.update(job["percentageComplete"] - bar.n)
            status = client.get(f"/deployments/{dep_id}")["status"] if dep_id else ""
            bar.set_postfix_str(" ".join(filter(None, [status, job.get("message") or ""])))

        # to its end, however long: the platform ends every job (a deploy's own timeout)
        return client.wait_job(ref["dockStatusId"], timeout=math.inf, progress=on_job)


def _job_result(client: Any, args: argparse.Namespace, ref: dict[str, Any]) -> int:
    """Print the deployment a job acted on (after waiting unless --no-wait); 1 if it failed."""
    if args.no_wait:
        emit(ref, args.output)
        return 0
    job = follow(client, ref)
    dep = client.get(f"/deployments/{ref['deploymentId']}")
    emit(dep, args.output)
    if job["status"] != "SUCCESS":
        why = dep.get("failureReason") or job.get("message")
        print(f"raydock: {job['action'].lower()} failed: {why}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------ commands


def _client(args: argparse.Namespace) -> Any:
    from raydock.cli import _client as client_for  # one place reads --url/--key and the env

    return client_for(args)


def _need_id(args: argparse.Namespace) -> None:
    if args.action != "list" and not args.id:
        raise SystemExit(f"raydock: {args.command} {args.action} needs an id or a name")


def cmd_models(args: argparse.Namespace) -> int:
    _need_id(args)
    client = _client(args)
    if args.action == "list":
        models = _all_models(client)
        emit({"models": models, "total": len(models)}, args.output, MODEL_COLUMNS, "models")
        return 0
    model = model_id(client, args.id)
    if args.action == "export":
        return _export(client, args, model)
    if args.action == "show":
        emit(client.get(f"/models/{model}"), args.output)
    else:
        emit(client.delete(f"/models/{model}"), args.output)
    return 0


def _export(client: Any, args: argparse.Namespace, model: str) -> int:
    """Export a model (a job), then say where its zip is, and save it with --out."""
    params: dict[str, str] = {}
    if args.deployment:  # whose configuration goes into deployconfig.json
        params["deploymentId"] = deployment_id(client, args.deployment, "--deployment")
    ref = client.post(f"/models/{model}/export", params=params)
    if args.no_wait:
        emit(ref, args.output)
        return 0
    job = follow(client, ref)
    if job["status"] != "SUCCESS":
        why = (job.get("message") or "see its job").removeprefix("export failed: ")
        print(f"raydock: export failed: {why}", file=sys.stderr)
        return 1
    url = job["response"]["downloadUrl"]  # the API's route, or the store's presigned URL
    shown = {
        "dockStatusId": job["dockStatusId"],
        "modelId": model,
        "fileName": job["response"]["fileName"],
        "downloadUrl": client.base_url + url if url.startswith("/") else url,
    }
    if args.out:
        out = Path(args.out)
        dest = out / shown["fileName"] if out.is_dir() else out
        shown["savedTo"] = str(client.download_export(job["dockStatusId"], dest))
    emit(shown, args.output)
    return 0


def _all_models(client: Any) -> list[dict[str, Any]]:
    """Every model: GET /models answers a page at a time."""
    return client.every("/models", "models", "modelId")


def _all_deployments(client: Any, model_id: str | None) -> list[dict[str, Any]]:
    models = [model_id] if model_id else [m["modelId"] for m in _all_models(client)]
    return [d for m in models for d in client.get(f"/models/{m}/deployments")["deployments"]]


def _parse_set(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """`--set a.b=value` pairs; a value is read as YAML (numbers, booleans, lists), else
    (not YAML, or not JSON data: a date, a NaN) kept as the text it is."""
    out = []
    for pair in pairs:
        path, sep, raw = pair.partition("=")
        if not sep or not path:
            raise SystemExit(f"raydock: --set {pair!r}: expected FIELD=VALUE, e.g. topK=40")
        out.append((path.split("."), _set_value(raw)))
    return out


def _set_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw else ""
        json.dumps(value, allow_nan=False)
    except (yaml.YAMLError, TypeError, ValueError):
        return raw
    return value


def _apply_sets(body: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    for path, value in _parse_set(pairs):
        node = body
        for i, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                field = ".".join(path[: i + 1])
                raise SystemExit(f"raydock: --set {'.'.join(path)}: {field} has no fields")
        node[path[-1]] = value
    return body


def cmd_deployments(args: argparse.Namespace) -> int:
    from raydock.client import deploy_body

    _need_id(args)
    client, action = _client(args), args.action
    if action == "list":
        model = args.model and model_id(client, args.model, "--model")
        rows = _all_deployments(client, model)
        emit(
            {"deployments": rows, "total": len(rows)},
            args.output,
            DEPLOYMENT_COLUMNS,
            "deployments",
        )
        return 0
    if action == "deploy":  # id: the model; the platform's defaults for what is not --set
        if not args.name:
            raise SystemExit("raydock: deployments deploy needs --name")
        body = _apply_sets(deploy_body(args.name, args.device or "cpu-small"), args.set)
        return _job_result(client, args, client.deploy(model_id(client, args.id), body))
    dep = deployment_id(client, args.id)
    if action == "show":
        emit(client.get(f"/deployments/{dep}"), args.output)
        return 0
    if action == "history":
        versions = client.every(f"/deployments/{dep}/history", "versions", "version")
        shown = {"versions": versions, "total": len(versions)}
        emit(shown, args.output, VERSION_COLUMNS, "versions")
        return 0
    if action == "delete":
        emit(client.delete(f"/deployments/{dep}"), args.output)
        return 0
    if action == "redeploy":  # the current configuration, with --device / --set applied
        body = client.get(f"/deployments/{dep}")["config"]
        if args.device:
            body["deviceType"] = args.device
        body = _apply_sets(body, args.set)
        ref = client.post(f"/deployments/{dep}/redeploy", json=body)
        return _job_result(client, args, ref)
    path = {"undeploy": "undeploy", "retrigger": "retrigger"}[action]
    return _job_result(client, args, client.post(f"/deployments/{dep}/{path}"))


def cmd_history(args: argparse.Namespace) -> int:
    args.action = "history"
    return cmd_deployments(args)


#: a key's limits, by the API's field names (the options' dests too), and their options
LIMIT_OPTIONS = {
    "requestsPerMinute": "--requests-per-minute",
    "tokensPerMinute": "--tokens-per-minute",
    "tokensPerDay": "--tokens-per-day",
}


def _limits_given(args: argparse.Namespace) -> dict[str, int]:
    return {f: getattr(args, f) for f in LIMIT_OPTIONS if getattr(args, f) is not None}


def _limits_change(args: argparse.Namespace) -> dict[str, int | None]:
    """`keys limits`' PATCH: a limit given is set, one cleared is null (removed), the others
    are left out (kept). `--clear` alone clears every limit not given."""
    cleared = set(LIMIT_OPTIONS) if "all" in args.clear else set(args.clear)
    change = {f: None for f in LIMIT_OPTIONS if f in cleared} | _limits_given(args)
    if not change:
        options = ", ".join(LIMIT_OPTIONS.values())
        raise SystemExit(f"raydock: keys limits needs {options} or --clear [FIELD]")
    return change


#: `keys`' positionals, in the order they are given
KEY_REFS = ("deployment", "key_id")
CLEARABLE = (*LIMIT_OPTIONS, "all")


def fill_ref(namespace: argparse.Namespace, value: str) -> bool:
    """Give `value` to the first of KEY_REFS not given yet; False when both are."""
    free = next((name for name in KEY_REFS if getattr(namespace, name, None) is None), None)
    if free is not None:
        setattr(namespace, free, value)
    return free is not None


class _KeyRef(argparse.Action):
    """DEPLOYMENT or KEY: the next of the two not given yet (a bare --clear before them may
    have taken the first: see _Clear)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        # argparse calls an absent KEY with its default (None)
        if value is not None and not fill_ref(namespace, value):
            parser.error(f"unrecognized arguments: {value}")


class _Clear(argparse.Action):
    """`--clear [FIELD]`, repeatable. argparse gives a bare --clear the word after it: one
    that is not a limit's field is the DEPLOYMENT or KEY, so that `keys limits --clear chat
    ci` reads as `keys limits chat ci --clear` (every limit not given)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if value not in CLEARABLE and not fill_ref(namespace, value):
            raise argparse.ArgumentError(
                self, f"invalid choice: {value!r} (choose from {', '.join(CLEARABLE)})"
            )
        cleared = value if value in CLEARABLE else "all"
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), cleared])


def cmd_keys(args: argparse.Namespace) -> int:
    client = _client(args)
    dep = deployment_id(client, args.deployment)
    base = f"/deployments/{dep}/api-keys"
    if args.action == "list":
        emit(client.get(base), args.output, KEY_COLUMNS, "apiKeys")
    elif args.action in ("delete", "limits"):
        if not args.key_id:
            raise SystemExit(f"raydock: keys {args.action} needs the key's id or name")
        key = f"{base}/{key_id(client, dep, args.key_id)}"
        if args.action == "delete":
            emit(client.delete(key), args.output)
        else:
            emit(client.patch(key, json={"limits": _limits_change(args)}), args.output)
    else:
        if not args.name:
            raise SystemExit("raydock: keys create needs --name")
        body: dict[str, Any] = {"name": args.name}
        if limits := _limits_given(args):
            body["limits"] = limits
        created = client.post(base, json=body)
        emit(created, args.output)
        if args.output == "table":
            print("the key is shown once: store it now", file=sys.stderr)
    return 0


USER_COLUMNS: Columns = [
    ("ID", lambda u: u["userId"]),
    ("NAME", lambda u: u["name"]),
    ("EMAIL", lambda u: u["email"]),
    ("ADMIN", lambda u: "yes" if u["isAdmin"] else "no"),
    ("KEYS", lambda u: u["managementKeys"]),
    ("CREATED", lambda u: u["createdAt"]),
]


def cmd_users(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "list":
        emit(client.get("/users"), args.output, USER_COLUMNS, "users")
        return 0
    if args.action == "create":
        if not args.id:
            raise SystemExit("raydock: users create needs the user's name")
        body = {"name": args.id, "email": args.email, "isAdmin": args.admin}
        shown = client.post("/users", json=body)
    elif not args.id:
        raise SystemExit(f"raydock: users {args.action} needs a user id (rotate-key: or me)")
    elif args.action == "delete":
        shown = client.delete(f"/users/{args.id}")
    else:
        shown = client.post(f"/users/{args.id}/rotate-key")
    emit(shown, args.output)
    if "apiKey" in shown and args.output == "table":
        print("the management key is shown once: store it now", file=sys.stderr)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.get(f"/dock-status/{args.id}")
    if args.wait and job["status"] == "IN_PROGRESS":
        job = follow(client, job | {"dockStatusId": args.id})
    emit(job, args.output)
    return 1 if job["status"] == "FAILED" else 0


def cmd_usage(args: argparse.Namespace) -> int:
    client = _client(args)
    dep = args.deployment and deployment_id(client, args.deployment, "--deployment")
    params = {
        "deploymentId": dep,
        "keyId": args.key_id and key_id(client, dep, args.key_id, "--key-id"),
        "start": args.start,
        "end": args.end,
        "groupBy": args.group_by,
    }
    usage = client.get("/usage", params={k: v for k, v in params.items() if v})
    emit(usage, args.output, USAGE_COLUMNS, "rows")
    if args.output == "table":
        t = usage["totals"]
        print(f"total: {t['requests']} requests, {t['totalTokens']} tokens")
    return 0


UPLOAD_COLUMNS: Columns = [
    ("SESSION", lambda u: u["sessionId"]),
    ("FILE", lambda u: u["fileName"][:40]),
    ("SIZE", lambda u: u["totalSize"]),
    ("CHUNKS", lambda u: f"{u['chunksReceived']}/{u['totalChunks']}"),
    ("BY", lambda u: u["createdByName"]),
    ("STARTED", lambda u: u["createdAt"]),
]


def cmd_uploads(args: argparse.Namespace) -> int:
    """Chunked upload sessions: the open ones, what one has received, or cancel one (its
    chunks are deleted; the server would keep them until idle for a day)."""
    client = _client(args)
    if args.action == "list":
        emit(client.get("/files/session"), args.output, UPLOAD_COLUMNS, "sessions")
        return 0
    if not args.id:
        raise SystemExit(f"raydock: uploads {args.action} needs a SESSION_ID")
    path = f"/files/session/{args.id}"
    emit(client.get(path) if args.action == "show" else client.delete(path), args.output)
    return 0


# ------------------------------------------------------------------ the parsers


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="platform URL (default from settings / RAYDOCK_URL)")
    p.add_argument("--key", help="management key (default RAYDOCK_API_KEY)")
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")


def _waiting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true", help="print the job and return at once")


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the resource commands through cli.py's `add(name, func, help)`."""
    p = add("models", cmd_models, "models: list | show MODEL | delete MODEL | export MODEL")
    _common(p)
    _waiting(p)
    p.add_argument(
        "action", nargs="?", default="list", choices=["list", "show", "delete", "export"]
    )
    p.add_argument("id", nargs="?", metavar="MODEL", help="a model's id or name")
    p.add_argument(
        "--deployment",
        help="export: the deployment (id or name) whose configuration goes into "
        "deployconfig.json (default: the model's latest)",
    )
    p.add_argument("--out", metavar="PATH", help="export: also download the zip (file or folder)")

    p = add(
        "deployments",
        cmd_deployments,
        "deployments: list | show | deploy MODEL | redeploy | undeploy | retrigger | "
        "delete | history",
    )
    _common(p)
    _waiting(p)
    p.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=[
            "list",
            "show",
            "deploy",
            "redeploy",
            "undeploy",
            "retrigger",
            "delete",
            "history",
        ],
    )
    p.add_argument(
        "id",
        nargs="?",
        metavar="DEPLOYMENT",
        help="a deployment's id or name (deploy: a model's id or name)",
    )
    p.add_argument("--model", help="list: only this model's deployments (its id or name)")
    p.add_argument("--name", help="deploy: the deployment's name")
    p.add_argument("--device", help="deploy, redeploy: the deviceType (default cpu-small)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="deploy, redeploy: a field of the deploy body, e.g. hyperParameters.topK=40",
    )

    p = add("history", cmd_history, "a deployment's history versions")
    _common(p)
    p.add_argument("id", metavar="DEPLOYMENT", help="a deployment's id or name")

    p = add("keys", cmd_keys, "a deployment's inference keys: list | create | delete | limits")
    _common(p)
    p.add_argument("action", choices=["list", "create", "delete", "limits"])
    p.add_argument(
        "deployment", action=_KeyRef, metavar="DEPLOYMENT", help="the deployment's id or name"
    )
    p.add_argument(
        "key_id",
        action=_KeyRef,
        nargs="?",
        metavar="KEY",
        help="delete, limits: the key's id or name",
    )
    p.add_argument("--name", help="create: the key's name")
    for field, option in LIMIT_OPTIONS.items():
        p.add_argument(option, dest=field, type=int, metavar="N", help=f"create, limits: {field}")
    p.add_argument(
        "--clear",
        action=_Clear,
        nargs="?",
        const="all",
        default=[],
        metavar="FIELD",
        help=f"limits: remove this limit ({', '.join(LIMIT_OPTIONS)}; repeatable); alone, "
        "every limit not given",
    )

    p = add("users", cmd_users, "users (admin): list | create NAME | delete ID | rotate-key ID|me")
    _common(p)
    p.add_argument("action", choices=["list", "create", "delete", "rotate-key"])
    p.add_argument("id", nargs="?", help="create: the name; delete, rotate-key: the user's id")
    p.add_argument("--email", help="create: the user's email (notifications)")
    p.add_argument("--admin", action="store_true", help="create: an admin")

    p = add("jobs", cmd_jobs, "a job's dock status (imports, exports, deploys)")
    _common(p)
    p.add_argument("action", choices=["show"])
    p.add_argument("id", help="a dockStatusId")
    p.add_argument("--wait", action="store_true", help="follow it until it ends")

    p = add("usage", cmd_usage, "requests and tokens per deployment, adapter and key")
    _common(p)
    p.add_argument("--deployment", help="a deployment's id or name")
    p.add_argument("--key-id", help="an API key's id (or its name, with --deployment)")
    p.add_argument("--start", help="ISO 8601, inclusive")
    p.add_argument("--end", help="ISO 8601, exclusive")
    p.add_argument("--group-by", choices=["day", "hour", "minute", "total"], default="day")

    p = add("uploads", cmd_uploads, "chunked upload sessions: list | show ID | cancel ID")
    _common(p)
    p.add_argument("action", choices=["list", "show", "cancel"])
    p.add_argument("id", nargs="?", metavar="SESSION_ID", help="the upload's sessionId")
