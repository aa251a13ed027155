"""Declarative deployment files: reading them with line numbers, validating them (errors name
the file, line and field), and the plan (what changes) against a platform's state."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from raydock import apply_files
from raydock.errors import ApiError
from raydock.platform import apply, schemas

SHA = "a" * 64

GOOD = """\
# a comment first: lines still count
name: tiny-chat
model:
  zip: ../models/tiny.zip
  sha256: {sha}
deviceType: cpu-small
hyperParameters:
  temperature: 0.5
  maxTokens: 3
scalingParameters:
  maxBatchSize: 4
apiKeys:
  - name: app
"""


def docs_of(text: str, source: str = "deployments/app.yaml") -> list[dict]:
    """The documents of a file as `raydock apply` sends them."""
    return [d.wire() for d in apply_files.load_text(textwrap.dedent(text), source)]


def declared(text: str = GOOD) -> list[apply.Declared]:
    """What the API makes of a file: validated (422), then its names checked (409)."""
    body = apply.parse({"documents": docs_of(text.replace("{sha}", SHA))})
    return apply.declare(body.documents)


# ------------------------------------------------------------------ reading and validating


def test_a_document_records_the_line_of_every_field():
    (doc,) = apply_files.load_text(GOOD.replace("{sha}", SHA), "app.yaml")
    assert doc.line == 2  # the comment before it is not the document
    assert doc.lines["name"] == 2
    assert doc.lines["hyperParameters.maxTokens"] == 9
    assert doc.lines["apiKeys.0"] == 13 and doc.lines["apiKeys.0.name"] == 13


def test_several_documents_in_one_file_keep_their_own_lines():
    text = "name: a\nmodel: {id: cm-1}\ndeviceType: cpu-small\n---\nname: b\nmodel: {id: cm-1}\n"
    a, b = apply_files.load_text(text, "two.yaml")
    assert (a.line, b.line, b.lines["model"]) == (1, 5, 6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: a\n  bad: indent\n", "x.yaml:2: not valid YAML"),
        ("name: a\nname: b\n", "x.yaml:2: name: duplicate key (first on line 1)"),
        ("- just\n- a list\n", "x.yaml:1: a document must be a mapping"),
        ("name: a\ndescription: 2024-01-01\n", "x.yaml:2: description: datetime.date(2024, 1, 1)"),
        ("name: a\ntags:\n  - ok\n  - .nan\n", "x.yaml:4: tags.1: nan is not a JSON value"),
        ("name: a\ntags: !!set {a, b}\n", "x.yaml:2: tags: {"),
    ],
)
def test_files_that_are_not_documents_are_refused_with_file_and_line(text, message):
    with pytest.raises(apply_files.FileError, match=re.escape(message)):
        apply_files.load_text(text, "x.yaml")


def test_a_bad_field_is_named_with_its_file_line_and_range():
    bad = GOOD.replace("temperature: 0.5", "temperature: 5")
    with pytest.raises(ApiError) as exc:
        declared(bad)
    assert exc.value.status == 422 and exc.value.param == "hyperParameters.temperature"
    assert exc.value.message == (
        "deployments/app.yaml:8: hyperParameters.temperature must be between 0 and 2 (got 5)"
    )


def test_every_problem_of_every_document_is_listed_and_an_unknown_field_too():
    text = GOOD + "---\nname: other\nmodel: {catalog: x, id: cm-1}\ndeviceType: cpu-small\n"
    text = text.replace("maxBatchSize: 4", "maxBatchSize: 4\n  maxReplicaz: 3")
    with pytest.raises(ApiError) as exc:
        declared(text)
    msg = exc.value.message
    assert "deployments/app.yaml:12: scalingParameters.maxReplicaz: unknown field (allowed: " in msg
    assert "deployments/app.yaml:17: model: give exactly one of zip, catalog" in msg


def test_a_missing_field_points_at_the_document_and_key_names_used_twice_are_a_conflict():
    with pytest.raises(ApiError, match=r"app.yaml:1: deviceType is required"):
        declared("name: a\nmodel: {id: cm-1}\n")
    keys = GOOD + "  - name: app\n"
    with pytest.raises(ApiError, match=r"app.yaml:14: apiKeys.1.name: 'app' is also at .*:13") as e:
        declared(keys)
    assert e.value.status == 409


def test_documents_without_a_file_are_named_by_their_index():
    doc = {"spec": {"name": "a", "model": {"id": "cm-1"}, "deviceType": "tpu"}}
    with pytest.raises(ApiError, match=r"^documents.0: deviceType must be one of .*cpu-small"):
        apply.parse({"documents": [doc]})


def test_a_model_source_is_exactly_one_of_four_and_the_document_says_so():
    schema = apply.ModelSource.model_json_schema()
    assert [s["required"] for s in schema["oneOf"]] == [
        ["zip", "sha256"],
        ["catalog"],
        ["huggingFace"],
        ["id"],
    ]
    assert "null" not in str(schema["properties"]["catalog"])
    with pytest.raises(ApiError, match="model.zip must be a string"):
        declared("name: a\nmodel: {zip: null, id: cm-1}\ndeviceType: cpu-small\n")
    with pytest.raises(ApiError, match="sha256 goes with a zip source"):
        declared("name: a\nmodel: {zip: a.zip}\ndeviceType: cpu-small\n")
    with pytest.raises(ApiError, match="sha256 goes with a zip source"):
        declared(f"name: a\nmodel: {{id: cm-1, sha256: {SHA}}}\ndeviceType: cpu-small\n")


def test_zip_paths_are_relative_to_their_file_and_hashed(tmp_path: Path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.zip").write_bytes(b"zip bytes")
    folder = tmp_path / "deployments"
    folder.mkdir()
    (folder / "app.yaml").write_text(GOOD.replace("  sha256: {sha}\n", ""))
    (folder / "notes.txt").write_text("not a deployment")
    docs = apply_files.load(folder)
    zips = apply_files.resolve_zips(docs)
    sha = apply_files.sha256_file(tmp_path / "models" / "tiny.zip")
    assert docs[0].spec["model"] == {"zip": "../models/tiny.zip", "sha256": sha}
    assert zips == {sha: (tmp_path / "models" / "tiny.zip").resolve()}
    (tmp_path / "models" / "tiny.zip").unlink()
    with pytest.raises(apply_files.FileError, match=r"app.yaml:4: model.zip: no such file"):
        apply_files.resolve_zips(apply_files.load(folder))


# ------------------------------------------------------------------ the plan


def model(model_id: str = "cm-1", checksum: str = SHA, **kw) -> dict:
    return {"modelId": model_id, "source": "file", "checksum": checksum, "status": "READY"} | kw


def deployment_of(d: apply.Declared, model_id="cm-1", status="DEPLOYED", managed=True) -> dict:
    body = d.spec.deploy_body()
    return {
        "deploymentId": "dp-1",
        "modelId": model_id,
        "name": d.spec.name,
        "status": status,
        "config": body,
        "description": body["description"],
        "tags": body["tags"],
        "timeout": body["timeout"],
        "appliedFrom": d.source if managed else None,
    }


def key(name: str = "app", **limits) -> dict:
    full = {"requestsPerMinute": None, "tokensPerMinute": None, "tokensPerDay": None} | limits
    return {"keyId": "key-1", "name": name, "limits": full}


def actions(changes: list[dict]) -> list[tuple[str, str, str]]:
    return [(c["kind"], c["name"], c["action"]) for c in changes]


def test_a_new_document_creates_its_deployment_and_keys_on_the_model_with_its_zip():
    (d,) = declared()
    changes = apply.plan([d], apply.State([], [model()]), prune=False)
    assert actions(changes) == [("deployment", "tiny-chat", "create"), ("apiKey", "app", "create")]
    assert changes[0]["modelId"] == "cm-1" and changes[0]["source"] == "deployments/app.yaml:2"
    other_zip = apply.plan([d], apply.State([], [model(checksum="b" * 64)]), prune=False)
    assert other_zip[0]["action"] == "upload-and-create"


def test_documents_that_name_one_zip_share_its_one_upload():
    two = declared(GOOD + "---\n" + GOOD.replace("tiny-chat", "tiny-chat-2"))
    changes = apply.plan(two, apply.State([], [model(checksum="b" * 64)]), prune=False)
    assert [c["action"] for c in changes if c["kind"] == "deployment"] == ["upload-and-create"] * 2
    assert apply.uploads_needed(changes, two) == [
        {"source": "deployments/app.yaml:2", "zip": "../models/tiny.zip", "sha256": SHA}
    ]


def test_an_unchanged_document_changes_nothing():
    (d,) = declared()
    state = apply.State([deployment_of(d)], [model()], {"dp-1": [key()]})
    assert [c["action"] for c in apply.plan([d], state, prune=False)] == ["unchanged"] * 2


def test_a_changed_parameter_redeploys_and_says_what_changed():
    (d,) = declared()
    (changed,) = declared(GOOD.replace("maxTokens: 3", "maxTokens: 5"))
    state = apply.State([deployment_of(d)], [model()], {"dp-1": [key()]})
    change = apply.plan([changed], state, prune=False)[0]
    assert change["action"] == "redeploy"
    assert change["details"] == ["hyperParameters.maxTokens: 3 → 5"]


def test_description_tags_and_timeout_alone_update_without_a_redeploy():
    (d,) = declared()
    (changed,) = declared(GOOD + "timeout: 90\ntags: [x]\n")
    state = apply.State([deployment_of(d)], [model()], {"dp-1": [key()]})
    change = apply.plan([changed], state, prune=False)[0]
    assert change["action"] == "update"
    assert change["details"] == ["tags: [] → ['x']", "timeout: 60 → 90"]


def test_a_failed_or_undeployed_deployment_is_deployed_again_and_a_starting_one_waited_for():
    (d,) = declared()
    for status, action in (("FAILED", "deploy"), ("UNDEPLOYED", "deploy"), ("DEPLOYING", "wait")):
        state = apply.State([deployment_of(d, status=status)], [model()], {"dp-1": [key()]})
        assert apply.plan([d], state, prune=False)[0]["action"] == action
    (changed,) = declared(GOOD.replace("maxTokens: 3", "maxTokens: 5"))
    state = apply.State([deployment_of(d, status="DEPLOYING")], [model()], {"dp-1": [key()]})
    with pytest.raises(ApiError, match="is DEPLOYING; apply the change when that ends"):
        apply.plan([changed], state, prune=False)


def test_a_hand_made_deployment_of_that_name_and_model_is_adopted():
    (d,) = declared()
    state = apply.State([deployment_of(d, managed=False)], [model()], {"dp-1": [key()]})
    (change, _) = apply.plan([d], state, prune=False)
    assert change["action"] == "unchanged" and change["adopted"] and change["mark"]
    on_other_model = apply.State([deployment_of(d, "cm-2", managed=False)], [model()])
    assert apply.plan([d], on_other_model, prune=False)[0]["action"] == "create"


def test_a_changed_model_source_means_a_deployment_on_the_new_model_the_old_one_is_pruned():
    """The file's document used to be on cm-old: now it means tiny-chat on cm-1 (created),
    and the plan says cm-old's is not moved: it stays, or --prune undeploys it."""
    (d,) = declared()
    old = deployment_of(d, model_id="cm-old") | {"deploymentId": "dp-old"}
    state = apply.State(
        [old], [model(), model("cm-old", "c" * 64, name="old")], {"dp-old": [key()]}
    )
    change, key_change = apply.plan([d], state, prune=False)
    assert (change["action"], change["modelId"], key_change["action"]) == (
        "create",
        "cm-1",
        "create",
    )
    assert change["details"] == [
        "model: 'tiny-chat' on model cm-old (old), which this file declared before, is not "
        "moved: it stays (--prune undeploys it)"
    ]
    pruned = apply.plan([d], state, prune=True)
    assert actions(pruned) == [
        ("deployment", "tiny-chat", "create"),
        ("apiKey", "app", "create"),
        ("deployment", "tiny-chat", "undeploy"),
    ]
    assert (
        pruned[2]["deploymentId"] == "dp-old"
        and "--prune undeploys it (below)" in (pruned[0]["details"][0])
    )


