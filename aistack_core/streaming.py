"""Helpers for long-running requests: noticing the client left, and pulling a
blocking iterator from worker threads without stalling the event loop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable, Iterator, TypeVar

from aiohttp import web

from .backends import CancelToken
from .observe import request_info

T = TypeVar("T")

DISCONNECT_POLL_S = 0.05
_DONE = object()


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: web.Request) -> AsyncIterator[CancelToken]:
    """Yield a cancel token that is set as soon as the client's connection closes.

    aiohttp does not cancel a handler when its client leaves, and a worker
    thread cannot notice by itself, so a small task polls the transport.
    """
    token = CancelToken()

    async def watch() -> None:
        while not token.cancelled:
            if client_gone(request):
                request_info(request).client_disconnected = True
                token.cancel("client disconnected")
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        yield token
    except BaseException:
        # Aborted (an error, or aiohttp cancelling the handler): stop the worker too.
        token.cancel("request aborted")
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def finish_in_thread(function: Callable[..., T], *args, cancel: CancelToken) -> T:
    """Run ``function`` in a worker thread; if this task is cancelled, tell the
    worker through ``cancel`` and wait for it to stop before re-raising, so the
    GPU slot is never released while the worker still computes."""
    future = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.cancel("request aborted")
        await asyncio.wait([future])
        raise


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]], cancel: CancelToken) -> AsyncIterator[T]:
    """Create and advance a blocking iterator in worker threads, one item at a time.

    When the consumer stops early (client gone, error), the iterator is
    closed so a generator's ``finally`` releases what the worker held.
    """
    iterator = await finish_in_thread(lambda: iter(make_iterator()), cancel=cancel)
    try:
        while True:
            item = await finish_in_thread(next, iterator, _DONE, cancel=cancel)
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
