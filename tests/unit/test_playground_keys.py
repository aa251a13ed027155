"""The dashboard playground's keys (platform/api_web.py), on a real registry without Ray."""

from __future__ import annotations

import asyncio

from raydock.client import default_deploy_body
from raydock.platform import api_web


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
            await api_web._playground_key(dep_id, user, fresh=True)

    asyncio.run(keys_of_both())
    keys = reg.list_deployment_keys(dep_id)
    assert sorted(k["createdById"] for k in keys) == sorted([admin["userId"], twin["userId"]])
    # a deployment's key names are unique: the second "admin" gets a name with its id
    names = {k["createdById"]: k["name"] for k in keys}
    assert names == {
        admin["userId"]: "playground (admin)",
        twin["userId"]: f"playground (admin, {twin['userId']})",
    }