CHAT = "name: chat\nmodel: {{id: {model}}}\ndeviceType: cpu-small\napiKeys:\n  - name: app\n"


def two_chats(*, managed: bool = True) -> tuple[list[apply.Declared], apply.State]:
    """Two models (cm-a, cm-b) each with a deployment "chat" (dp-a, dp-b) and its key "app",
    and the two documents that declare them, one file each."""
    (a,) = declared(CHAT.format(model="cm-a"))
    (b,) = apply.declare(
        apply.parse({"documents": docs_of(CHAT.format(model="cm-b"), "b.yaml")}).documents
    )
    deps = [
        deployment_of(d, model_id=m, managed=managed) | {"deploymentId": f"dp-{m[-1]}"}
        for d, m in ((a, "cm-a"), (b, "cm-b"))
    ]
    models = [model("cm-a", "a" * 64, name="a"), model("cm-b", "b" * 64, name="b")]
    keys = {"dp-a": [key()], "dp-b": [key() | {"keyId": "key-2"}]}
    return [a, b], apply.State(deps, models, keys)


def test_two_models_deployments_of_one_name_are_two_deployments():
    """A document means its name on its model: changing cm-b's "chat" changes only that
    one, and the plan's lines say which "chat" each change is about."""
    from raydock.cli_apply import _describe

    (a, b), state = two_chats()
    assert [c["action"] for c in apply.plan([a, b], state, prune=True)] == ["unchanged"] * 4
    (b5,) = apply.declare(
        apply.parse(
            {"documents": docs_of(CHAT.format(model="cm-b") + "timeout: 90\n", "b.yaml")}
        ).documents
    )
    changes = apply.plan([a, b5], state, prune=True)
    assert [(c["deploymentId"], c["action"]) for c in changes] == [
        ("dp-a", "unchanged"),
        ("dp-a", "unchanged"),
        ("dp-b", "update"),
        ("dp-b", "unchanged"),
    ]
    assert [_describe(c) for c in changes[2:]] == [
        "b.yaml:1: deployment chat on model cm-b (b): update",
        "b.yaml:1: apiKey app of deployment chat on model cm-b (b): unchanged",
    ]
    # one file alone: the other model's "chat" is another deployment, left alone (or pruned)
    assert actions(apply.plan([b], state, prune=False)) == [
        ("deployment", "chat", "unchanged"),
        ("apiKey", "app", "unchanged"),
    ]
    (gone,) = apply.plan([b], state, prune=True)[2:]
    assert (gone["action"], gone["deploymentId"]) == ("undeploy", "dp-a")
    assert _describe(gone) == "deployments/app.yaml: deployment chat on model cm-a (a): undeploy"


