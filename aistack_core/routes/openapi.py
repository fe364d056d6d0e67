"""``GET /openapi.json``: an OpenAPI 3.0 description of the gateway's own routes.

The document is hand-written (``openapi.json`` next to this file) so that it
says what the contract promises rather than what a generator can guess; a
test keeps it true (every route in the app's router is documented and every
documented operation is routed) and a schemathesis pass fuzzes each
operation from it.  The routes of the text-to-speech upstream behind
``/v1/audio/{tail}`` are listed as that upstream serves them.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from aiohttp import web

from .. import __version__

DOCUMENT = "openapi.json"


@functools.cache
def document() -> dict:
    """The parsed document, with the running version filled in (read once)."""
    text = resources.files(__package__).joinpath(DOCUMENT).read_text(encoding="utf-8")
    parsed = json.loads(text)
    parsed["info"]["version"] = __version__
    return parsed


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


def setup(app: web.Application) -> None:
    app.router.add_get("/openapi.json", get_openapi)
