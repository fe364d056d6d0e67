"""Load-once, keep-alive model cache: the contract's "hot-swap".

Models load on first use (once per device, even when requests race), stay
for ``keep_alive_s`` after their last use, can be evicted by category and
device (the LLM proxy frees ASR memory before its engine loads), and idle
models are evicted before a load when the device's free memory is short:
system RAM for CPU devices (shared by all of them), the GPU's own memory
for a GPU (as a plugin's ``device_free_memory_mb`` hook reports it).  When
dropping our own idle models is not enough, ``release_elsewhere`` asks the
other engines on that device (an upstream's ``release_memory``) to let go.

Entries are keyed by (device, capability, model id); the methods take the
(capability, model id) key and a device name, which defaults to the first
device of the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Hashable, Sequence

import attrs

from .devices import shares_system_memory

log = logging.getLogger("aistack.model_cache")


# (capability, model id): ids are unique only within a capability.
ModelKey = tuple[str, str]
# Where an entry lives: (device name, model key).
PlacedKey = tuple[str, Hashable]


@attrs.define
class CachedModel:
    key: ModelKey
    category: str
    model: Any
    loaded_at: float
    last_used: float
    load_seconds: float
    in_use: int = 0
    # Growth of the process's resident memory while loading: approximate (a
    # load racing another one counts both), None when it cannot be read.
    memory_mb: float | None = None
    # Loaded on purpose (AISTACK_PRELOAD, the admin API): kept past the
    # keep-alive until unloaded; memory pressure and category eviction still apply.
    pinned: bool = False
    device: str = "cpu"


class ModelInUse(RuntimeError):
    """An unload was asked for a model a request is using right now."""


def free_memory_mb() -> float | None:
    """Free system RAM in MB (None when it cannot be read)."""
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None
    return psutil.virtual_memory().available / (1024 * 1024)


def process_rss_mb() -> float | None:
    """This process's resident memory in MB (None when it cannot be read)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def _load_measured(loader: Callable[[], Any]) -> tuple[Any, float | None]:
    """Worker-thread body of a load: the model and how much resident memory it added."""
    before = process_rss_mb()
    model = loader()
    after = process_rss_mb()
    growth = None if before is None or after is None else max(0.0, after - before)
    return model, growth