def test_a_document_on_another_model_creates_or_adopts_there_whatever_chat_apply_manages():
    """cm-a's "chat" is managed: a document "chat" on cm-b creates one there (it used to
    be refused as a move of cm-a's), or adopts cm-b's hand-made one, with its own keys."""
    (a, b), state = two_chats()
    only_a = apply.State(state.deployments[:1], state.models, state.keys)
    created = apply.plan([b], only_a, prune=False)
    assert [(c["action"], c["modelId"], c["deploymentId"]) for c in created] == [
        ("create", "cm-b", None),
        ("create", "cm-b", None),
    ]
    assert created[0]["details"] == []  # another file declared cm-a's: nothing moves
    hand_made_b = state.deployments[1] | {"appliedFrom": None}
    by_hand = apply.State([state.deployments[0], hand_made_b], state.models, {"dp-a": [key()]})
    adopted, key_change = apply.plan([b], by_hand, prune=False)
    assert (adopted["action"], adopted["deploymentId"], adopted["adopted"]) == (
        "unchanged",
        "dp-b",
        True,
    )
    assert (key_change["action"], key_change["deploymentId"]) == ("create", "dp-b")


def test_the_same_name_twice_on_one_model_is_refused_naming_both_places():
    """However the two documents name the model (its id, its zip, one catalog entry to
    import), one model's deployment is declared once: a 409 naming both file:line places."""
    twice = "name: a\nmodel: {id: cm-1}\ndeviceType: cpu-small\n---\n" * 2
    with pytest.raises(ApiError) as exc:
        apply.plan(declared(twice), apply.State([], [model()]), prune=False)
    assert (exc.value.status, exc.value.param, exc.value.code) == (409, "name", "duplicate_name")
    assert exc.value.message == (
        "deployments/app.yaml:5: name: 'a' is also declared at deployments/app.yaml:1, on the "
        "same model (model cm-1)"
    )
    by_zip = GOOD + "---\nname: tiny-chat\nmodel: {id: cm-1}\ndeviceType: cpu-small\n"
    with pytest.raises(ApiError, match=r"app.yaml:15: name: 'tiny-chat' is also declared at .*:2"):
        apply.plan(declared(by_zip), apply.State([], [model()]), prune=False)
    with pytest.raises(ApiError, match=r"app.yaml:5: name: 'q' .* same model \(catalog qwen"):
        apply.plan(
            declared(CATALOG_DOC.format(name="q") + "---\n" + CATALOG_DOC.format(name="q")),
            apply.State([], []),
            prune=False,
        )
    other_model = (
        "name: a\nmodel: {id: cm-1}\ndeviceType: cpu-small\n---\nname: a\nmodel: {id: cm-2}\n"
    )
    changes = apply.plan(
        declared(other_model + "deviceType: cpu-small\n"),
        apply.State([], [model(), model("cm-2")]),
        prune=False,
    )
    assert [(c["action"], c["modelId"]) for c in changes] == [
        ("create", "cm-1"),
        ("create", "cm-2"),
    ]


