"""Every path no other route serves: the 404 (or 405) envelope, after the key check.

aiohttp answers an unmatched path through a built-in route whose
``Expect: 100-continue`` handler invites the body before any middleware
runs, so a client could be asked to upload 500 MB only to be told 404 (or
401).  Matching every remaining path here lets the routes' own
``defer_continue`` decide, and the answer stays the middlewares' (key,
envelope, CORS).
"""

from __future__ import annotations

from aiohttp import web

from ..forms import defer_continue

FALLBACK_PATH = "/{unmatched:.*}"


async def unmatched(request: web.Request) -> web.StreamResponse:
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def setup(app: web.Application) -> None:
    # Registered after every other family by the app factory.
    app.router.add_route("*", FALLBACK_PATH, unmatched, expect_handler=defer_continue)
