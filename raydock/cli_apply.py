"""`raydock apply | diff | get deployments | rollback`: declarative deployments from the
command line (also as a Ray job: `ray job submit ... -- raydock apply -f .`).

Thin clients of `POST /api/public/apply` and `/deployments/{id}/rollback`: they read the
files (with each field's line, for the API's messages), hash and upload the zips the
platform asks for, print each change, then follow what was started until it ends. The API
decides what changes. Exit status 1 when anything failed."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydock import apply_files

#: deployment states a deploy passes through (platform/states.py)
STARTING = ("READY_TO_DEPLOY", "OPTIMIZING", "DEPLOYING")
#: how often a long wait says it is still waiting
STILL_WAITING_S = 15.0


def say(line: str = "") -> None:
    print(line, flush=True)  # a Ray job's log shows each line as it comes


def _client(args: argparse.Namespace) -> Any:
    from raydock.cli import _client as client_for  # one place reads --url/--key and the env

    return client_for(args)


def _documents(args: argparse.Namespace) -> tuple[list[apply_files.Document], dict[str, Path]]:
    docs: list[apply_files.Document] = []
    for target in args.filename:
        docs.extend(apply_files.load(target))
    if not docs and not args.prune:
        raise apply_files.FileError(f"{', '.join(args.filename)}: no deployment documents")
    return docs, apply_files.resolve_zips(docs)


def _request(docs: list[apply_files.Document], prune: bool, dry_run: bool) -> dict[str, Any]:
    return {"documents": [d.wire() for d in docs], "prune": prune, "dryRun": dry_run}


def _deployment(change: dict[str, Any]) -> str:
    """Which deployment a change is about: its name on its model (two models may each have
    a deployment of one name)."""
    name = change["deployment"] if change["kind"] == "apiKey" else change["name"]
    return f"deployment {name}" + (f" on {change['model']}" if change.get("model") else "")


def _describe(change: dict[str, Any]) -> str:
    if change["kind"] == "apiKey":
        what = f"apiKey {change['name']} of {_deployment(change)}"
    else:
        what = _deployment(change)
    line = f"{change['source']}: {what}: {change['action']}"
    if change.get("adopted"):
        line += " (made by hand; apply manages it from now on)"
    if change.get("version"):
        line += f" → {change['version']}"
    return line


def _print_changes(changes: list[dict[str, Any]], only_differences: bool = False) -> None:
    for c in changes:
        if only_differences and c["action"] == "unchanged":
            continue
        say(_describe(c))
        for detail in c.get("details") or []:
            say(f"    {detail}")
        if c.get("apiKeyWrittenTo"):
            say(f"    key written to {c['apiKeyWrittenTo']} (shown once)")
        elif c.get("apiKey"):
            say(f"    key (shown once, store it now): {c['apiKey']}")
        if c.get("error"):
            say(f"    failed: {c['error']}")


def _writable(path: Path) -> None:
    """The secrets file, made (empty, 0600) or found writable; else a FileError naming it."""
    try:
        path.touch(mode=0o600, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as exc:
        raise apply_files.FileError(f"--secrets-out {path}: cannot write it: {exc}") from None


def keep_secrets(changes: list[dict[str, Any]], path: Path) -> None:
    """Move the created keys' secrets out of `changes` into a file only its owner reads, as
    `model/deployment/key: secret` lines (model: its id; a deployment's name is unique per
    model only), e.g. in a Ray job, whose log the cluster keeps."""
    created = [c for c in changes if c.get("apiKey")]
    if not created:
        return
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)  # a file that was there already may be readable by others
    with path.open("a") as f:
        for c in created:
            f.write(f"{c['modelId']}/{c['deployment']}/{c['name']}: {c['apiKey']}\n")
            c["apiKey"], c["apiKeyWrittenTo"] = None, str(path)


def _upload(client: Any, uploads: list[dict[str, Any]], zips: dict[str, Path]) -> bool:
    """Import the zips the platform lacks (chunked upload, then the import), with progress."""
    from raydock.cli import _import_with_progress

    for u in uploads:
        path = zips[u["sha256"]]
        say(f"{u['source']}: importing {u['zip']} ({path.stat().st_size / 2**20:.1f} MiB)")
        model = _import_with_progress(client, path)
        if model["status"] != "READY":
            say(f"{u['source']}: import of {u['zip']} failed: {model.get('error')}")
            return False
        say(f"{u['source']}: {u['zip']} is model {model['modelId']} (READY)")
    return True


def _wait_deployment(client: Any, change: dict[str, Any]) -> bool:
    """Follow a deploy (or an import that then deploys) to its end, one line per status
    change and one every STILL_WAITING_S; True when it ends DEPLOYED."""
    name, dep_id = _deployment(change), change["deploymentId"]
    job = change.get("job") or {}
    if job.get("action") == "IMPORT":  # a catalog or Hugging Face model is downloaded first
        from raydock.cli import _follow_import

        say(f"{name}: importing its model {job['modelId']}")
        if _follow_import(client, job)["status"] != "READY":
            return False
    started = last_said = time.monotonic()
    status = None
    while True:
        dep = client.get(f"/deployments/{dep_id}")
        now = time.monotonic()
        if dep["status"] != status or now - last_said > STILL_WAITING_S:
            status, last_said = dep["status"], now
            if status in STARTING:
                say(f"{name}: {status} ({now - started:.0f} s)")
        if status not in STARTING:
            break
        time.sleep(1)
    if job.get("action") == "DEPLOY":  # the job says whether this deploy worked: a failed
        ended = client.wait_job(job["dockStatusId"], timeout=60)  # redeploy may keep DEPLOYED
        if ended["status"] != "SUCCESS":
            say(f"{name}: {status}, but this deploy FAILED: {ended.get('message')}")
            return False
    if status == "DEPLOYED":
        version = change.get("version") or "its live version"
        say(f"{name}: DEPLOYED ({version}) in {time.monotonic() - started:.0f} s")
        return True
    say(f"{name}: {status}: {dep.get('failureReason') or 'see its history'}")
    return False


def _wait_undeploy(client: Any, change: dict[str, Any]) -> bool:
    job = client.wait_job(change["job"]["dockStatusId"], timeout=900)
    ok = job["status"] == "SUCCESS"
    say(f"{_deployment(change)}: {'UNDEPLOYED' if ok else 'undeploy failed'}")
    return ok


def _follow(client: Any, changes: list[dict[str, Any]]) -> bool:
    ok = True
    for c in changes:
        if c.get("error"):
            ok = False
        elif c["kind"] != "deployment":
            continue
        elif c["action"] == "undeploy":
            ok = _wait_undeploy(client, c) and ok
        elif c.get("job") or c["action"] == "wait" and c.get("deploymentId"):
            ok = _wait_deployment(client, c) and ok
    return ok


def cmd_apply(args: argparse.Namespace) -> int:
    if args.output != "json":
        return _apply(args)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the progress; stdout holds the JSON alone
        return _apply(args, stdout)


def _apply(args: argparse.Namespace, json_out: Any = None) -> int:
    docs, zips = _documents(args)
    if args.secrets_out:  # before anything changes: a key's secret is shown only once
        _writable(Path(args.secrets_out))
    client = _client(args)
    planned = client.post("/apply", json=_request(docs, args.prune, dry_run=True))
    if planned["uploads"] and not _upload(client, planned["uploads"], zips):
        return 1
    changes: list[dict[str, Any]] = []
    waited: set[str] | None = None  # the documents (file:line) that waited for an import
    while True:
        result = client.post("/apply", json=_request(docs, args.prune, dry_run=False))
        done = result["changes"]
        if waited is not None:  # the second round: what waited for an import
            done = result["changes"] = [c for c in done if c["source"] in waited]
        if args.secrets_out:  # the keys go to the file, never to stdout (a job's log)
            keep_secrets(done, Path(args.secrets_out))
        if args.output != "json":
            _print_changes(done)
        ok = _follow(client, done)
        after = [c for c in done if c.get("after") and c["kind"] == "deployment"]
        changes += [c for c in done if not (ok and c.get("after"))]
        if waited is not None or not (ok and after):
            break
        waited = {c["source"] for c in after}  # their model is READY now: apply once more
        say(f"apply: again, for {', '.join(sorted(_deployment(c) for c in after))}")
    if json_out is not None:  # one document, both rounds' changes
        print(json.dumps(result | {"changes": changes}, indent=2), file=json_out)
    counts: dict[str, int] = {}
    for c in changes:
        counts[c["action"]] = counts.get(c["action"], 0) + 1
    summary = ", ".join(f"{n} {action}" for action, n in counts.items()) or "nothing to apply"
    say(f"apply: {summary}; {'done' if ok else 'FAILED'}")
    return 0 if ok else 1


def cmd_diff(args: argparse.Namespace) -> int:
    """What apply would change; exit 1 when something would (as `diff` and `kubectl diff`)."""
    docs, _ = _documents(args)
    planned = _client(args).post("/apply", json=_request(docs, args.prune, dry_run=True))
    if args.output == "json":
        print(json.dumps(planned, indent=2))
    else:
        _print_changes(planned["changes"], only_differences=True)
    changed = [c for c in planned["changes"] if c["action"] != "unchanged"]
    if args.output != "json":
        say(f"diff: {len(changed)} to change, {len(planned['changes']) - len(changed)} unchanged")
    return 1 if changed else 0


def cmd_get(args: argparse.Namespace) -> int:
    """`get deployments -o yaml`: the live deployments as files `raydock apply` takes."""
    from raydock.cli_resources import DEPLOYMENT_COLUMNS, _all_deployments, emit

    client = _client(args)
    if args.output == "table":
        rows = _all_deployments(client, None)
        emit({"deployments": rows}, "table", DEPLOYMENT_COLUMNS, "deployments")
        return 0
    docs = client.get("/apply/export")["documents"]
    if args.output == "json":
        print(json.dumps(docs, indent=2))
    else:
        print(apply_files.dump(docs), end="")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from raydock.cli_resources import _job_result, deployment_id

    client = _client(args)
    dep_id = deployment_id(client, args.deployment)
    ref = client.post(f"/deployments/{dep_id}/rollback", params={"version": args.version})
    print(f"rolling back to {ref['rolledBackTo']} as {ref['version']}", file=sys.stderr)
    return _job_result(client, args, ref)


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the commands through cli.py's `add(name, func, help)`."""

    def common(p: argparse.ArgumentParser, outputs: list[str], default: str) -> None:
        p.add_argument("--url", help="platform URL (default from settings / RAYDOCK_URL)")
        p.add_argument(
            "--key", help="management key (default RAYDOCK_API_KEY, or RAYDOCK_API_KEY_FILE)"
        )
        p.add_argument("-o", "--output", choices=outputs, default=default)

    for name, func, help_ in (
        ("apply", cmd_apply, "make the platform match deployment files (idempotent)"),
        ("diff", cmd_diff, "what `raydock apply` would change (exit 1 when anything)"),
    ):
        p = add(name, func, help_)
        common(p, ["text", "json"], "text")
        p.add_argument(
            "-f",
            "--filename",
            action="append",
            required=True,
            metavar="FILE_OR_DIR",
            help="a deployment file, or a folder of *.yaml files (repeatable)",
        )
        p.add_argument(
            "--prune",
            action="store_true",
            help="also undeploy deployments apply manages that these files no longer name",
        )
        if name == "apply":
            p.add_argument(
                "--secrets-out",
                metavar="FILE",
                help="append the secrets of keys it creates to FILE (mode 0600) instead of "
                "printing them",
            )
    p = add("get", cmd_get, "get deployments -o yaml: the live deployments as apply files")
    common(p, ["table", "json", "yaml"], "table")
    p.add_argument("resource", choices=["deployments"])
    p = add("rollback", cmd_rollback, "redeploy a history version's configuration")
    common(p, ["table", "json", "yaml"], "table")
    p.add_argument("deployment", help="the deployment's id or name")
    p.add_argument("--version", type=int, required=True, help="the history version N (name_vN)")
    p.add_argument("--no-wait", action="store_true", help="print the job and return at once")
