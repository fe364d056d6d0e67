"""The one context every inference runs in: slot, disconnect watch, cached model, timings.

Transcriptions, in-process speech, the proxies and realtime sessions all
write the same three lines::

    async with inference(request, "asr", entry) as run:
        result = await run.in_thread(backend.transcribe, run.model, audio, options, run.cancel)

and get the same guarantees: the slot of one device is taken — a free device
that can serve, one already holding the model first — or the request is
turned away with 503 + ``Retry-After`` by :mod:`aistack_core.slot`
(``run.device`` says which device it got); a client that
goes away cancels the work — the worker thread is told through
``run.cancel`` and is waited for, so the slot is never released while a
worker still computes; the model comes from the cache keyed by (device,
capability, model id), loaded onto that device, and stays pinned while in
use; and the request's outcome record
gets the slot wait, model load, inference time and real-time factor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from typing import Any, AsyncIterator, Callable, Iterator, Sequence, TypeVar

import attrs
from aiohttp import web

from .backends import CancelToken, chooses_device, load_on
from .context import model_cache_key, slot_key
from .devices import Device
from .errors import Busy, Cancelled
from .observe.record import RequestInfo, request_info
from .streaming import finish_in_thread, iterate_in_thread

T = TypeVar("T")

# How often the watcher looks at the client's connection.  aiohttp does not
# cancel a handler when its client leaves, and a worker thread cannot notice.
DISCONNECT_POLL_S = 0.05


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class DisconnectWatch:
    """Notices that the client left: sets the cancel token and cancels the handler.

    Cancelling the handler's task stops whatever it awaits — an upstream
    read, a worker thread (through :func:`~aistack_core.streaming.finish_in_thread`,
    which passes the cancel on to the token and waits for the worker), a
    slot wait.  :func:`inference` turns that cancellation into
    :class:`Cancelled` once everything it holds is released.
    """

    def __init__(self, request: web.BaseRequest, token: CancelToken, interval_s: float = DISCONNECT_POLL_S) -> None:
        self._request = request
        self._token = token
        self._interval_s = interval_s
        self._handler = asyncio.current_task()
        self.client_left = False
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while not self._token.cancelled:
            if client_gone(self._request):
                self.client_left = True
                self._token.cancel("client disconnected")
                if self._handler is not None:
                    self._handler.cancel()
                return
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def candidate_devices(slots: Any, backend: Any, devices: Sequence[str] | None = None, load: bool = True) -> list[str]:
    """The devices that may serve: ``devices`` (all when None), cut to the first for a backend
    whose ``load`` cannot choose where it runs."""
    candidates = list(slots.device_names if devices is None else devices)
    if load and not chooses_device(backend):
        candidates = candidates[:1]
    return candidates


@attrs.define
class Inference:
    """What the body of ``async with inference(...)`` works with."""

    request: web.Request
    info: RequestInfo
    entry: Any  # the registry's Registered: backend + plugin
    cancel: CancelToken
    model: Any = None  # the loaded model (None when nothing is loaded, as for proxies)
    device: Device | None = None  # the device whose slot this inference holds (None: no slot)
    audio_seconds: float | None = None  # set by the route: turns inference time into a real-time factor

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run blocking ``function(*args)`` in a worker thread, cancellable through ``self.cancel``."""
        return await finish_in_thread(function, *args, cancel=self.cancel)

    def iterate(self, make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Advance a blocking iterator in worker threads, one item at a time; closed on early stop."""
        return iterate_in_thread(make_iterator, self.cancel)


@contextlib.asynccontextmanager
async def inference(
    request: web.Request,
    capability: str,
    entry: Any,
    *,
    model_id: str | None = None,
    provider: str | None = None,
    load: bool = True,
    hold_slot: bool = True,
    watch_disconnect: bool = True,
    on_slot: Callable[[Device | None], Any] | None = None,
    devices: Sequence[str] | None = None,
) -> AsyncIterator[Inference]:
    """Hold everything one inference needs for the body of the ``async with``.

    :param entry: the registry entry that serves the request (its ``card``
        names the model unless ``model_id`` is given).
    :param model_id: the registered model id for metrics, when it is not the
        entry's card (an upstream's listed model); None when unknown.
    :param load: load (or reuse) the entry's model from the cache; False for
        proxies, which only need the slot.
    :param hold_slot: False for work that does not use this machine's GPU
        (a remote upstream).
    :param watch_disconnect: False for WebSocket sessions, which notice a
        vanished peer through their own heartbeat.
    :param on_slot: called with the device (and awaited, if it is a
        coroutine function) once the slot is ours, before any work: the LLM
        proxy frees speech models on that device there, since a request
        turned away as busy must not evict what the slot holder may need next.
    :param devices: the devices that may serve (an upstream's); every device
        when None.  A backend whose ``load`` cannot choose its device is
        used on the first device only.

    Raises :class:`~aistack_core.errors.Busy` when the slot is taken and
    :class:`~aistack_core.errors.Cancelled` when the client went away.
    """
    info = request_info(request)
    card = getattr(entry, "card", None) if model_id is None else None
    info.capability = capability
    info.model = model_id if model_id is not None else (card.id if card is not None else None)
    info.provider = provider or (card.provider if card is not None else None)
    token = CancelToken()
    run = Inference(request, info, entry, token)
    watch = DisconnectWatch(request, token) if watch_disconnect else None
    try:
        async with contextlib.AsyncExitStack() as held:
            slots = request.app[slot_key]
            cache = request.app[model_cache_key]
            candidates = candidate_devices(slots, entry.backend, devices, load)
            prefer = cache.placement((capability, card.id), candidates) if load else ()
            if hold_slot and candidates:
                lease = await held.enter_async_context(
                    slots.acquire_or_busy(
                        capability, info.model or "?", info.request_id, devices=candidates, prefer=prefer
                    )
                )
                info.slot_wait_s = lease.waited_s
                run.device = lease.device
                info.device = lease.device.name
            elif load:
                run.device = slots.device((prefer or candidates or slots.device_names)[0])
            if on_slot is not None:
                started = on_slot(run.device)
                if inspect.isawaitable(started):
                    await started
            if load:
                assert run.device is not None
                loading_started = time.monotonic()
                loader = functools.partial(load_on, entry.backend, run.device)
                run.model = await held.enter_async_context(
                    cache.use((capability, card.id), capability, loader, device=run.device.name)
                )
                info.model_load_s = time.monotonic() - loading_started
            started = time.monotonic()
            try:
                yield run
            finally:
                info.inference_s = time.monotonic() - started
                if run.audio_seconds:
                    info.audio_sec = round(run.audio_seconds, 3)
                    info.rtf = info.inference_s / run.audio_seconds
    except Busy:
        info.slot_busy = True  # the slot's own decision: counted as 503-busy, not a failure
        raise
    except asyncio.CancelledError:
        if watch is None or not watch.client_left:
            raise  # a real cancellation (shutdown): not ours to swallow
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        info.client_disconnected = True
        raise Cancelled("The client disconnected; the work was stopped.") from None
    except Cancelled:
        info.client_disconnected = True
        raise
    except BaseException:
        token.cancel("request aborted")  # any worker still running stops at its next check
        raise
    finally:
        if watch is not None:
            await watch.stop()