def test_keys_are_created_once_and_their_limits_follow_the_file():
    (d,) = declared(GOOD + "    limits: {requestsPerMinute: 10}\n")
    state = apply.State([deployment_of(d)], [model()], {"dp-1": [key()]})
    change = apply.plan([d], state, prune=False)[1]
    assert change["action"] == "update" and change["limits"] == {"requestsPerMinute": 10}
    state.keys = {"dp-1": [key(requestsPerMinute=10), key("old")]}
    assert [c["action"] for c in apply.plan([d], state, prune=False)] == ["unchanged"] * 2


def test_prune_undeploys_only_what_apply_manages_and_no_file_names():
    (d,) = declared()
    gone = deployment_of(d) | {"deploymentId": "dp-2", "name": "gone"}
    by_hand = deployment_of(d, managed=False) | {"deploymentId": "dp-3", "name": "by-hand"}
    already = gone | {"deploymentId": "dp-4", "name": "old", "status": "UNDEPLOYED"}
    state = apply.State([deployment_of(d), gone, by_hand, already], [model()], {"dp-1": [key()]})
    assert ("deployment", "gone", "undeploy") not in actions(apply.plan([d], state, False))
    pruned = apply.plan([d], state, prune=True)
    assert actions(pruned)[2:] == [("deployment", "gone", "undeploy")]


