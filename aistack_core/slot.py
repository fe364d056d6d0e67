"""The slots: one inference at a time per device, across every capability.

Each device (``AISTACK_DEVICES``: a GPU, or a share of the CPU cores) has
one slot.  A request takes the slot of a free device that can serve it,
preferring the devices the caller lists first (where its model is already
resident).  When every such device is taken it does not queue (unless the
operator set a wait): it gets 503 + ``Retry-After: 5`` at once, which the
contract defines as the universal "momentarily busy" signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Iterable, Sequence

import attrs

from .devices import Device
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


@attrs.define
class DeviceSlot:
    """One device's slot: free, or held by one request."""

    device: Device
    holder: SlotHolder | None = None
    uses: int = 0

    @property
    def is_free(self) -> bool:
        return self.holder is None

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


@attrs.frozen
class SlotLease:
    """What holding a slot gives: the device, and how long the wait was."""

    device: Device
    waited_s: float


class GpuSlot:
    """The pool of device slots.  Only this class decides what "busy" means.

    Taking and giving back a slot happen without awaiting, so on one event
    loop no two requests can take the same device.
    """

    def __init__(self, wait_s: float = 0.0, devices: Sequence[Device] | None = None) -> None:
        self.wait_s = wait_s
        self.devices: tuple[Device, ...] = tuple(devices or (Device("cpu", "cpu"),))
        self.slots: dict[str, DeviceSlot] = {device.name: DeviceSlot(device) for device in self.devices}
        self._released = asyncio.Condition()
        self.busy_rejections = 0

    # --- reading ------------------------------------------------------------------

    def device(self, name: str) -> Device:
        return self.slots[name].device

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(self.slots)

    @property
    def busy_count(self) -> int:
        return sum(1 for slot in self.slots.values() if not slot.is_free)

    @property
    def is_free(self) -> bool:
        """True when no device's slot is held."""
        return self.busy_count == 0

    def can_take(self, devices: Iterable[str] | None = None) -> bool:
        """Whether a request for ``devices`` (all when None) would get a slot now."""
        return any(slot.is_free for slot in self._candidates(devices))

    @property
    def holder(self) -> SlotHolder | None:
        """The longest-running holder (None when every slot is free)."""
        holders = [slot.holder for slot in self.slots.values() if slot.holder is not None]
        return min(holders, key=lambda h: h.since) if holders else None

    def status(self) -> dict:
        """The pool as one slot: busy when a new request would be turned away.

        With one device this is that device's slot; with several, the holder
        shown (when all are busy) is the longest-running one, ``busy_devices``
        says how many are taken and ``devices`` lists each device's slot.
        """
        busy = self.busy_count
        if busy < len(self.slots):
            summary: dict = {"busy": False}
        else:
            oldest = min(self.slots.values(), key=lambda s: s.holder.since)  # type: ignore[union-attr]
            summary = oldest.status()
        if len(self.slots) > 1:
            summary["busy_devices"] = busy
            summary["device_count"] = len(self.slots)
            summary["devices"] = self.device_status()  # what load.device_load counts
        return summary

    def device_status(self) -> list[dict]:
        """One entry per device: its name, kind, core share and slot state."""
        return [
            {"device": slot.device.name, "kind": slot.device.kind, "cpu_threads": slot.device.cpu_threads,
             "inferences": slot.uses, **slot.status()}
            for slot in self.slots.values()
        ]

    # --- taking -------------------------------------------------------------------

    def _candidates(self, devices: Iterable[str] | None) -> list[DeviceSlot]:
        if devices is None:
            return list(self.slots.values())
        return [self.slots[name] for name in dict.fromkeys(devices) if name in self.slots]

    def _pick(self, candidates: list[DeviceSlot], prefer: Sequence[str]) -> DeviceSlot | None:
        free = [slot for slot in candidates if slot.is_free]
        if not free:
            return None
        rank = {name: i for i, name in enumerate(prefer)}
        # Preferred devices in the caller's order, then the pool's order.
        return min(free, key=lambda slot: (rank.get(slot.device.name, len(rank)), self.devices.index(slot.device)))

    def _busy(self, candidates: list[DeviceSlot]) -> Busy:
        self.busy_rejections += 1
        now = time.monotonic()
        held = [(slot.device.name, slot.holder) for slot in candidates if slot.holder is not None]
        if len(self.slots) == 1:
            # Says what holds the slot, not where it runs: the machine may have no GPU at all.
            detail = (f"{held[0][1].describe()} has been running for {now - held[0][1].since:.1f} s"
                      if held else "another inference is running")
            return Busy(
                f"Busy: {detail}, and aistack runs one inference at a time. Retry after {RETRY_AFTER_S} s.",
                retry_after=RETRY_AFTER_S,
            )
        details = "; ".join(
            f"{name}: {holder.describe()}, {now - holder.since:.1f} s" for name, holder in held
        )
        serving = "the one device" if len(candidates) == 1 else f"all {len(candidates)} devices"
        return Busy(
            f"Busy: {serving} that can serve this request {'is' if len(candidates) == 1 else 'are'} busy "
            f"({details}); {self.busy_count} of {len(self.slots)} devices are busy, and aistack runs one "
            f"inference at a time per device. Retry after {RETRY_AFTER_S} s.",
            retry_after=RETRY_AFTER_S,
        )

    @contextlib.asynccontextmanager
    async def acquire_or_busy(
        self,
        capability: str,
        model: str,
        request_id: str,
        *,
        devices: Iterable[str] | None = None,
        prefer: Sequence[str] = (),
    ) -> AsyncIterator[SlotLease]:
        """Hold one device's slot for the body of the ``async with``; yields the lease.

        :param devices: the devices that can serve (all when None).
        :param prefer: devices to take first when free (where the model is resident).

        Raises :class:`Busy` at once when every candidate is taken (or after
        ``wait_s`` when an operator allowed waiting).  Released on every exit
        path, including cancellation of the request's task.
        """
        started = time.monotonic()
        candidates = self._candidates(devices)
        if not candidates:
            raise ValueError("no device can serve this request")  # a wiring mistake, never a client's
        slot = self._pick(candidates, prefer)
        if slot is None and self.wait_s > 0:
            deadline = started + self.wait_s
            async with self._released:
                while slot is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._released.wait(), timeout=remaining)
                    slot = self._pick(candidates, prefer)
        if slot is None:
            raise self._busy(candidates)
        slot.holder = SlotHolder(capability, model, request_id, time.monotonic())
        slot.uses += 1
        try:
            yield SlotLease(slot.device, time.monotonic() - started)
        finally:
            slot.holder = None
            if self.wait_s > 0:
                await self._wake_waiters()

    async def _wake_waiters(self) -> None:
        async with self._released:
            self._released.notify_all()
