"""Names of the platform's Ray actors and Serve applications."""

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


def engine_app(deployment_id: str) -> str:
    """The Serve application that serves one deployment."""
    return deployment_id


#: The engine app's replicas; a prefix-routed app also has HAProxy's route server ("router")
ENGINE_DEPLOYMENT = "engine"


def engine_route(deployment_id: str) -> str:
    """The HTTP route prefix of a deployment's Serve application."""
    return f"/deployments/{deployment_id}"