def test_catalog_and_hugging_face_sources_download_when_not_imported_yet():
    text = "name: q\nmodel: {catalog: qwen2.5-0.5b-instruct}\ndeviceType: cpu-large\n"
    (d,) = declared(text)
    change = apply.plan([d], apply.State([], []), prune=False)[0]
    assert change["action"] == "import-and-create"
    assert change["origin"]["catalogId"] == "qwen2.5-0.5b-instruct"
    imported = model("cm-q", None, source="platform_hosted", metadata={"origin": change["origin"]})
    assert apply.plan([d], apply.State([], [imported]), False)[0]["action"] == "create"
    hf = "name: h\nmodel: {huggingFace: {repoId: org/m, connection: team}}\ndeviceType: cpu-small\n"
    (h,) = declared(hf)
    with pytest.raises(ApiError, match=r"app.yaml:2: model.huggingFace.connection: no connection"):
        apply.plan([h], apply.State([], []), prune=False)
    conn = [{"name": "team", "connectionId": "hfc-1"}]
    change = apply.plan([h], apply.State([], [], connections=conn), prune=False)[0]
    assert change["origin"] == {"repoId": "org/m", "revision": None, "connectionId": "hfc-1"}


CATALOG_DOC = "name: {name}\nmodel: {{catalog: qwen2.5-0.5b-instruct}}\ndeviceType: cpu-large\n"


def test_documents_sharing_a_download_import_it_once_and_keep_their_own_model():
    """Two documents naming one catalog model: downloaded once (the second deployment is
    created once it is READY); applied again, each keeps the model it serves even when the
    repo was imported twice (by hand too)."""
    (a,) = declared(CATALOG_DOC.format(name="a"))
    (b,) = declared(CATALOG_DOC.format(name="b"))
    first = apply.plan([a, b], apply.State([], []), prune=False)
    assert [(c["name"], c["action"]) for c in first] == [("a", "import-and-create"), ("b", "wait")]
    assert first[1]["after"] == "a" and "imported for deployment 'a'" in first[1]["details"][0]

    origin = first[0]["origin"]
    imported = [
        model(m, None, source="platform_hosted", metadata={"origin": origin})
        for m in ("cm-1", "cm-2")
    ]
    deps = [
        deployment_of(a, model_id="cm-1"),
        deployment_of(b, model_id="cm-2") | {"deploymentId": "dp-2"},
    ]
    again = apply.plan([a, b], apply.State(deps, imported), prune=False)
    assert [c["action"] for c in again] == ["unchanged", "unchanged"]


