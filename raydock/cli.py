"""The `raydock` command: run the platform, try it, and drive its API."""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from raydock.client import ApiFailure
from raydock.config import Settings, SettingsError, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        home=getattr(args, "home", None),
        port=getattr(args, "port", None),
        ray_address=getattr(args, "address", None),
    )


def _pidfile(settings: Settings) -> Path:
    return settings.home_path / "raydock.pid"


def _started_at(pid: int) -> str | None:
    """When process pid started (clock ticks since boot, from /proc), None if no such process
    (or no /proc): with the pid, it tells `raydock up` from a later process given its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return ""  # /proc unreadable here: the pid alone must do
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def _write_pidfile(settings: Settings) -> None:
    pid = os.getpid()
    _pidfile(settings).write_text(f"{pid} {_started_at(pid) or ''}".strip())


def _running_up(settings: Settings) -> int | None:
    """The pid of the `raydock up` of this data dir, None if its pid file is missing or stale:
    that process ended (a crash, a kill -9 left the file) and its pid may now be another's."""
    try:
        pid_text, _, started = _pidfile(settings).read_text().partition(" ")
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    now = _started_at(pid)
    if now is None or (started and now and now != started.strip()):
        return None
    return pid


# ------------------------------------------------------------------ up / down


def cmd_up(args: argparse.Namespace) -> int:
    """Start Ray (or join --address), the platform, and stay up until Ctrl-C / `raydock down`."""
    import ray

    from raydock.platform.bootstrap import (
        check_port_free,
        chosen_admin_key,
        configured_secret_key,
        connect,
        start_platform,
        stop_platform,
    )
    from raydock.platform.db import DatabaseRefused

    settings = _settings(args)
    if not settings.ray_address:  # a cluster of our own: its proxy binds the port here
        check_port_free(settings.host, settings.port)
    chosen_admin_key()  # a short RAYDOCK_ADMIN_KEY: refused before anything starts
    configured_secret_key()  # and a RAYDOCK_SECRET_KEY that is not a key
    # the data dir holds the database, uploads and weights: owner-only (Ray's workers, which
    # write them, inherit the umask from here)
    os.umask(0o077)
    settings.home_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_database(settings)  # before Ray starts: one line and exit 1 when it cannot be used
    connect(settings)
    try:
        info = start_platform(settings)
    except DatabaseRefused:  # taken by another platform meanwhile: leave nothing running
        if not settings.ray_address:
            ray.shutdown()
        raise
    _write_pidfile(settings)
    url = info["url"]
    print(f"raydock is up at {url}  (web dashboard: {url}/, API docs: {url}/docs)")
    print(f"data dir: {settings.home_path}")
    if info["admin_key"] and info["admin_key"] == os.environ.get("RAYDOCK_ADMIN_KEY"):
        print("first admin: the management key RAYDOCK_ADMIN_KEY gives (not printed)")
    elif info["admin_key"]:
        print("first admin management key (shown once, store it now):")
        print(f"  {info['admin_key']}")
    sys.stdout.flush()
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop["now"]:
        time.sleep(0.5)
    print("raydock: shutting down")
    # a cluster of our own goes down with us; on a joined one, only raydock's parts go
    stop_platform(own_cluster=not settings.ray_address)
    if not settings.ray_address:
        ray.shutdown()
    _pidfile(settings).unlink(missing_ok=True)
    return 0


def _check_database(settings: Settings) -> None:
    """The database is free (no other platform holds its lease) and its schema is one this
    raydock can bring to its version; raises db.DatabaseRefused otherwise. The registry
    applies the migrations when it starts; this says which."""
    from raydock.platform import db, migrations
    from raydock.platform.lease import Lease

    with Lease(settings.db_url, "raydock up (starting)") as lease:
        lease.acquire(wait_s=5, any_holder=False)  # a holder that just ended: a moment
        engine = db.make_engine(settings.db_url)
        try:
            st = migrations.current(engine)
        finally:
            engine.dispose()
    if st.pending and not st.empty:
        what = "adopting a database made before migrations, then " if st.premigration else ""
        print(f"database: {what}upgrading {st.revision or 'it'} to {st.head}", flush=True)


#: how long `raydock down` waits: Serve's own shutdown alone may take 30 s on a busy host
DOWN_TIMEOUT_S = 180


