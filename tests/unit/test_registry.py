"""The registry on a real SQLite file and a real PostgreSQL server, without Ray."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from raydock.client import default_deploy_body
from raydock.platform import db, security
from raydock.platform.registry import Conflict, NotFound, Registry
from raydock.platform.states import InvalidTransition


@pytest.fixture
def reg(db_url) -> Registry:
    """On SQLite and on PostgreSQL (tests/unit/conftest.py)."""
    registry = Registry(db_url)
    yield registry
    registry.close()


@pytest.fixture
def admin(reg) -> tuple[str, dict]:
    key = reg.ensure_admin()
    return key, reg.authenticate_management(key)


def ready_model(reg: Registry, user_id: str) -> dict:
    m = reg.create_model("tiny", "file", user_id)
    reg.set_model_status(m["modelId"], "VALIDATING")
    return reg.set_model_status(m["modelId"], "READY", artifact_uri="/x", checksum="c")


def test_first_admin_key_is_created_once_and_stored_hashed(reg, db_url, tmp_path):
    key = reg.ensure_admin()
    assert key.startswith("rdm-")
    assert reg.ensure_admin() is None  # never shown twice
    if db_url.startswith("sqlite"):
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("raydock.db*"))  # db + WAL
    else:  # every row of every table, as text
        engine = db.make_engine(db_url)
        with engine.connect() as conn:
            tables = inspect(conn).get_table_names()
            rows = [r for t in tables for r in conn.execute(text(f'SELECT * FROM "{t}"'))]
        engine.dispose()
        raw = repr(rows).encode()
    assert key.encode() not in raw
    assert security.hash_key(key).encode() in raw
    assert reg.authenticate_management(key)["name"] == "admin"
    assert reg.authenticate_management(key + "x") is None


def test_two_admins_deleting_each_other_at_once_leave_one(reg, admin):
    """Each request was authenticated before either delete ran: both passed, and no admin
    was left to add users or take backups."""
    _, first = admin
    second = reg.create_user("ops", None, True, first["userId"])
    reg.delete_user(second["userId"], by_user_id=first["userId"])
    with pytest.raises(Conflict, match="no longer an admin"):
        reg.delete_user(first["userId"], by_user_id=second["userId"])
    assert [u["name"] for u in reg.list_users()] == ["admin"]


def test_model_status_machine(reg, admin):
    _, user = admin
    m = reg.create_model("tiny", "file", user["userId"])
    assert m["status"] == "IMPORTING"
    with pytest.raises(InvalidTransition, match="IMPORTING to READY"):
        reg.set_model_status(m["modelId"], "READY")
    reg.set_model_status(m["modelId"], "VALIDATING")
    reg.set_model_status(m["modelId"], "IMPORT_FAILED", error="bad")
    with pytest.raises(InvalidTransition):
        reg.set_model_status(m["modelId"], "READY")


def test_deploy_versions_and_history(reg, admin):
    _, user = admin
    m = ready_model(reg, user["userId"])
    body = default_deploy_body("Flan T5")
    d = reg.create_deployment(m["modelId"], body, user["userId"])
    dep_id = d["deploymentId"]
    reg.begin_deploy(dep_id, body, user["userId"], "DEPLOYING")
    with pytest.raises(Conflict, match="already DEPLOYING"):
        reg.begin_deploy(dep_id, body, user["userId"], "DEPLOYING")
    reg.set_deployment_status(dep_id, "DEPLOYED")
    reg.begin_deploy(dep_id, {**body, "timeout": 90}, user["userId"], "DEPLOYING")
    reg.set_deployment_status(dep_id, "FAILED", "no memory")
    hist = reg.history(dep_id)
    assert [h["name"] for h in hist] == ["Flan T5_v1", "Flan T5_v2"]
    assert [h["result"] for h in hist] == ["SUCCESS", "FAILED"]
    assert hist[1]["failureReason"] == "no memory"
    assert hist[1]["config"]["timeout"] == 90 and hist[1]["latest"]
    assert hist[0]["deployedBy"] == "admin"
    assert reg.get_deployment(dep_id)["timeout"] == 90
    # an edit (PATCH) is part of the configuration a re-trigger or an export starts from
    reg.update_deployment(dep_id, timeout=150, description="edited", tags=["x"])
    config = reg.get_deployment(dep_id)["config"]
    assert (config["timeout"], config["description"], config["tags"]) == (150, "edited", ["x"])
    reg.begin_deploy(dep_id, None, user["userId"], "DEPLOYING")  # a re-trigger
    assert reg.get_deployment(dep_id)["timeout"] == 150
    assert reg.history(dep_id)[-1]["config"]["timeout"] == 150


def test_a_deploy_and_its_job_end_in_one_step(reg, admin):
    """DEPLOYED and the deploy job's SUCCESS are one write: a lifecycle dying between two
    would leave a serving deployment whose job reconciliation fails as interrupted."""
    _, user = admin
    m = ready_model(reg, user["userId"])
    dep_id = reg.create_deployment(m["modelId"], default_deploy_body("d"), user["userId"])[
        "deploymentId"
    ]
    job = reg.begin_deploy(dep_id, None, user["userId"], "DEPLOYING")["dockStatusId"]
    reg.set_deployment_status(dep_id, "DEPLOYED", job_id=job, job_message="deployed: 1 started")
    ended = reg.get_job(job)
    assert (ended["status"], ended["message"], ended["percentageComplete"]) == (
        "SUCCESS",
        "deployed: 1 started",
        100,
    )
    assert reg.get_deployment(dep_id)["status"] == "DEPLOYED"
    # a job that cannot end so leaves the deployment as it was: nothing half-written
    again = reg.begin_deploy(dep_id, None, user["userId"], "DEPLOYING")["dockStatusId"]
    reg.update_job(again, status="FAILED", message="cancelled")
    with pytest.raises(InvalidTransition):
        reg.set_deployment_status(dep_id, "DEPLOYED", job_id=again)
    assert reg.get_deployment(dep_id)["status"] == "DEPLOYING"


def test_a_redeploy_that_fails_before_serve_saw_it_keeps_the_live_version(reg, admin):
    """The lifecycle calls keep_live_version when a redeploy's conversion, merge or plan
    failed before the Serve application was touched: the old replicas still run, so the
    deployment stays DEPLOYED on the live configuration (with the redeploy's edits, which
    need no redeploy), the failed version ends FAILED, and replicas keep serving."""
    _, user = admin
    uid = user["userId"]
    m = ready_model(reg, uid)
    body = default_deploy_body("live")
    dep_id = reg.create_deployment(m["modelId"], body, uid)["deploymentId"]
    reg.begin_deploy(dep_id, None, uid, "DEPLOYING")
    assert reg.keep_live_version(dep_id, "x") is None  # a first deploy has nothing live
    reg.set_deployment_status(dep_id, "DEPLOYED")
    ct2 = {"optimizationType": "ctranslate2", "quantizationType": "int8"}
    changed = {**body, "optimizationInfo": ct2, "timeout": 120}
    reg.begin_deploy(dep_id, changed, uid, "OPTIMIZING")

    assert reg.keep_live_version(dep_id, "conversion failed: no space") == "live_v1"
    dep = reg.get_deployment(dep_id)
    assert dep["status"] == "DEPLOYED" and not dep["failureReason"]
    assert dep["config"]["optimizationInfo"] == body["optimizationInfo"]
    assert dep["timeout"] == 120 and dep["config"]["timeout"] == 120
    versions = reg.history(dep_id)
    assert [(v["name"], v["result"]) for v in versions] == [
        ("live_v1", "SUCCESS"),
        ("live_v2", "FAILED"),
        ("live_v3", "SUCCESS"),
    ]
    assert versions[1]["failureReason"] == "conversion failed: no space"
    assert reg.access_snapshots([dep_id])[dep_id]["serving"]
    # the next redeploy starts from a live version: served meanwhile, as before
    job = reg.begin_deploy(dep_id, changed, uid, "OPTIMIZING")
    assert reg.access_snapshots([dep_id])[dep_id]["serving"]
    # the platform restarted during that conversion: the job ends, the live version serves on
    reg.fail_jobs([job["dockStatusId"]], "interrupted")
    assert reg.get_deployment(dep_id)["status"] == "DEPLOYED"
    assert reg.history(dep_id)[-2]["result"] == "FAILED"
    reg.begin_deploy(dep_id, changed, uid, "OPTIMIZING")
    reg.keep_live_version(dep_id, "again")
    # its app is lost (restores failed): nothing runs, so a failed redeploy keeps nothing
    reg.set_deployment_status(dep_id, "FAILED", "its Serve application was lost")
    reg.begin_deploy(dep_id, changed, uid, "OPTIMIZING")
    assert not reg.access_snapshots([dep_id])[dep_id]["serving"]
    assert reg.keep_live_version(dep_id, "conversion failed") is None


def test_an_undeploy_while_starting_cancels_the_deploy(reg, admin):
    """Undeploy applies to a starting deployment: its deploy job and the version it was
    starting end FAILED saying who cancelled them, and it may become UNDEPLOYED."""
    _, user = admin
    uid = user["userId"]
    m = ready_model(reg, uid)
    body = default_deploy_body("slow")
    dep_id = reg.create_deployment(m["modelId"], body, uid)["deploymentId"]
    reg.cancel_deploy(dep_id, uid)  # nothing starting: nothing changes
    deploy = reg.begin_deploy(dep_id, None, uid, "DEPLOYING")
    assert reg.live_version(dep_id) is None  # a first deploy replaces nothing
    undeploy = reg.begin_undeploy(dep_id, uid)
    assert undeploy["action"] == "UNDEPLOY"
    reg.cancel_deploy(dep_id, uid)
    job = reg.get_job(deploy["dockStatusId"])
    assert job["status"] == "FAILED" and job["message"] == "cancelled: undeployed by admin"
    reg.set_deployment_status(dep_id, "UNDEPLOYED")
    [version] = reg.history(dep_id)
    assert version["result"] == "FAILED" and version["failureReason"] == job["message"]
    # and a redeploy of a live version names the version it replaces
    reg.update_job(undeploy["dockStatusId"], status="SUCCESS")
    reg.begin_deploy(dep_id, None, uid, "DEPLOYING")
    reg.set_deployment_status(dep_id, "DEPLOYED")
    reg.begin_deploy(dep_id, None, uid, "OPTIMIZING")
    assert reg.live_version(dep_id) == {
        "name": "slow_v2",
        "config": reg.history(dep_id)[1]["config"],
    }
    # that redeploy cancelled: the live version's replicas were undeployed with it
    reg.begin_undeploy(dep_id, uid)
    reg.cancel_deploy(dep_id, uid)
    reg.set_deployment_status(dep_id, "UNDEPLOYED")
    live = reg.history(dep_id)[1]
    assert live["name"] == "slow_v2" and live["undeployment"]["undeployedBy"] == "admin"
    assert live["undeployment"]["endedAt"]
    assert reg.live_version(dep_id) is None  # nothing starting: nothing replaced


def test_model_counts_and_delete_rules(reg, admin):
    _, user = admin
    m = ready_model(reg, user["userId"])
    d = reg.create_deployment(m["modelId"], default_deploy_body("a"), user["userId"])
    reg.begin_deploy(d["deploymentId"], None, user["userId"], "DEPLOYING")
    reg.set_deployment_status(d["deploymentId"], "DEPLOYED")
    listed = reg.list_models()[0]
    assert (listed["activeDeployments"], listed["deploymentFailed"]) == (1, 0)
    with pytest.raises(Conflict, match="active deployments"):
        reg.delete_model(m["modelId"])
    with pytest.raises(Conflict, match="only"):
        reg.delete_deployment(d["deploymentId"])
    reg.set_deployment_status(d["deploymentId"], "UNDEPLOYED")
    reg.delete_model(m["modelId"])
    with pytest.raises(NotFound):
        reg.get_model(m["modelId"])


def test_delete_model_says_whether_another_model_holds_the_same_weights(reg, admin):
    _, user = admin
    first, second = ready_model(reg, user["userId"]), ready_model(reg, user["userId"])
    assert reg.delete_model(first["modelId"])["checksumShared"] is True
    assert reg.delete_model(second["modelId"])["checksumShared"] is False


def test_deployment_keys_are_scoped_hashed_and_revocable(reg, admin):
    _, user = admin
    m = ready_model(reg, user["userId"])
    d = reg.create_deployment(m["modelId"], default_deploy_body("a"), user["userId"])
    created = reg.create_deployment_key(d["deploymentId"], "ci", user["userId"])
    assert created["apiKey"].startswith("rdk-")
    listed = reg.list_deployment_keys(d["deploymentId"])
    assert "apiKey" not in listed[0] and listed[0]["prefix"] == created["apiKey"][:10]
    assert reg.authenticate_management(created["apiKey"]) is None  # not a management key
    reg.delete_deployment_key(d["deploymentId"], created["keyId"])
    assert reg.list_deployment_keys(d["deploymentId"]) == []


def test_orphan_jobs_fail_with_what_they_were_moving(reg, admin):
    _, user = admin
    importing = reg.create_model("half", "file", user["userId"])
    job = reg.create_job("IMPORT", importing["modelId"], user["userId"])
    m = ready_model(reg, user["userId"])
    d = reg.create_deployment(m["modelId"], default_deploy_body("a"), user["userId"])
    deploy = reg.begin_deploy(d["deploymentId"], None, user["userId"], "DEPLOYING")
    assert deploy["action"] == "DEPLOY" and deploy["deploymentId"] == d["deploymentId"]
    # the grace period keeps jobs just handed over; a running job is never an orphan
    assert reg.orphan_jobs([], grace_s=60) == []
    orphans = reg.orphan_jobs([deploy["dockStatusId"]], grace_s=0)
    assert [j["dockStatusId"] for j in orphans] == [job["dockStatusId"]]
    ids = [j["dockStatusId"] for j in reg.orphan_jobs([], grace_s=0)]
    out = reg.fail_jobs(ids, "interrupted")
    assert sorted(out["jobs"]) == sorted([job["dockStatusId"], deploy["dockStatusId"]])
    assert reg.get_job(job["dockStatusId"])["status"] == "FAILED"
    assert reg.get_model(importing["modelId"])["error"] == "interrupted"
    dep = reg.get_deployment(d["deploymentId"])
    assert dep["status"] == "FAILED" and dep["failureReason"] == "interrupted"
    assert reg.history(d["deploymentId"])[0]["result"] == "FAILED"
    assert reg.fail_jobs(ids, "again")["jobs"] == []  # finished jobs stay as they ended


def test_undeploy_job_only_for_a_started_deployment_and_once(reg, admin):
    _, user = admin
    m = ready_model(reg, user["userId"])
    d = reg.create_deployment(m["modelId"], default_deploy_body("a"), user["userId"])
    allowed = "DEPLOYED, DEPLOYING, FAILED, OPTIMIZING"
    with pytest.raises(Conflict, match=f"READY_TO_DEPLOY; only {allowed} can be undeployed"):
        reg.begin_undeploy(d["deploymentId"], user["userId"])
    reg.begin_deploy(d["deploymentId"], None, user["userId"], "DEPLOYING")
    reg.set_deployment_status(d["deploymentId"], "DEPLOYED")
    job = reg.begin_undeploy(d["deploymentId"], user["userId"])
    assert job["action"] == "UNDEPLOY" and job["createdBy"] == user["userId"]
    with pytest.raises(Conflict, match="already being undeployed"):
        reg.begin_undeploy(d["deploymentId"], user["userId"])


def test_a_deploy_needs_a_ready_model_and_no_undeploy_under_way(reg, admin):
    """A re-trigger of a deployment whose model's import failed is refused (its engine would
    find no weights); so is a redeploy while an undeploy of it runs (that undeploy would
    delete the new version's app and fail)."""
    _, user = admin
    uid = user["userId"]
    failed = reg.create_model("gone", "hugging_face", uid)
    d = reg.create_deployment(
        failed["modelId"], default_deploy_body("w"), uid, awaiting_import=True
    )
    job = reg.create_job("IMPORT", failed["modelId"], uid, d["deploymentId"])
    reg.fail_jobs([job["dockStatusId"]], "the download broke")
    assert reg.get_deployment(d["deploymentId"])["status"] == "FAILED"
    with pytest.raises(Conflict, match="IMPORT_FAILED, not READY.*retry its import first"):
        reg.begin_deploy(d["deploymentId"], None, uid, "DEPLOYING")
    assert reg.history(d["deploymentId"]) == []  # nothing recorded for the refused deploy
    # a retried import: the deployment waits for it again (and deploys when it is READY)
    retry = reg.begin_retry_import(failed["modelId"], uid)
    assert retry["job"]["deploymentId"] == d["deploymentId"]
    waiting = reg.get_deployment(d["deploymentId"])
    assert waiting["status"] == "READY_TO_DEPLOY" and not waiting["failureReason"]

    m = ready_model(reg, uid)
    live = reg.create_deployment(m["modelId"], default_deploy_body("live"), uid)
    reg.begin_deploy(live["deploymentId"], None, uid, "DEPLOYING")
    reg.set_deployment_status(live["deploymentId"], "DEPLOYED")
    reg.begin_undeploy(live["deploymentId"], uid)
    with pytest.raises(Conflict, match="is being undeployed"):
        reg.begin_deploy(live["deploymentId"], None, uid, "DEPLOYING")
    assert reg.get_deployment(live["deploymentId"])["status"] == "DEPLOYED"


def test_a_status_change_only_from_a_status_leaves_a_deployment_that_moved_on(reg, admin):
    """The deploy that waited for an import fails its deployment only while it still waits:
    one its user deployed meanwhile stays theirs."""
    _, user = admin
    uid = user["userId"]
    m = ready_model(reg, uid)
    d = reg.create_deployment(m["modelId"], default_deploy_body("w"), uid)["deploymentId"]
    reg.begin_deploy(d, None, uid, "DEPLOYING")  # the user's own deploy got there first
    assert reg.set_deployment_status(d, "FAILED", "late", only_from="READY_TO_DEPLOY") is None
    assert reg.get_deployment(d)["status"] == "DEPLOYING"
    assert reg.set_deployment_status(d, "FAILED", "why", only_from="DEPLOYING")["status"] == (
        "FAILED"
    )


def test_an_interrupted_deploy_tells_the_replicas_it_stopped(reg, admin, monkeypatch):
    """fail_jobs ends a starting deployment FAILED: its access snapshot (what replicas and
    the gateway serve by) is published, else they keep serving the old status."""
    _, user = admin
    m = ready_model(reg, user["userId"])
    d = reg.create_deployment(m["modelId"], default_deploy_body("a"), user["userId"])
    deploy = reg.begin_deploy(d["deploymentId"], None, user["userId"], "DEPLOYING")
    published: list[dict] = []
    monkeypatch.setattr(reg, "_publish", published.append)  # the access hub is not running
    reg.fail_jobs([deploy["dockStatusId"]], "interrupted")
    assert published and published[-1][d["deploymentId"]]["status"] == "FAILED"


def test_deleting_a_model_ends_its_running_import(reg, admin):
    _, user = admin
    importing = reg.create_model("half", "file", user["userId"])
    job = reg.create_job("IMPORT", importing["modelId"], user["userId"])
    deleted = reg.delete_model(importing["modelId"])
    ended = reg.get_job(job["dockStatusId"])
    assert ended["status"] == "FAILED" and ended["message"] == "the model was deleted"
    assert deleted["endedJobs"] == [job["dockStatusId"]]  # the API stops their tasks


def test_long_names_fit_their_columns_on_every_backend(reg, admin):
    """PostgreSQL holds VARCHAR(n) to n (SQLite stores anything): a zip's file name of 250
    characters names its model, a user name of 200 its management key."""
    _, user = admin
    m = reg.create_model("m" * 250, "file", user["userId"])
    assert reg.get_model(m["modelId"])["name"] == "m" * 200
    made = reg.create_user("u" * 200, None, False, user["userId"])
    assert reg.authenticate_management(made["apiKey"])["name"] == "u" * 200


def test_an_ended_jobs_outcome_is_not_changed_by_late_progress(reg, admin):
    _, user = admin
    m = reg.create_model("late", "file", user["userId"])
    job = reg.create_job("IMPORT", m["modelId"], user["userId"])["dockStatusId"]
    reg.update_job(job, status="FAILED", message="the model was deleted", response={"error": "x"})
    # a task still running reports on (progress reports are sent without waiting)
    reg.update_job(job, percentage=80, message="downloaded", response={"downloadedBytes": 1})
    ended = reg.get_job(job)
    assert (ended["status"], ended["message"]) == ("FAILED", "the model was deleted")
    assert ended["response"] == {"error": "x"}


def test_redeploy_by_name_takes_the_newest_of_that_name(reg, admin, db_url):
    """New names are unique per model; a database of an older raydock may hold two."""
    _, user = admin
    m = ready_model(reg, user["userId"])
    first = reg.create_deployment(m["modelId"], default_deploy_body("chat"), user["userId"])
    newest = reg.create_deployment(m["modelId"], default_deploy_body("chat2"), user["userId"])
    engine = db.make_engine(db_url)
    with engine.begin() as conn:  # as an older raydock left it
        conn.execute(text("UPDATE deployments SET name = 'chat' WHERE name = 'chat2'"))
    engine.dispose()
    for _ in range(3):  # rewritten rows move on PostgreSQL's pages (it took them in that order)
        reg.update_deployment(first["deploymentId"], description="edited")
    found = reg.find_deployment_by_name(m["modelId"], "chat")
    assert found["deploymentId"] == newest["deploymentId"]


def test_v1_models_created_is_the_utc_time_on_any_host_timezone(reg, admin, monkeypatch):
    import time as clock

    _, user = admin
    m = ready_model(reg, user["userId"])
    before = int(clock.time())
    d = reg.create_deployment(m["modelId"], default_deploy_body("tz"), user["userId"])
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    clock.tzset()
    try:
        created = reg.access_snapshots([d["deploymentId"]])[d["deploymentId"]]["created"]
    finally:
        monkeypatch.delenv("TZ")
        clock.tzset()
    assert before - 1 <= created <= int(clock.time()) + 1


def test_a_refused_delete_names_the_states_in_plain_words(reg, admin):
    from raydock.errors import Conflict

    _, user = admin
    m = ready_model(reg, user["userId"])
    d = reg.create_deployment(m["modelId"], default_deploy_body("busy"), user["userId"])
    reg.begin_deploy(d["deploymentId"], None, user["userId"], "DEPLOYING")
    with pytest.raises(Conflict) as exc:
        reg.delete_deployment(d["deploymentId"])
    assert str(exc.value) == (
        "deployment is DEPLOYING; only FAILED, READY_TO_DEPLOY, UNDEPLOYED can be deleted"
    )


def test_a_redeploy_interrupted_while_deploying_keeps_the_live_version(reg, admin):
    """The platform restarted while a redeploy was DEPLOYING: the deployment was FAILED
    (an outage of a version that had been serving); now the live version is kept, and the
    lifecycle is told to run its app again (Serve may hold the new version's)."""
    _, user = admin
    uid = user["userId"]
    m = ready_model(reg, uid)
    body = default_deploy_body("chat")
    dep_id = reg.create_deployment(m["modelId"], body, uid)["deploymentId"]
    first = reg.begin_deploy(dep_id, None, uid, "DEPLOYING")
    reg.set_deployment_status(dep_id, "DEPLOYED")
    reg.update_job(first["dockStatusId"], status="SUCCESS")
    changed = {**body, "hyperParameters": {**body["hyperParameters"], "topK": 30}}
    job = reg.begin_deploy(dep_id, changed, uid, "DEPLOYING")
    out = reg.fail_jobs([job["dockStatusId"]], "interrupted")
    assert out["kept"] == [dep_id] and out["deployments"] == []
    dep = reg.get_deployment(dep_id)
    assert (
        dep["status"] == "DEPLOYED" and dep["config"]["hyperParameters"] == body["hyperParameters"]
    )
    assert [v["result"] for v in reg.history(dep_id)] == ["SUCCESS", "FAILED", "SUCCESS"]
    assert reg.get_job(job["dockStatusId"])["status"] == "FAILED"
    # a first deploy interrupted has nothing live: it fails, as before
    other = reg.create_deployment(m["modelId"], default_deploy_body("new"), uid)["deploymentId"]
    job = reg.begin_deploy(other, None, uid, "DEPLOYING")
    out = reg.fail_jobs([job["dockStatusId"]], "interrupted")
    assert out["kept"] == [] and out["deployments"] == [other]


def test_an_import_begins_in_one_step_or_not_at_all(reg, admin):
    """Model, waiting deployment and job are written together: a failure in between left a
    model IMPORTING for ever (no job for reconciliation to fail)."""
    from raydock.errors import Conflict

    _, user = admin
    uid = user["userId"]
    begun = reg.begin_import("acme/tiny", "hugging_face", uid, deploy=default_deploy_body("c"))
    job = reg.get_job(begun["job"]["dockStatusId"])
    assert job["modelId"] == begun["model"]["modelId"]
    assert job["deploymentId"] == begun["deployment"]["deploymentId"]
    before = len(reg.list_models())
    with pytest.raises(Conflict):  # an adapter onto no ready base: nothing is written
        reg.begin_import("lora", "file", uid, kind="adapter", base_model_id="cm-none")
    assert len(reg.list_models()) == before


def test_an_import_ends_with_its_job_in_one_step(reg, admin):
    """READY and the job's SUCCESS were two calls: a crash between them left a READY model
    whose job reconciliation failed, failing the deployment that waited for it."""
    _, user = admin
    uid = user["userId"]
    begun = reg.begin_import("tiny", "file", uid, deploy=default_deploy_body("w"))
    model_id, job_id = begun["model"]["modelId"], begun["job"]["dockStatusId"]
    reg.set_model_status(model_id, "VALIDATING")
    reg.set_model_status(model_id, "READY", job_id=job_id, artifact_uri="/x", checksum="c")
    job = reg.get_job(job_id)
    assert (job["status"], job["percentageComplete"], job["message"]) == (
        "SUCCESS",
        100,
        "imported",
    )
    assert reg.orphan_jobs([], grace_s=0) == []  # nothing left for reconciliation to fail
    failed = reg.begin_import("bad", "file", uid, deploy=default_deploy_body("w2"))
    reg.set_model_status(
        failed["model"]["modelId"],
        "IMPORT_FAILED",
        job_id=failed["job"]["dockStatusId"],
        error="not a zip",
    )
    assert reg.get_job(failed["job"]["dockStatusId"])["status"] == "FAILED"
    dep = reg.get_deployment(failed["deployment"]["deploymentId"])
    assert dep["status"] == "FAILED" and "not a zip" in dep["failureReason"]


def test_a_model_delete_names_what_goes_with_it_and_what_blocks_it(reg, admin):
    from raydock.errors import Conflict

    _, user = admin
    uid = user["userId"]
    base = ready_model(reg, uid)
    adapter = reg.create_model("lora", "file", uid, kind="adapter", base_model_id=base["modelId"])
    with pytest.raises(Conflict, match=adapter["modelId"]):
        reg.delete_model(base["modelId"])
    reg.delete_model(adapter["modelId"])
    d = reg.create_deployment(base["modelId"], default_deploy_body("idle"), uid)
    assert reg.delete_model(base["modelId"])["deletedDeployments"] == [d["deploymentId"]]


# ---------------------------------------------------------------- chunked uploads


def _upload(reg: Registry, chunks: int) -> str:
    body = {"fileName": "m.zip", "totalSize": chunks * 10, "totalChunks": chunks}
    return reg.create_upload_session(body, "u-1")["sessionId"]


def test_a_chunk_recorded_twice_is_received_once(reg):
    sid = _upload(reg, 4)
    assert reg.add_upload_chunk(sid, 3)["receivedChunks"] == [3]
    assert reg.add_upload_chunk(sid, 1)["receivedChunks"] == [1, 3]
    again = reg.add_upload_chunk(sid, 3)  # re-sent: the same chunk
    assert again["receivedChunks"] == [1, 3]
    assert reg.get_upload_session(sid) == again
    assert [u["chunksReceived"] for u in reg.list_upload_sessions()] == [2]
    with pytest.raises(NotFound, match="up-none"):
        reg.add_upload_chunk("up-none", 1)


def test_an_uploads_chunks_outlive_a_registry_restart_and_go_with_its_cancel(db_url):
    first = Registry(db_url)
    try:
        sid, other = _upload(first, 12), _upload(first, 2)
        for n in (10, 2, 11, 1, 2):
            first.add_upload_chunk(sid, n)
        first.add_upload_chunk(other, 1)
    finally:
        first.close()
    second = Registry(db_url)  # the same database, as a restarted platform has it
    try:
        assert second.get_upload_session(sid)["receivedChunks"] == [1, 2, 10, 11]
        counts = {u["sessionId"]: u["chunksReceived"] for u in second.list_upload_sessions()}
        assert counts == {sid: 4, other: 1}
        second.delete_upload_session(sid)  # cancelled, with its chunks
        assert [u["sessionId"] for u in second.list_upload_sessions()] == [other]
        with pytest.raises(NotFound):
            second.get_upload_session(sid)
        assert second.add_upload_chunk(other, 2)["receivedChunks"] == [1, 2]
    finally:
        second.close()