def test_a_new_document_takes_the_newest_ready_copy_of_its_model():
    """The registry lists models newest first; apply took the oldest copy, and an old copy
    still importing (one Ray could not place) refused the whole apply with a 409."""
    hf = "name: h\nmodel: {huggingFace: {repoId: org/m}}\ndeviceType: cpu-small\n"
    (d,) = declared(hf)
    origin = {"origin": {"repoId": "org/m", "revision": None}}
    copies = [  # newest first
        model("cm-new", None, source="hugging_face", metadata=origin),
        model("cm-mid", None, source="hugging_face", metadata=origin),
        model("cm-old", None, source="hugging_face", metadata=origin, status="IMPORTING"),
    ]
    (change,) = apply.plan([d], apply.State([], copies), prune=False)
    assert (change["action"], change["modelId"]) == ("create", "cm-new")
    (change,) = apply.plan([d], apply.State([], copies[2:] + copies[1:2]), prune=False)
    assert (change["action"], change["modelId"]) == ("create", "cm-mid")


def test_a_gated_catalog_entry_needs_a_connection_and_exports_with_it():
    gated = "name: g\nmodel: {catalog: llama-3.2-1b-instruct}\ndeviceType: g5.xlarge\n"
    (d,) = declared(gated)
    with pytest.raises(ApiError, match=r"app.yaml:2: .*gated repository: give model.connection"):
        apply.plan([d], apply.State([], []), prune=False)
    (named,) = declared(gated.replace("instruct}", "instruct, connection: team}"))
    conn = [{"name": "team", "connectionId": "hfc-1"}]
    (change,) = apply.plan([named], apply.State([], [], connections=conn), prune=False)
    assert change["action"] == "import-and-create" and change["origin"]["connectionId"] == "hfc-1"
    imported = model(
        "cm-g",
        None,
        source="platform_hosted",
        metadata={"origin": {**change["origin"], "connection": "team"}},
    )
    assert apply.source_of(imported) == {"catalog": "llama-3.2-1b-instruct", "connection": "team"}
    with pytest.raises(ApiError, match="connection goes with a catalog source"):
        declared("name: z\nmodel: {id: cm-1, connection: team}\ndeviceType: cpu-small\n")


def test_a_hand_made_deployment_is_adopted_on_whichever_copy_of_its_zip_it_serves():
    (d,) = declared()
    for serving in ("cm-1", "cm-2"):  # the same zip imported twice
        by_hand = deployment_of(d, model_id=serving, managed=False)
        state = apply.State([by_hand], [model("cm-1"), model("cm-2")], {"dp-1": [key()]})
        change = apply.plan([d], state, prune=False)[0]
        assert (change["action"], change["modelId"], change["adopted"]) == (
            "unchanged",
            serving,
            True,
        )


def test_a_failed_import_is_retried_by_applying_the_file_again():
    (d,) = declared(CATALOG_DOC.format(name="q"))
    origin = apply.plan([d], apply.State([], []), prune=False)[0]["origin"]
    failed = model(
        "cm-q",
        None,
        source="platform_hosted",
        status="IMPORT_FAILED",
        error="the download broke",
        metadata={"origin": origin},
    )
    waiting = deployment_of(d, model_id="cm-q", status="FAILED")
    (change,) = apply.plan([d], apply.State([waiting], [failed]), prune=False)
    assert change["action"] == "retry-import" and change["modelId"] == "cm-q"
    assert "import failed: the download broke" in change["details"][0]
    (changed,) = declared(CATALOG_DOC.format(name="q") + "description: other\n")
    with pytest.raises(ApiError, match="whose import failed: apply the file unchanged"):
        apply.plan([changed], apply.State([waiting], [failed]), prune=False)


def test_a_model_id_whose_import_failed_is_refused_before_anything_changes():
    text = "name: z\nmodel: {id: cm-9}\ndeviceType: cpu-small\n"
    (d,) = declared(text)
    failed = model("cm-9", status="IMPORT_FAILED", error="not a model archive")
    for deployments in ([], [deployment_of(d, model_id="cm-9", status="FAILED")]):
        with pytest.raises(ApiError, match=r"app.yaml:2: model.id: model cm-9's import failed"):
            apply.plan([d], apply.State(deployments, [failed]), prune=False)
    with pytest.raises(ApiError, match=r"\(not a model archive\).*models/cm-9/retry-import"):
        apply.plan([d], apply.State([], [failed]), prune=False)
    ready = apply.plan([d], apply.State([], [model("cm-9")]), prune=False)
    assert ready[0]["action"] == "create"