def cmd_down(args: argparse.Namespace) -> int:
    settings = _settings(args)
    pidfile = _pidfile(settings)
    if not pidfile.exists():
        print("raydock is not running (no pid file)")
        return 0
    pid = _running_up(settings)
    try:
        if pid is None:
            raise ProcessLookupError
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        print("raydock was not running (stale pid file removed)")
        return 0
    print("raydock is stopping (Serve drains its replicas, then Ray stops) ...", flush=True)
    started = time.monotonic()
    while time.monotonic() - started < DOWN_TIMEOUT_S:
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"raydock stopped ({time.monotonic() - started:.0f} s)")
            return 0
    print(f"raydock did not stop within {DOWN_TIMEOUT_S} s (pid {pid})", file=sys.stderr)
    return 1


# ------------------------------------------------------------------ API commands


def _client(args: argparse.Namespace):
    from raydock.client import Client

    settings = _settings(args)
    key = args.key or os.environ.get("RAYDOCK_API_KEY") or _key_from_file()
    if not key:
        sys.exit("a management key is needed: --key, RAYDOCK_API_KEY or RAYDOCK_API_KEY_FILE")
    return Client(args.url or os.environ.get("RAYDOCK_URL") or settings.base_url, key)


def _key_from_file() -> str | None:
    """RAYDOCK_API_KEY_FILE: a file holding the key (e.g. on the head node, for Ray jobs:
    the key then stays out of the job's runtime environment, which `ray job list` shows)."""
    path = os.environ.get("RAYDOCK_API_KEY_FILE")
    return Path(path).expanduser().read_text().strip() if path else None


def _import_with_progress(client, path: Path, **options) -> dict:
    from tqdm import tqdm

    size = path.stat().st_size
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"upload {path.name}") as bar:

        def on_bytes(sent: int, _total: int) -> None:
            bar.update(sent - bar.n)

        ref = client.import_zip(path, chunked=True, progress=on_bytes, **options)
    return _follow_import(client, ref)


def _follow_import(client, ref: dict) -> dict:
    """Show an import's progress (its dock status: percentage, bytes downloaded) until it
    ends; returns the model."""
    from tqdm import tqdm

    with tqdm(total=100, desc=f"import {ref['dockStatusId']}", unit="%") as bar:

        def on_job(job: dict) -> None:
            bar.update(job["percentageComplete"] - bar.n)
            bar.set_postfix_str(job.get("message") or "")

        # a download of many GiB takes as long as it takes: the job's progress shows it moves
        job = client.wait_job(ref["dockStatusId"], timeout=math.inf, progress=on_job)
    model = client.get(f"/models/{ref['modelId']}")
    if job["status"] != "SUCCESS":
        print(f"import failed: {model.get('error') or job.get('message')}", file=sys.stderr)
    return model


def cmd_import(args: argparse.Namespace) -> int:
    from raydock.cli_resources import model_id

    client = _client(args)
    base = args.base_model and model_id(client, args.base_model, "--base-model")
    model = _import_with_progress(client, Path(args.file), kind=args.kind, baseModelId=base)
    print(json.dumps(model, indent=2))
    return 0 if model["status"] == "READY" else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    from raydock.cli_resources import follow, model_id
    from raydock.client import deploy_body

    client = _client(args)
    ref = client.deploy(model_id(client, args.model_id), deploy_body(args.name, args.device))
    job = follow(client, ref)  # a progress bar with the deployment's status
    print(json.dumps(client.get(f"/deployments/{ref['deploymentId']}"), indent=2))
    return 0 if job["status"] == "SUCCESS" else 1


def cmd_import_hf(args: argparse.Namespace) -> int:
    client = _client(args)
    body = {"repoId": args.repo, "revision": args.revision, "connectionId": args.connection}
    model = _follow_import(client, client.post("/models/import/huggingface", json=body))
    print(json.dumps(model, indent=2))
    return 0 if model["status"] == "READY" else 1


def _follow_deploy(client, ref: dict) -> int:
    """Follow a deploy that first imports (Hugging Face, catalog), then the deploy itself."""
    if ref["action"] == "IMPORT":
        model = _follow_import(client, ref)
        if model["status"] != "READY":
            return 1
    dep_id = ref["deployment"]["deploymentId"]
    dep = client.get(f"/deployments/{dep_id}")
    while dep["status"] in ("READY_TO_DEPLOY", "OPTIMIZING", "DEPLOYING"):
        time.sleep(1)
        dep = client.get(f"/deployments/{dep_id}")
    print(json.dumps(dep, indent=2))
    return 0 if dep["status"] == "DEPLOYED" else 1


