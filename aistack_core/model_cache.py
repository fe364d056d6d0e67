"""Load-once, keep-alive model cache: the contract's "hot-swap".

Models load on first use (once, even when requests race), stay for
``keep_alive_s`` after their last use, can be evicted by category (the LLM
proxy frees ASR memory before Ollama loads), and idle models are evicted
before a load when free memory is short.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from typing import Any, AsyncIterator, Callable

import attrs

log = logging.getLogger("aistack.model_cache")


# (capability, model id): ids are unique only within a capability.
ModelKey = tuple[str, str]


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
    ) -> None:
        self.keep_alive_s = keep_alive_s
        self.min_free_mb = min_free_mb
        self._free_memory = free_memory
        self._models: dict[ModelKey, CachedModel] = {}
        self._loading: dict[ModelKey, asyncio.Lock] = {}
        self.loads = 0
        self.evictions = 0

    def loaded(self) -> list[dict]:
        now = time.monotonic()
        return [
            {
                "key": f"{m.key[0]}:{m.key[1]}",
                "capability": m.key[0],
                "model": m.key[1],
                "category": m.category,
                "in_use": m.in_use,
                "idle_s": round(now - m.last_used, 1),
                "load_s": round(m.load_seconds, 3),
            }
            for m in self._models.values()
        ]

    def entry(self, key: ModelKey) -> CachedModel | None:
        """The resident model under ``key``, for reading (None when not loaded)."""
        return self._models.get(key)

    async def load(self, key: ModelKey, category: str, loader: Callable[[], Any]) -> tuple[CachedModel, bool]:
        """Load ``key`` now (if it is not resident) and pin it; returns (entry, whether it was loaded here)."""
        loads_before = self.loads
        entry = await self._get(key, category, loader)
        entry.pinned = True
        return entry, self.loads > loads_before

    async def unload(self, key: ModelKey) -> bool:
        """Drop ``key`` now and give its memory back; False when it was not resident.

        Raises :class:`ModelInUse` while a request holds it.
        """
        entry = self._models.get(key)
        if entry is None:
            return False
        if entry.in_use:
            raise ModelInUse(key)
        del self._models[key]
        self.evictions += 1
        entry.model = None  # the cache's reference is the one that keeps the weights alive
        log.info("unloaded model %s:%s (asked for)", key[0], key[1])
        await asyncio.to_thread(release_accelerator_memory)
        return True

    def __contains__(self, key: ModelKey) -> bool:
        return key in self._models

    @contextlib.asynccontextmanager
    async def use(self, key: ModelKey, category: str, loader: Callable[[], Any]) -> AsyncIterator[Any]:
        """Yield the loaded model for ``key``, loading it in a thread if needed.

        While inside the ``async with`` the model is pinned: eviction skips it.
        """
        entry = await self._get(key, category, loader)
        entry.in_use += 1
        try:
            yield entry.model
        finally:
            entry.in_use -= 1
            entry.last_used = time.monotonic()

    async def _get(self, key: ModelKey, category: str, loader: Callable[[], Any]) -> CachedModel:
        entry = self._models.get(key)
        if entry is not None:
            entry.last_used = time.monotonic()
            return entry
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._models.get(key)
            if entry is not None:
                return entry
            self.evict_for_memory()
            started = time.monotonic()
            model, memory_mb = await asyncio.to_thread(_load_measured, loader)
            now = time.monotonic()
            entry = CachedModel(key, category, model, now, now, now - started, memory_mb=memory_mb)
            self._models[key] = entry
            self.loads += 1
            log.info("loaded model %s:%s in %.2f s", key[0], key[1], now - started)
            return entry

    def _drop(self, keys: list[ModelKey], why: str) -> list[ModelKey]:
        for key in keys:
            self._models.pop(key, None)
            self.evictions += 1
            log.info("evicted model %s:%s (%s)", key[0], key[1], why)
        if keys:
            release_accelerator_memory()
        return keys

    def evict(self, category: str | None = None) -> list[str]:
        """Drop every idle model of ``category`` (all categories when None)."""
        keys = [
            key for key, m in self._models.items() if m.in_use == 0 and (category is None or m.category == category)
        ]
        return self._drop(keys, f"evict({category or 'all'})")

    def evict_expired(self) -> list[ModelKey]:
        cutoff = time.monotonic() - self.keep_alive_s
        keys = [
            key for key, m in self._models.items() if m.in_use == 0 and not m.pinned and m.last_used <= cutoff
        ]
        return self._drop(keys, "keep-alive expired")

    def evict_for_memory(self) -> list[str]:
        """Before a load: drop idle models, least recently used first, while free RAM is short."""
        dropped: list[str] = []
        free = self._free_memory()
        while free is not None and free < self.min_free_mb:
            idle = [m for m in self._models.values() if m.in_use == 0]
            if not idle:
                break
            oldest = min(idle, key=lambda m: m.last_used)
            dropped += self._drop([oldest.key], f"free memory {free:.0f} MB < {self.min_free_mb} MB")
            free = self._free_memory()
        return dropped

    async def run_sweeper(self, interval_s: float | None = None) -> None:
        """Background task: drop models idle past keep-alive."""
        interval = interval_s or max(0.5, min(30.0, self.keep_alive_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.evict_expired()