def test_an_exported_deployment_applies_back_unchanged():
    (d,) = declared(GOOD + "    limits: {tokensPerDay: 1000}\ndescription: hi\n")
    dep = deployment_of(d)
    keys = [key(tokensPerDay=1000)]
    doc = apply.export(dep, model(), keys)
    assert doc["model"] == {"id": "cm-1"} and doc["apiKeys"] == [
        {"name": "app", "limits": {"tokensPerDay": 1000}}
    ]
    text = apply_files.dump([doc])
    (again,) = apply.declare(apply.parse({"documents": docs_of(text)}).documents)
    state = apply.State([dep], [model()], {"dp-1": keys})
    assert [c["action"] for c in apply.plan([again], state, False)] == ["unchanged"] * 2


def test_the_example_file_in_configs_is_a_valid_document():
    folder = Path(__file__).resolve().parents[2] / "configs" / "deployments"
    docs = apply_files.load(folder)
    assert docs, "configs/deployments/ holds an example"
    for doc in docs:
        if "zip" in doc.spec["model"]:
            doc.spec["model"].setdefault("sha256", SHA)  # what `raydock apply` fills in
    apply.parse({"documents": [d.wire() for d in docs]})
    assert schemas.DeployRequest  # the deploy body is the seed's


def test_the_api_handler_names_file_and_line_from_fastapis_errors():
    body = {"documents": docs_of(GOOD.replace("{sha}", SHA).replace("0.5", "5"))}
    err = {
        "loc": ("body", "documents", 0, "spec", "hyperParameters", "temperature"),
        "type": "less_than_equal",
        "msg": "Input should be less than or equal to 2",
        "input": 5,
    }
    assert apply.describe_errors([err], body) == [
        (
            "hyperParameters.temperature",
            "deployments/app.yaml:8: hyperParameters.temperature must be between 0 and 2 (got 5)",
        )
    ]
    outer = {
        "loc": ("body", "dryRun"),
        "type": "bool_type",
        "msg": "Input should be a valid boolean",
    }
    assert apply.describe_errors([outer], body) == [("dryRun", "dryRun must be true or false")]


def test_json_integers_may_be_written_as_whole_floats_but_not_booleans():
    spec = {"name": "a", "model": {"id": "cm-1"}, "deviceType": "cpu-small"}
    body = apply.parse({"documents": [{"spec": spec, "line": 3.0, "lines": {"name": 3.0}}]})
    assert (body.documents[0].line, body.documents[0].lines) == (3, {"name": 3})
    with pytest.raises(ApiError, match="prune must be true or false"):
        apply.parse({"documents": [], "prune": 0})


def test_created_keys_go_to_the_secrets_file_and_never_to_the_output(tmp_path: Path):
    """`raydock apply --secrets-out` (text or `-o json`): the file gets the secret, only its
    owner reads it (even when it was there before), and the changes printed hold none."""
    from raydock.cli_apply import keep_secrets

    out = tmp_path / "secrets.txt"
    out.write_text("earlier/k: old\n")
    out.chmod(0o644)
    changes = [
        {"kind": "key", "deployment": "chat", "modelId": "cm-1", "name": "app", "apiKey": "rd-1"},
        {"kind": "key", "deployment": "chat", "modelId": "cm-2", "name": "app", "apiKey": "rd-2"},
        {"kind": "deployment", "deployment": "chat", "action": "create"},
    ]
    keep_secrets(changes, out)
    # two models' "chat": each secret says which one it opens
    assert out.read_text().splitlines() == [
        "earlier/k: old",
        "cm-1/chat/app: rd-1",
        "cm-2/chat/app: rd-2",
    ]
    assert out.stat().st_mode & 0o777 == 0o600
    assert "rd-1" not in json.dumps(changes) and "rd-2" not in json.dumps(changes)
    assert changes[0]["apiKeyWrittenTo"] == str(out)


