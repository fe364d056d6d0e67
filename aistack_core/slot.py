"""The one GPU slot: at most one inference at a time, across every capability.

A second request does not queue (unless the operator set a wait): it gets
503 + ``Retry-After: 5`` at once, which the contract defines as the
universal "momentarily busy" signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

import attrs

from .errors import Busy

RETRY_AFTER_S = 5


@attrs.frozen
class SlotHolder:
    capability: str
    model: str
    request_id: str
    since: float  # time.monotonic()

    def describe(self) -> str:
        return f"{self.capability} request {self.request_id} on model {self.model!r}"


class GpuSlot:
    """Acquire-or-busy lock.  Only this class decides what "busy" means."""

    def __init__(self, wait_s: float = 0.0) -> None:
        self.wait_s = wait_s
        self._lock = asyncio.Lock()
        self.holder: SlotHolder | None = None
        self.busy_rejections = 0

    @property
    def is_free(self) -> bool:
        return not self._lock.locked()

    def status(self) -> dict:
        if self.holder is None:
            return {"busy": False}
        return {
            "busy": True,
            "capability": self.holder.capability,
            "model": self.holder.model,
            "request_id": self.holder.request_id,
            "held_s": round(time.monotonic() - self.holder.since, 3),
        }

    def _busy(self) -> Busy:
        self.busy_rejections += 1
        holder = self.holder
        if holder is None:  # released between the check and here; still report busy honestly
            detail = "another inference is running"
        else:
            detail = f"{holder.describe()} has been running for {time.monotonic() - holder.since:.1f} s"
        # Says what holds the slot, not where it runs: the machine may have no GPU at all.
        return Busy(
            f"Busy: {detail}, and aistack runs one inference at a time. Retry after {RETRY_AFTER_S} s.",
            retry_after=RETRY_AFTER_S,
        )

    @contextlib.asynccontextmanager
    async def acquire_or_busy(self, capability: str, model: str, request_id: str) -> AsyncIterator[float]:
        """Hold the slot for the body of the ``async with``; yields seconds waited.

        Raises :class:`Busy` at once when taken (or after ``wait_s`` when an
        operator allowed waiting).  Released on every exit path, including
        cancellation of the request's task.
        """
        started = time.monotonic()
        if self._lock.locked() and self.wait_s <= 0:
            raise self._busy()
        if self.wait_s > 0:
            try:
                await asyncio.wait_for(self._lock.acquire(), timeout=self.wait_s)
            except asyncio.TimeoutError:
                raise self._busy() from None
        else:
            await self._lock.acquire()
        waited = time.monotonic() - started
        self.holder = SlotHolder(capability, model, request_id, time.monotonic())
        try:
            yield waited
        finally:
            self.holder = None
            self._lock.release()
