"""Lists that grow without bound, as their users see them over HTTP in process (a real
registry, no Ray): GET /models and a deployment's history answer pages, a bad page size is
refused naming the field and its range, a user's own notification deliveries are found
however many others came after them, and the CLI reads every page."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from raydock import cli, client
from raydock.config import load_settings
from raydock.platform import api_deps, db, notify
from raydock.platform.api import app
from raydock.platform.registry import Registry
from tests.unit.registry_handle import RegistryHandle
from tests.unit.test_cli_refs import platform, run  # noqa: F401 (the CLI's fixture)


def get(key: str, path: str, **params) -> dict:
    with TestClient(app) as http:
        r = http.get(f"/public{path}", params=params, headers={"X-api-key": key})
    assert r.status_code == 200, r.text
    return r.json()


def every_page(key: str, path: str, rows: str, limit: int) -> list[list[dict]]:
    """The pages of a list, following each answer's nextOffset from the first."""
    pages, offset = [], 0
    while offset is not None:
        page = get(key, path, limit=limit, offset=offset)
        pages.append(page[rows])
        offset = page["nextOffset"]
    return pages


# ------------------------------------------------------------------ GET /models


def test_pages_of_models_hold_every_model_once_newest_first(api, tmp_path):
    reg, key = api
    uid = reg.authenticate_management(key)["userId"]
    made = [reg.create_model(f"m{i}", "file", uid)["modelId"] for i in range(7)]
    # three imported in the same instant (long ago): their order is still the same each time
    same = made[2:5]
    with db.make_engine(f"sqlite:///{tmp_path / 'raydock.db'}").begin() as conn:
        conn.execute(
            text(f"UPDATE models SET created_at = :t WHERE id IN {tuple(same)}"),
            {"t": "2001-01-01 00:00:00.000000"},
        )

    pages = every_page(key, "/models", "models", limit=3)
    assert [len(p) for p in pages] == [3, 3, 1]
    listed = [m["modelId"] for page in pages for m in page]
    # each model exactly once, newest first, the same-instant three by id
    assert listed == [made[6], made[5], made[1], made[0], *sorted(same, reverse=True)]
    first = get(key, "/models", limit=3)
    assert (first["total"], first["limit"], first["offset"], first["nextOffset"]) == (7, 3, 0, 3)
    # an older client asks without parameters: `models` and `total`, all of them on one page
    old = get(key, "/models")
    assert old["total"] == 7 and [m["modelId"] for m in old["models"]] == listed
    assert old["nextOffset"] is None
    assert get(key, "/models", offset=50)["models"] == []  # past the end: an empty page


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"limit": 0}, "limit", "limit must be between 1 and 1000 (got 0)"),
        ({"limit": 1001}, "limit", "limit must be between 1 and 1000 (got 1001)"),
        ({"offset": -1}, "offset", "offset must be between 0 and 2147483647 (got -1)"),
        ({"offset": 2**63}, "offset", "offset must be between 0 and 2147483647"),
    ],
)
def test_a_page_out_of_range_is_refused_naming_the_field_and_its_range(api, params, field, words):
    reg, key = api
    dep = _deployment(reg, key)
    for path in ("/models", f"/deployments/{dep}/history"):
        with TestClient(app) as http:
            r = http.get(f"/public{path}", params=params, headers={"X-api-key": key})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == field and words in error["message"]


def test_the_document_states_the_page_parameters_and_answer():
    from raydock.platform import openapi_doc

    op = openapi_doc.combined()["paths"]["/api/public/models"]["get"]
    limit = next(p["schema"] for p in op["parameters"] if p["name"] == "limit")
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 1000, 100)
    page = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"models", "total", "nextOffset"} <= set(page["required"])
    assert "422" in op["responses"]


# ------------------------------------------------------------------ a deployment's history


def _deployment(reg: Registry, key: str, versions: int = 0) -> str:
    uid = reg.authenticate_management(key)["userId"]
    model = reg.create_model("m", "file", uid)["modelId"]
    reg.set_model_status(model, "VALIDATING")
    reg.set_model_status(model, "READY", artifact_uri="/x", checksum="c")
    dep = reg.create_deployment(model, client.default_deploy_body("chat"), uid)["deploymentId"]
    for _ in range(versions):
        reg.begin_deploy(dep, None, uid, "DEPLOYING")
        reg.set_deployment_status(dep, "DEPLOYED")
    return dep


def test_pages_of_a_history_hold_every_version_once_and_mark_the_latest(api):
    reg, key = api
    dep = _deployment(reg, key, versions=5)
    pages = every_page(key, f"/deployments/{dep}/history", "versions", limit=2)
    assert [[v["version"] for v in p] for p in pages] == [[1, 2], [3, 4], [5]]
    latest = [v["version"] for p in pages for v in p if v["latest"]]
    assert latest == [5]  # the newest, and only it, though the other pages do not hold it
    whole = get(key, f"/deployments/{dep}/history")  # an older client: one page, all
    assert whole["total"] == 5 and len(whole["versions"]) == 5
    assert [v["version"] for v in whole["versions"] if v["latest"]] == [5]