def cmd_deploy_hf(args: argparse.Namespace) -> int:
    from raydock.client import deploy_body

    client = _client(args)
    body = deploy_body(args.name, args.device) | {
        "repoId": args.repo,
        "revision": args.revision,
        "connectionId": args.connection,
    }
    return _follow_deploy(client, client.post("/deployments/huggingface", json=body))


def cmd_catalog(args: argparse.Namespace) -> int:
    params = {"name": args.name, "family": args.family}
    rows = _client(args).get("/catalog", params={k: v for k, v in params.items() if v})
    print(f"{'ID':34} {'FAMILY':9} {'PARAMS':>7} {'CONTEXT':>8}  {'SMALLEST FIT':14} REPO")
    for e in rows["models"]:
        print(
            f"{e['id'][:34]:34} {e['family']:9} {e['parameters'] / 1e9:>6.2f}B "
            f"{e['context_length']:>8}  {e['suggestedDeviceType'] or '-':14} {e['repo']}"
        )
    return 0


def cmd_deploy_catalog(args: argparse.Namespace) -> int:
    from raydock.client import deploy_body

    client = _client(args)
    body = deploy_body(args.name, args.device) | {"connectionId": args.connection}
    return _follow_deploy(client, client.post(f"/catalog/{args.entry}/deploy", json=body))


