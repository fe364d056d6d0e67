"""Thread <-> event-loop helpers: run blocking work in a worker thread, and pull a
blocking iterator one item at a time, without stalling the event loop."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Iterator, TypeVar

from .backends import CancelToken

T = TypeVar("T")

_DONE = object()


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
        if not future.cancelled():
            future.exception()  # the worker's own Cancelled: retrieved, so asyncio does not warn
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