def release_accelerator_memory() -> None:
    """Return freed memory to the system: gc, and torch's CUDA cache if torch is loaded."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort
            log.debug("torch.cuda.empty_cache failed", exc_info=True)


class ModelCache:
    def __init__(
        self,
        keep_alive_s: float = 300.0,
        min_free_mb: float = 512,
        free_memory: Callable[[], float | None] = free_memory_mb,
        *,
        default_device: str = "cpu",
        device_free_memory: Callable[[str], float | None] | None = None,
        min_free_device_mb: float = 1024,
    ) -> None:
        """
        :param free_memory: free system RAM in MB (CPU devices).
        :param device_free_memory: free memory of a GPU by device name, None when unknown.
        :param min_free_device_mb: the GPU counterpart of ``min_free_mb``.
        """
        self.keep_alive_s = keep_alive_s
        self.min_free_mb = min_free_mb
        self.min_free_device_mb = min_free_device_mb
        self.default_device = default_device
        self._free_memory = free_memory
        self._device_free_memory = device_free_memory
        self._models: dict[PlacedKey, CachedModel] = {}
        self._loading: dict[PlacedKey, asyncio.Lock] = {}
        # Set by the app: asks the other engines on a device to free memory there.
        self.release_elsewhere: Callable[[str], Awaitable[Any]] | None = None
        self.loads = 0
        self.evictions = 0

    def loaded(self) -> list[dict]:
        now = time.monotonic()
        return [
            {
                "key": f"{m.key[0]}:{m.key[1]}",
                "device": m.device,
                "capability": m.key[0],
                "model": m.key[1],
                "category": m.category,
                "in_use": m.in_use,
                "idle_s": round(now - m.last_used, 1),
                "load_s": round(m.load_seconds, 3),
            }
            for m in self._models.values()
        ]

    def loaded_entries(self) -> list[CachedModel]:
        """Every resident model, for reading."""
        return list(self._models.values())

    def _device(self, device: str | None) -> str:
        return self.default_device if device is None else device

    def entry(self, key: ModelKey, device: str | None = None) -> CachedModel | None:
        """The resident model under ``key`` (on ``device``, or the first device holding it), for reading."""
        if device is not None:
            return self._models.get((device, key))
        return next(iter(self.entries(key)), None)

    def entries(self, key: ModelKey) -> list[CachedModel]:
        """Every resident copy of ``key``, one per device holding it."""
        # list() copies in one step: admin listings read this from a worker thread.
        return [m for (_, held), m in list(self._models.items()) if held == key]

    def resident_devices(self, key: ModelKey) -> list[str]:
        return [m.device for m in self.entries(key)]

    def placement(self, key: ModelKey, devices: Sequence[str]) -> list[str]:
        """``devices`` in the order a request for ``key`` should try them.

        Devices already holding the model first (no load), then those with
        the fewest resident models (so different models spread out), each
        group in the given order.
        """
        resident = set(self.resident_devices(key))
        counts = {name: 0 for name in devices}
        for device, _ in self._models:
            if device in counts:
                counts[device] += 1
        order = {name: i for i, name in enumerate(devices)}
        return sorted(devices, key=lambda name: (name not in resident, counts[name], order[name]))

    async def load(
        self, key: ModelKey, category: str, loader: Callable[[], Any], device: str | None = None
    ) -> tuple[CachedModel, bool]:
        """Load ``key`` now on ``device`` (if it is not resident there) and pin it.

        Returns (entry, whether it was loaded here).
        """
        loads_before = self.loads
        entry = await self._get(key, category, loader, self._device(device))
        entry.pinned = True
        return entry, self.loads > loads_before

    async def unload(self, key: ModelKey, device: str | None = None) -> bool:
        """Drop ``key`` now (from ``device``, or from every device when None) and give its memory back.

        False when it was not resident.  Raises :class:`ModelInUse` while a
        request holds it, dropping nothing.
        """
        placed = [(d, k) for (d, k) in self._models if k == key and (device is None or d == device)]
        if not placed:
            return False
        if any(self._models[p].in_use for p in placed):
            raise ModelInUse(key)
        for p in placed:
            entry = self._models.pop(p)
            self.evictions += 1
            entry.model = None  # the cache's reference is the one that keeps the weights alive
            log.info("unloaded model %s on %s (asked for)", _name(key), p[0])
        await asyncio.to_thread(release_accelerator_memory)
        return True

    def __contains__(self, key: ModelKey) -> bool:
        return any(held == key for _, held in self._models)

    @contextlib.asynccontextmanager
    async def use(
        self, key: ModelKey, category: str, loader: Callable[[], Any], device: str | None = None
    ) -> AsyncIterator[Any]:
        """Yield the loaded model for ``key`` on ``device``, loading it in a thread if needed.

        While inside the ``async with`` the model is pinned: eviction skips it.
        """
        entry = await self._get(key, category, loader, self._device(device))
        entry.in_use += 1
        try:
            yield entry.model
        finally:
            entry.in_use -= 1
            entry.last_used = time.monotonic()

    async def _get(self, key: ModelKey, category: str, loader: Callable[[], Any], device: str) -> CachedModel:
        placed = (device, key)
        entry = self._models.get(placed)
        if entry is not None:
            entry.last_used = time.monotonic()
            return entry
        lock = self._loading.setdefault(placed, asyncio.Lock())
        async with lock:
            entry = self._models.get(placed)
            if entry is not None:
                return entry
            await self.make_room(device)
            started = time.monotonic()
            model, memory_mb = await asyncio.to_thread(_load_measured, loader)
            now = time.monotonic()
            entry = CachedModel(key, category, model, now, now, now - started, memory_mb=memory_mb, device=device)
            self._models[placed] = entry
            self.loads += 1
            log.info("loaded model %s on %s in %.2f s", _name(key), device, now - started)
            return entry

    def _drop(self, placed: list[PlacedKey], why: str) -> list[ModelKey]:
        dropped = []
        for device, key in placed:
            if self._models.pop((device, key), None) is not None:
                self.evictions += 1
                dropped.append(key)
                log.info("evicted model %s on %s (%s)", _name(key), device, why)
        if dropped:
            release_accelerator_memory()
        return dropped

    def evict(self, category: str | None = None, device: str | None = None) -> list[ModelKey]:
        """Drop every idle model of ``category`` (all when None) on ``device`` (every device when None)."""
        placed = [
            p for p, m in self._models.items()
            if m.in_use == 0 and (category is None or m.category == category) and (device is None or p[0] == device)
        ]
        return self._drop(placed, f"evict({category or 'all'}{'' if device is None else ' on ' + device})")

    def evict_expired(self) -> list[ModelKey]:
        cutoff = time.monotonic() - self.keep_alive_s
        placed = [p for p, m in self._models.items() if m.in_use == 0 and not m.pinned and m.last_used <= cutoff]
        return self._drop(placed, "keep-alive expired")

    # --- memory pressure ------------------------------------------------------------

    def free_mb(self, device: str | None = None) -> float | None:
        """Free memory where ``device``'s models live: RAM for CPU devices, the GPU's own otherwise.

        None when it cannot be told.  May block (a GPU library call): the
        cache itself asks from a worker thread.
        """
        device = self._device(device)
        if shares_system_memory(device):
            return self._free_memory()
        return None if self._device_free_memory is None else self._device_free_memory(device)

    def _threshold(self, device: str) -> float:
        return self.min_free_mb if shares_system_memory(device) else self.min_free_device_mb

    def _drop_oldest_idle(self, device: str, free: float) -> list[ModelKey]:
        """Drop the least recently used idle model sharing ``device``'s memory; [] when there is none.

        CPU devices share the system RAM, so any CPU device's idle models may
        go (this device's first); on a GPU only that GPU's.
        """
        ram = shares_system_memory(device)
        idle = [
            (p, m) for p, m in self._models.items()
            if m.in_use == 0 and (p[0] == device or (ram and shares_system_memory(p[0])))
        ]
        if not idle:
            return []
        oldest = min(idle, key=lambda pm: (pm[0][0] != device, pm[1].last_used))
        return self._drop([oldest[0]], f"free memory {free:.0f} MB < {self._threshold(device):.0f} MB")

    async def make_room(self, device: str | None = None) -> None:
        """Before a load on ``device``: drop our idle models there while memory is short, then ask the
        other engines on that device (``release_elsewhere``) if it still is."""
        device = self._device(device)
        threshold = self._threshold(device)
        free = await asyncio.to_thread(self.free_mb, device)
        while free is not None and free < threshold and self._drop_oldest_idle(device, free):
            free = await asyncio.to_thread(self.free_mb, device)  # the library call may block
        if free is None or free >= threshold or self.release_elsewhere is None:
            return
        try:
            await self.release_elsewhere(device)
        except Exception:  # noqa: BLE001 - the load goes ahead; it may still fit
            log.warning("asking other engines to free memory on %s failed", device, exc_info=True)

    async def run_sweeper(self, interval_s: float | None = None) -> None:
        """Background task: drop models idle past keep-alive."""
        interval = interval_s or max(0.5, min(30.0, self.keep_alive_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.evict_expired()


def _name(key: Hashable) -> str:
    return ":".join(key) if isinstance(key, tuple) else str(key)
