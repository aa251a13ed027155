"""Names of the platform's Ray actors and Serve applications."""

NAMESPACE = "raydock"
REGISTRY = "raydock-registry"
LIFECYCLE = "raydock-lifecycle"
API_APP = "raydock-api"
GATEWAY_APP = "raydock-gateway"


def engine_app(deployment_id: str) -> str:
    """The Serve application that serves one deployment."""
    return deployment_id