def applied_back(docs: list[dict], state: apply.State) -> list[dict]:
    """`raydock get deployments -o yaml` written to a file, then `raydock diff -f` of it."""
    text = apply_files.dump(docs)
    again = apply.declare(apply.parse({"documents": docs_of(text, "live.yaml")}).documents)
    return apply.plan(again, state, prune=False)


def test_two_models_chats_export_as_files_that_apply_back_unchanged():
    """Made by hand on two models, each "chat" exports as its own document; applying the
    export changes nothing (it adopts both). Two copies of one Hugging Face repo, each with
    a "chat": their source alone would mean one model, so the export names them by id."""
    (a, b), state = two_chats(managed=False)
    keys = [state.keys["dp-a"], state.keys["dp-b"]]
    docs = apply.export_all(state.deployments, state.models, keys)
    assert [(doc["name"], doc["model"]) for doc in docs] == [
        ("chat", {"id": "cm-a"}),
        ("chat", {"id": "cm-b"}),
    ]
    changes = applied_back(docs, state)
    assert [(c["action"], c["deploymentId"]) for c in changes] == [
        ("unchanged", "dp-a"),
        ("unchanged", "dp-a"),
        ("unchanged", "dp-b"),
        ("unchanged", "dp-b"),
    ]
    hub = {"source": "hugging_face", "metadata": {"origin": {"repoId": "org/m"}}}
    state.models = [model("cm-a", None, **hub), model("cm-b", None, **hub)]
    docs = apply.export_all(state.deployments, state.models, keys)
    assert [doc["model"] for doc in docs] == [{"id": "cm-a"}, {"id": "cm-b"}]
    assert {c["action"] for c in applied_back(docs, state)} == {"unchanged"}
    alone = apply.export_all(state.deployments[:1], state.models, keys[:1])
    assert alone[0]["model"] == {"huggingFace": {"repoId": "org/m"}}


def test_the_api_exports_two_models_chats_and_applies_a_change_to_one_only(api):
    """Over HTTP on a real registry: `GET /apply/export` of two models' "chat" applies back
    unchanged (`POST /apply`), and a changed description updates that model's only."""
    from fastapi.testclient import TestClient

    from raydock.client import default_deploy_body
    from raydock.platform.api import app

    reg, admin_key = api
    uid = reg.authenticate_management(admin_key)["userId"]
    deployments = {}
    for name in ("a", "b"):
        m = reg.create_model(name, "file", uid)["modelId"]
        reg.set_model_status(m, "VALIDATING")
        reg.set_model_status(m, "READY", artifact_uri="/x", checksum=name * 64)
        dep = reg.create_deployment(m, default_deploy_body("chat"), uid)["deploymentId"]
        reg.begin_deploy(dep, None, uid, "DEPLOYING")
        reg.set_deployment_status(dep, "DEPLOYED")
        reg.create_deployment_key(dep, "app", uid)
        deployments[m] = dep
        # the admin chatted in the Playground: that key is theirs, no part of the state
        reg.create_deployment_key(dep, "playground (admin)", uid)
    with TestClient(app, headers={"X-api-key": admin_key}) as http:
        docs = http.get("/public/apply/export").json()["documents"]
        assert all(d["apiKeys"] == [{"name": "app"}] for d in docs), docs
        assert sorted(d["model"]["id"] for d in docs if d["name"] == "chat") == sorted(deployments)
        wire = [{"spec": doc, "source": "live.yaml", "line": 1 + i} for i, doc in enumerate(docs)]
        r = http.post("/public/apply", json={"documents": wire, "dryRun": True})
        assert r.status_code == 200, r.text
        assert {c["action"] for c in r.json()["changes"]} == {"unchanged"}

        b = next(m for m in deployments if reg.get_model(m)["name"] == "b")
        (b_doc,) = [w for w in wire if w["spec"]["model"] == {"id": b}]
        b_doc["spec"]["description"] = "the b one"
        r = http.post("/public/apply", json={"documents": wire})
        assert r.status_code == 200, r.text
    changed = [(c["kind"], c["action"], c["model"]) for c in r.json()["changes"]]
    assert [c for c in changed if c[1] != "unchanged"] == [
        ("deployment", "update", f"model {b} (b)")
    ]
    descriptions = {m: reg.get_deployment(d)["description"] for m, d in deployments.items()}
    assert descriptions == {m: "the b one" if m == b else "" for m in deployments}
