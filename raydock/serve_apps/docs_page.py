"""The offline Swagger UI page (/docs) that shows the combined OpenAPI document."""

from pathlib import Path

from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

ASSETS_DIR = Path(__file__).parent.parent / "web" / "swagger-ui"  # swagger-ui-dist; see its README
ASSETS_URL = "/docs/assets"


def swagger_ui(openapi_url: str, title: str) -> HTMLResponse:
    """Swagger UI loaded from raydock's own copy of its assets: /docs works offline."""
    return get_swagger_ui_html(
        openapi_url=openapi_url,
        title=title,
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # no validator badge from swagger.io
    )
