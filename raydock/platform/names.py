"""Names of the platform's Ray actors and Serve applications."""

NAMESPACE = "raydock"
REGISTRY = "raydock-registry"
LIFECYCLE = "raydock-lifecycle"
API_APP = "raydock-api"
GATEWAY_APP = "raydock-gateway"


def engine_app(deployment_id: str) -> str:
    """The Serve application that serves one deployment."""
    return deployment_id


def engine_route(deployment_id: str) -> str:
    """The HTTP route prefix of a deployment's Serve application."""
    return f"/deployments/{deployment_id}"