# ------------------------------------------------------------------ notification deliveries


def test_a_user_sees_an_own_delivery_older_than_a_thousand_others(db_url, tmp_path, monkeypatch):
    """A non-admin's list was filtered from the newest 1,000 deliveries: behind 1,001 of
    other users' events, their own was gone."""
    reg = Registry(db_url)
    try:
        reg.ensure_admin()
        ana = reg.create_user("ana", "ana@example.test", False, "system")
        bo = reg.create_user("bo", "bo@example.test", False, "system")
        deployed = {"deploymentId": "dp-1", "deploymentName": "chat", "modelId": "cm-1"}
        own = notify.new_event(notify.DEPLOYED, ana["userId"], deployed)
        mine = reg.record_delivery(own, "email", "ana@example.test")
        others = notify.new_event(notify.DEPLOYED, bo["userId"], deployed)
        for _ in range(1001):
            reg.record_delivery(others, "email", "bo@example.test")
        # ana's event to the platform's address is not hers to see
        reg.record_delivery(own, "email", "ops@example.test")
        settings = load_settings(home=str(tmp_path))
        monkeypatch.setattr(api_deps.ctx, "settings", settings, raising=False)
        monkeypatch.setattr(api_deps.ctx, "registry", RegistryHandle(reg), raising=False)

        shown = get(ana["apiKey"], "/notifications/deliveries", limit=5)["deliveries"]
        assert [d["deliveryId"] for d in shown] == [mine["deliveryId"]]
        assert shown[0]["target"] == "ana@example.test"
        # bo's own: pages like every list's, counted in the query
        first = get(bo["apiKey"], "/notifications/deliveries", limit=600)
        assert (len(first["deliveries"]), first["total"], first["nextOffset"]) == (600, 1001, 600)
        rest = get(bo["apiKey"], "/notifications/deliveries", limit=600, offset=600)
        assert (len(rest["deliveries"]), rest["nextOffset"]) == (401, None)
        ids = {d["deliveryId"] for d in first["deliveries"] + rest["deliveries"]}
        assert len(ids) == 1001 and mine["deliveryId"] not in ids
    finally:
        reg.close()


# ------------------------------------------------------------------ the CLI


def test_models_list_shows_every_model_across_pages(platform, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(client, "PAGE_SIZE", 2)
    made = {platform.model(f"m{i}") for i in range(5)}
    platform.paths()
    shown = run(capsys, "models", "list")
    assert {m["modelId"] for m in shown["models"]} == made and shown["total"] == 5
    assert [p for p in platform.paths() if p.startswith("GET /models")] == [
        f"GET /models?limit=2&offset={n}" for n in (0, 2, 4)
    ]
    # a name is found on any page
    assert run(capsys, "models", "show", "m0")["name"] == "m0"


def test_keys_limits_takes_clear_before_the_deployment_and_key(platform, capsys):  # noqa: F811
    """README: `keys limits DEPLOYMENT KEY [...] [--clear [FIELD]]`; a bare --clear written
    first took the DEPLOYMENT as a field's name (an argparse error)."""
    platform.deployment(platform.model("tiny"), "chat")
    limits = ["--requests-per-minute", "5", "--tokens-per-day", "100"]
    run(capsys, "keys", "create", "chat", "--name", "ci", *limits)
    cleared = run(capsys, "keys", "limits", "--clear", "chat", "ci")["limits"]
    assert cleared == {"requestsPerMinute": None, "tokensPerMinute": None, "tokensPerDay": None}
    run(capsys, "keys", "limits", "chat", "ci", "--tokens-per-day", "9")
    one = run(capsys, "keys", "limits", "--clear", "tokensPerDay", "chat", "ci")["limits"]
    assert one["tokensPerDay"] is None
    kept = run(capsys, "keys", "limits", "chat", "--clear", "ci", "--tokens-per-minute", "7")
    assert kept["limits"]["tokensPerMinute"] == 7
    # the KEY after options (argparse fills positionals only where they stand together)
    run(capsys, "keys", "limits", "chat", "--requests-per-minute", "5", "ci")
    late = run(capsys, "keys", "limits", "chat", "--clear", "requestsPerMinute", "ci")
    assert late["limits"]["requestsPerMinute"] is None
    with pytest.raises(SystemExit):  # a third name is still an error
        cli.main(["keys", "limits", "chat", "ci", "--tokens-per-day", "3", "extra"])
    assert "unrecognized arguments: extra" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a field that is none, once both names are given
        cli.main(["keys", "limits", "chat", "ci", "--clear", "tokensPerYear"])
    assert "invalid choice: 'tokensPerYear'" in capsys.readouterr().err
