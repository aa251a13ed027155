"""Names of the platform's Ray actors and Serve applications (shared by both planes)."""

import re

NAMESPACE = "raydock"
REGISTRY = "raydock-registry"
LIFECYCLE = "raydock-lifecycle"
ACCESS_HUB = "raydock-access-hub"
NOTIFIER = "raydock-notifier"
METER = "raydock-meter"
API_APP = "raydock-api"
GATEWAY_APP = "raydock-gateway"


#: Ray's own resource on the head node: the control plane (actors, API, gateway) runs there,
#: beside the database and the uploads; engine replicas and tasks go anywhere
ON_HEAD = {"node:__internal_head__": 0.001}


def control_plane(metering: bool = True) -> dict[str, tuple[str, str] | None]:
    """The actors a replica calls, as (name, namespace): plain data in its config. Without
    `metering` (a benchmark's baseline), replicas measure nothing (meter None)."""
    return {
        "access_hub": (ACCESS_HUB, NAMESPACE),
        "registry": (REGISTRY, NAMESPACE),
        "meter": (METER, NAMESPACE) if metering else None,
    }


#: a deployment's id is this prefix, a dash and a UUID (db.new_id)
DEPLOYMENT_ID_PREFIX = "dp"
_ENGINE_APP = re.compile(DEPLOYMENT_ID_PREFIX + r"-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


def engine_app(deployment_id: str) -> str:
    """The Serve application that serves one deployment."""
    return deployment_id


def is_engine_app(app: str) -> bool:
    """Whether a Serve application is one of raydock's engine apps (on a cluster raydock
    joins, other applications are someone else's and never touched)."""
    return _ENGINE_APP.fullmatch(app) is not None


#: The engine app's replicas; a prefix-routed app also has HAProxy's route server ("router")
ENGINE_DEPLOYMENT = "engine"


def engine_route(deployment_id: str) -> str:
    """The HTTP route prefix of a deployment's Serve application."""
    return f"/deployments/{deployment_id}"
