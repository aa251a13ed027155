"""`raydock models|deployments|keys|users|jobs|history|usage`: the management API's resources from
the command line, each with `-o table|json|yaml` and `--url`/`--key` (else RAYDOCK_URL /
RAYDOCK_API_KEY). The API decides everything; these commands only call it and print.
Errors are one line (the API's message) with exit status 1 (raydock/cli.py's `main`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import yaml

Columns = list[tuple[str, Callable[[dict[str, Any]], Any]]]

#: deployment states a deploy passes through before it ends (platform/states.py's words)
IN_FLIGHT = ("READY_TO_DEPLOY", "OPTIMIZING", "DEPLOYING", "UNDEPLOYING")


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


# ------------------------------------------------------------------ waiting, with progress


def follow(client: Any, ref: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
    """Wait for a deployment job (deploy, redeploy, re-trigger, undeploy) with a progress bar
    showing the job's percentage and the deployment's status; returns the job."""
    from tqdm import tqdm

    dep_id = ref.get("deploymentId")
    with tqdm(total=100, desc=ref.get("action", "job").lower(), unit="%", disable=quiet) as bar:

        def on_job(job: dict[str, Any]) -> None:
            bar.update(job["percentageComplete"] - bar.n)
            status = client.get(f"/deployments/{dep_id}")["status"] if dep_id else ""
            bar.set_postfix_str(" ".join(filter(None, [status, job.get("message") or ""])))

        return client.wait_job(ref["dockStatusId"], timeout=1800, progress=on_job)


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
        raise SystemExit(f"raydock: {args.command} {args.action} needs an id")


def cmd_models(args: argparse.Namespace) -> int:
    _need_id(args)
    client = _client(args)
    if args.action == "list":
        emit(client.get("/models"), args.output, MODEL_COLUMNS, "models")
    elif args.action == "show":
        emit(client.get(f"/models/{args.id}"), args.output)
    else:
        emit(client.delete(f"/models/{args.id}"), args.output)
    return 0


def _all_deployments(client: Any, model_id: str | None) -> list[dict[str, Any]]:
    models = [model_id] if model_id else [m["modelId"] for m in client.get("/models")["models"]]
    return [d for m in models for d in client.get(f"/models/{m}/deployments")["deployments"]]


def _parse_set(pairs: list[str]) -> list[tuple[list[str], Any]]:
    """`--set a.b=value` pairs; a value is read as YAML (numbers, booleans, lists)."""
    out = []
    for pair in pairs:
        path, sep, raw = pair.partition("=")
        if not sep or not path:
            raise SystemExit(f"raydock: --set {pair!r}: expected FIELD=VALUE, e.g. topK=40")
        out.append((path.split("."), yaml.safe_load(raw) if raw else ""))
    return out


def _apply_sets(body: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    for path, value in _parse_set(pairs):
        node = body
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return body


def cmd_deployments(args: argparse.Namespace) -> int:
    from raydock.client import default_deploy_body

    _need_id(args)
    client, action = _client(args), args.action
    if action == "list":
        rows = _all_deployments(client, args.model)
        emit(
            {"deployments": rows, "total": len(rows)},
            args.output,
            DEPLOYMENT_COLUMNS,
            "deployments",
        )
        return 0
    if action == "show":
        emit(client.get(f"/deployments/{args.id}"), args.output)
        return 0
    if action == "history":
        emit(
            client.get(f"/deployments/{args.id}/history"), args.output, VERSION_COLUMNS, "versions"
        )
        return 0
    if action == "delete":
        emit(client.delete(f"/deployments/{args.id}"), args.output)
        return 0
    if action == "deploy":  # id: the model
        if not args.name:
            raise SystemExit("raydock: deployments deploy needs --name")
        body = _apply_sets(default_deploy_body(args.name, args.device or "cpu-small"), args.set)
        return _job_result(client, args, client.deploy(args.id, body))
    if action == "redeploy":  # the current configuration, with --device / --set applied
        body = client.get(f"/deployments/{args.id}")["config"]
        if args.device:
            body["deviceType"] = args.device
        body = _apply_sets(body, args.set)
        ref = client.post(f"/deployments/{args.id}/redeploy", json=body)
        return _job_result(client, args, ref)
    path = {"undeploy": "undeploy", "retrigger": "retrigger"}[action]
    return _job_result(client, args, client.post(f"/deployments/{args.id}/{path}"))


def cmd_history(args: argparse.Namespace) -> int:
    args.action = "history"
    return cmd_deployments(args)


def cmd_keys(args: argparse.Namespace) -> int:
    client = _client(args)
    base = f"/deployments/{args.deployment}/api-keys"
    if args.action == "list":
        emit(client.get(base), args.output, KEY_COLUMNS, "apiKeys")
    elif args.action == "delete":
        if not args.key_id:
            raise SystemExit("raydock: keys delete needs the key's id")
        emit(client.delete(f"{base}/{args.key_id}"), args.output)
    else:
        if not args.name:
            raise SystemExit("raydock: keys create needs --name")
        limits = {
            "requestsPerMinute": args.requests_per_minute,
            "tokensPerMinute": args.tokens_per_minute,
            "tokensPerDay": args.tokens_per_day,
        }
        body: dict[str, Any] = {"name": args.name}
        if any(v is not None for v in limits.values()):
            body["limits"] = {k: v for k, v in limits.items() if v is not None}
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
    params = {
        "deploymentId": args.deployment,
        "keyId": args.key_id,
        "start": args.start,
        "end": args.end,
        "groupBy": args.group_by,
    }
    usage = _client(args).get("/usage", params={k: v for k, v in params.items() if v})
    emit(usage, args.output, USAGE_COLUMNS, "rows")
    if args.output == "table":
        t = usage["totals"]
        print(f"total: {t['requests']} requests, {t['totalTokens']} tokens")
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
    p = add("models", cmd_models, "models: list | show ID | delete ID")
    _common(p)
    p.add_argument("action", nargs="?", default="list", choices=["list", "show", "delete"])
    p.add_argument("id", nargs="?", help="a model id (show, delete)")

    p = add(
        "deployments",
        cmd_deployments,
        "deployments: list | show | deploy MODEL_ID | redeploy | undeploy | retrigger | "
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
    p.add_argument("id", nargs="?", help="a deployment id (a model id for deploy)")
    p.add_argument("--model", help="list: only this model's deployments")
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
    p.add_argument("id", help="a deployment id")

    p = add("keys", cmd_keys, "a deployment's inference keys: list | create | delete")
    _common(p)
    p.add_argument("action", choices=["list", "create", "delete"])
    p.add_argument("deployment", help="the deployment's id")
    p.add_argument("key_id", nargs="?", help="delete: the key's id")
    p.add_argument("--name", help="create: the key's name")
    p.add_argument("--requests-per-minute", type=int)
    p.add_argument("--tokens-per-minute", type=int)
    p.add_argument("--tokens-per-day", type=int)

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
    p.add_argument("--deployment", help="a deployment id")
    p.add_argument("--key-id", help="an API key id")
    p.add_argument("--start", help="ISO 8601, inclusive")
    p.add_argument("--end", help="ISO 8601, exclusive")
    p.add_argument("--group-by", choices=["day", "hour", "minute", "total"], default="day")