def cmd_connections(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "list":
        for c in client.get("/connections")["connections"]:
            test = c["lastTest"] or {}
            state = {True: "ok", False: "refused", None: "untested"}[test.get("ok")]
            print(f"{c['connectionId']}  {c['name']:24} {c['hfUser'] or '-':20} {state}")
        return 0
    if not args.target:
        raise SystemExit(f"raydock: connections {args.action} needs a connection name or id")
    if args.action == "create":
        # from the environment or a prompt, never the command line (shell history, ps)
        token = os.environ.get("HF_TOKEN")
        if not token:
            try:
                token = getpass.getpass("Hugging Face token: ")
            except EOFError:  # no terminal to ask on (a job, a pipe)
                message = "raydock: connections create: set HF_TOKEN (no terminal to ask on)"
                raise SystemExit(message) from None
        out = client.post("/connections", json={"name": args.target, "token": token})
    elif args.action == "test":
        out = client.post(f"/connections/{args.target}/test")
    else:
        out = client.delete(f"/connections/{args.target}")
    print(json.dumps(out, indent=2))
    return 0 if (out.get("lastTest") or {}).get("ok", True) is not False else 1


# ------------------------------------------------------------------ database


def cmd_db(args: argparse.Namespace) -> int:
    """The schema's versions, for operators who migrate separately (`raydock up` applies
    pending migrations itself). Same settings and RAYDOCK_DATABASE_URL as `raydock up`; no Ray."""
    from raydock.platform import db, migrations
    from raydock.platform.lease import Lease

    settings = _settings(args)
    if args.action == "history":  # the code's revisions: no database needed
        head = migrations.head()
        for script in migrations.history():
            mark = " (head)" if script.revision == head else ""
            print(f"{script.revision}{mark}  {script.doc.splitlines()[0]}")
        return 0
    if settings.db_url.startswith("sqlite"):
        settings.home_path.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(settings.db_url)
    try:
        with Lease(settings.db_url, f"raydock db {args.action}") as lease:
            if args.action == "upgrade":  # never under a running platform's feet
                lease.acquire(wait_s=5, any_holder=False)
                before, now = migrations.upgrade(engine)
                if not before.pending:
                    print(f"database {db.safe_url(settings.db_url)} is at {now} (head)")
                    return 0
                how = "adopted (made before migrations), then " if before.premigration else ""
                print(
                    f"database {db.safe_url(settings.db_url)}: {how}upgraded from "
                    f"{before.revision or 'nothing'} to {now} ({', '.join(before.pending)})"
                )
                return 0
            st = migrations.current(engine)
            print(f"database: {db.safe_url(settings.db_url)}")
            if st.revision and not st.pending:
                print(f"revision: {st.revision} (head)")
            elif st.empty:
                print(f"revision: none (empty): an upgrade creates the schema at {st.head}")
            else:
                what = st.revision or "none (made before migrations; adopted by an upgrade)"
                print(f"revision: {what}; pending: {', '.join(st.pending)}")
            try:
                lease.acquire()
                print("lease: free (no platform is running on it)")
            except db.DatabaseRefused:
                print(f"lease: held by {lease.holder() or 'a process not yet known'}")
            return 0
    finally:
        engine.dispose()


# ------------------------------------------------------------------ demo


def cmd_demo(args: argparse.Namespace) -> int:
    """Import the bundled model's zip, deploy it, and chat with it through the OpenAI SDK."""
    import openai

    from raydock.client import Client, deploy_body
    from raydock.modelgen import build_model_zip

    url = args.url or os.environ.get("RAYDOCK_URL")
    key = args.key or os.environ.get("RAYDOCK_API_KEY") or _key_from_file()
    embedded = not key  # a key means a running platform: at --url, else the settings' URL
    if embedded and args.url:
        raise SystemExit("raydock: demo --url needs the platform's key (--key or RAYDOCK_API_KEY)")
    url = url or _settings(args).base_url
    if embedded:  # no platform given: run one in-process on a fresh data dir
        from raydock.platform.bootstrap import check_port_free, connect, start_platform

        home = args.home or tempfile.mkdtemp(prefix="raydock-demo-")
        settings = load_settings(home=home, port=args.port)
        check_port_free(settings.host, settings.port)  # a platform already there: say so
        print(f"starting an embedded platform (data dir {home}) ...")
        connect(settings, include_dashboard=False)
        info = start_platform(settings)
        url, key = info["url"], info["admin_key"] or key
    client = Client(url, key)
    try:
        work = Path(tempfile.mkdtemp(prefix="raydock-demo-zip-"))
        zip_path = build_model_zip(work / "raydock-tiny-chat.zip", size=args.size)
        model = _import_with_progress(client, zip_path, description="bundled demo model")
        if model["status"] != "READY":
            return 1
        print(f"model {model['name']} ({model['modelId']}) is {model['statusLabel']}")
        ref = client.deploy(model["modelId"], deploy_body("demo-chat"))
        print(f"deploying {ref['deploymentId']} (dock status {ref['dockStatusId']}) ...")
        job = client.wait_job(ref["dockStatusId"], timeout=600)
        dep = client.get(f"/deployments/{ref['deploymentId']}")
        if job["status"] != "SUCCESS":
            print(f"deploy failed: {dep['failureReason']}", file=sys.stderr)
            return 1
        print(f"deployment {dep['deploymentId']} is {dep['status']}")
        inference_key = client.create_key(dep["deploymentId"], "demo")
        base = f"{url}/deployments/{dep['deploymentId']}/v2"
        sdk = openai.OpenAI(base_url=base, api_key=inference_key)
        reply = sdk.chat.completions.create(
            model=dep["deploymentId"],
            messages=[{"role": "user", "content": "Say hello to raydock."}],
            max_tokens=24,
            seed=7,
        )
        print(f"reply: {reply.choices[0].message.content!r}")
        print("(the bundled model has random weights: its reply is noise, by design)")
        print(f"usage: {reply.usage.model_dump()}")
        print(f"endpoint: {base}/chat/completions")
        print("curl:")
        print(f"  {dep['curl'].replace('$RAYDOCK_KEY', inference_key)}")
        return 0
    finally:
        if embedded:
            import ray

            from raydock.platform.bootstrap import stop_platform

            stop_platform(own_cluster=not settings.ray_address)  # joined: our apps only
            ray.shutdown()


# ------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raydock", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        p.add_argument("--home", help="data dir (default ~/.raydock)")
        p.add_argument("--port", type=int, help="HTTP port of the Serve proxy (default 8000)")
        return p

    up = add("up", cmd_up, "start the platform and stay up")
    up.add_argument("--address", help="join this Ray cluster instead of starting one")
    add("down", cmd_down, "stop a platform started with `raydock up`")
    demo = add("demo", cmd_demo, "import, deploy and chat with the bundled model")
    dbp = add("db", cmd_db, "the database schema's versions (Alembic); no Ray needed")
    dbp.add_argument(
        "action",
        choices=["upgrade", "current", "history"],
        help="upgrade: apply pending migrations (refused while a platform runs on it); "
        "current: the database's revision and who holds it; history: this raydock's revisions",
    )
    demo.add_argument("--size", default="tiny", choices=["tiny", "small"])
    demo.add_argument("--url", help="a running platform (default RAYDOCK_URL, else settings)")
    demo.add_argument("--key", help="its management key (default RAYDOCK_API_KEY)")
    for name, func, help_ in (
        ("import", cmd_import, "import a model .zip (chunked upload with progress)"),
        ("import-hf", cmd_import_hf, "import a model from Hugging Face (progress shown)"),
        ("deploy", cmd_deploy, "deploy a model with default parameters"),
        ("deploy-hf", cmd_deploy_hf, "import a Hugging Face model and deploy it"),
        ("catalog", cmd_catalog, "list the platform-hosted catalog"),
        ("deploy-catalog", cmd_deploy_catalog, "deploy a catalog model"),
        ("connections", cmd_connections, "Hugging Face connections (token from HF_TOKEN)"),
    ):
        p = add(name, func, help_)
        p.add_argument("--url", help="platform URL (default from settings / RAYDOCK_URL)")
        p.add_argument("--key", help="management key (default RAYDOCK_API_KEY)")
        if name == "import":
            p.add_argument("file")
            p.add_argument("--kind", default="base", choices=["base", "adapter"])
            p.add_argument("--base-model", help="adapters: the base model's id or name")
        if name in ("import-hf", "deploy-hf"):
            p.add_argument("repo", help="Hugging Face repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
            p.add_argument("--revision", help="branch, tag or commit (default main)")
        if name in ("import-hf", "deploy-hf", "deploy-catalog"):
            p.add_argument("--connection", help="connection id (private or gated repos)")
        if name == "deploy":
            p.add_argument("model_id", metavar="MODEL", help="the model's id or name")
        if name == "deploy-catalog":
            p.add_argument("entry", help="catalog entry id (raydock catalog lists them)")
        if name in ("deploy", "deploy-hf", "deploy-catalog"):
            p.add_argument("--name", required=True)
            p.add_argument("--device", default="cpu-small")
        if name == "catalog":
            p.add_argument("--name", help="filter: a substring of the id, name or repo")
            p.add_argument("--family", help="filter: llama, qwen, mistral, gemma, phi, …")
        if name == "connections":
            p.add_argument("action", choices=["list", "create", "test", "delete"])
            p.add_argument("target", nargs="?", help="a name (create) or a connection id")
    from raydock import apply_files, cli_apply, cli_backup, cli_resources

    cli_resources.register(add)  # models, deployments, keys, jobs, history, usage
    cli_backup.register(add)  # backup, restore
    cli_apply.register(add)  # apply, diff, get deployments, rollback
    args, extra = parser.parse_known_args(argv)
    # argparse fills positionals only where they stand together: `keys limits chat --clear
    # requestsPerMinute ci` leaves KEY after the options over; it is still the key
    for word in extra:
        if word.startswith("-") or args.command != "keys" or not cli_resources.fill_ref(args, word):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback
        print(
            "raydock: interrupted (an upload in progress was cancelled; a job the platform "
            "already started goes on: raydock jobs show <id>)",
            file=sys.stderr,
        )
        return 130
    except ApiFailure as exc:  # the server's own message: one line, no traceback
        print(f"raydock: {exc}", file=sys.stderr)
    except httpx.TransportError as exc:
        url = getattr(args, "url", None) or "the platform"
        print(f"raydock: cannot reach {url}: {exc}; is `raydock up` running?", file=sys.stderr)
    except OSError as exc:  # e.g. the file to import does not exist
        print(f"raydock: {exc}", file=sys.stderr)
    except apply_files.FileError as exc:  # a deployment file: "file:line: what"
        print(f"raydock: {exc}", file=sys.stderr)
    except SettingsError as exc:  # platform.yaml or a RAYDOCK_* variable
        print(f"raydock: {exc}", file=sys.stderr)
    except Exception as exc:  # the database refused, or cannot be reached: one line too
        reason = _database_failure(exc, args)
        if reason is None:
            raise
        print(f"raydock: {reason}", file=sys.stderr)
    # diff's 1 means "something would change" (as diff(1) and kubectl diff): its errors are 2
    return 2 if args.command == "diff" else 1


def _database_failure(exc: Exception, args: argparse.Namespace) -> str | None:
    if "sqlalchemy" not in sys.modules:  # nothing touched a database
        return None
    from sqlalchemy.exc import SQLAlchemyError

    from raydock.platform.db import DatabaseRefused, safe_url

    if isinstance(exc, DatabaseRefused):
        return str(exc)
    if isinstance(exc, SQLAlchemyError):
        why = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return f"cannot use the database {safe_url(_settings(args).db_url)}: {why}"
    return None


if __name__ == "__main__":
    sys.exit(main())
