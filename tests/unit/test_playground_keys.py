"""The dashboard playground's keys (platform/api_web.py), on a real registry without Ray."""

from __future__ import annotations

import asyncio

from raydock.client import default_deploy_body
from raydock.platform import api_web
from raydock.platform.security import display_prefix


async def renewed(dep_id: str, user: dict) -> tuple[str, bool]:
    """A new playground key, as after a replica refused the one held now."""
    held = api_web._playground_keys.get((dep_id, user["userId"]))
    return await api_web._playground_key(dep_id, user, refused=held)


def test_two_users_of_one_name_keep_their_own_playground_keys(api):
    """User names need not be unique: a user's new playground key replaces their own old
    one, never the key of another user who has the same name."""
    reg, admin_key = api
    admin = reg.authenticate_management(admin_key)
    twin = reg.authenticate_management(
        reg.create_user("admin", None, False, admin["userId"])["apiKey"]
    )
    model = reg.create_model("m", "file", admin["userId"])
    reg.set_model_status(model["modelId"], "VALIDATING")
    reg.set_model_status(model["modelId"], "READY", artifact_uri="/x", checksum="c")
    dep = reg.create_deployment(model["modelId"], default_deploy_body("d"), admin["userId"])
    dep_id = dep["deploymentId"]

    async def keys_of_both() -> None:
        for user in (admin, twin, admin, twin):  # each new key replaces its user's old one
            await renewed(dep_id, user)

    asyncio.run(keys_of_both())
    keys = reg.list_deployment_keys(dep_id)
    assert sorted(k["createdById"] for k in keys) == sorted([admin["userId"], twin["userId"]])
    # a deployment's key names are unique: the second "admin" gets a name with its id
    names = {k["createdById"]: k["name"] for k in keys}
    assert names == {
        admin["userId"]: "playground (admin)",
        twin["userId"]: f"playground (admin, {twin['userId']})",
    }


def test_users_of_one_long_name_each_get_a_playground_key_within_the_name_limit(api):
    """A user name may hold 200 characters; "playground (<name>)" would pass a key name's 200,
    and the registry's cut made both of a user's possible names one: the second user of a
    long name got no playground key at all."""
    reg, admin_key = api
    admin = reg.authenticate_management(admin_key)
    long_name = "n" * 200
    users = [
        reg.authenticate_management(
            reg.create_user(long_name, None, False, admin["userId"])["apiKey"]
        )
        for _ in range(2)
    ]
    model = reg.create_model("m", "file", admin["userId"])
    reg.set_model_status(model["modelId"], "VALIDATING")
    reg.set_model_status(model["modelId"], "READY", artifact_uri="/x", checksum="c")
    dep_id = reg.create_deployment(model["modelId"], default_deploy_body("d"), admin["userId"])[
        "deploymentId"
    ]

    async def keys_of_both() -> list[str]:
        return [(await renewed(dep_id, u))[0] for u in users * 2]

    secrets = asyncio.run(keys_of_both())
    keys = reg.list_deployment_keys(dep_id)
    # each user holds one key, the latest made for them, and every name fits
    assert sorted(k["createdById"] for k in keys) == sorted(u["userId"] for u in users)
    assert all(len(k["name"]) <= 200 and k["name"].startswith("playground (nnn") for k in keys)
    assert users[1]["userId"] in next(
        k["name"] for k in keys if k["createdById"] == users[1]["userId"]
    )
    # the keys kept are the ones the playground holds now (a key's prefix is its secret's)
    assert sorted(k["prefix"] for k in keys) == sorted(display_prefix(s) for s in secrets[2:])


def test_messages_refused_at_once_renew_the_key_once(api):
    """Two messages in flight when the key was deleted in the API keys tab: each made a new
    key, the second deleting the first's, whose message then failed with a 401."""
    reg, admin_key = api
    admin = reg.authenticate_management(admin_key)
    model = reg.create_model("m", "file", admin["userId"])
    reg.set_model_status(model["modelId"], "VALIDATING")
    reg.set_model_status(model["modelId"], "READY", artifact_uri="/x", checksum="c")
    dep_id = reg.create_deployment(model["modelId"], default_deploy_body("d"), admin["userId"])[
        "deploymentId"
    ]

    async def scenario() -> tuple[str, list[tuple[str, bool]]]:
        old, _ = await api_web._playground_key(dep_id, admin)
        both = [api_web._playground_key(dep_id, admin, refused=old) for _ in range(2)]
        return old, await asyncio.gather(*both)

    old, (first, second) = asyncio.run(scenario())
    assert first == second and first[0] != old and first[1]  # one new key, both use it
    [kept] = reg.list_deployment_keys(dep_id)
    assert kept["prefix"] == display_prefix(first[0])
