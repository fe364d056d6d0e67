"""The model cache: load once, keep alive, evict by category and under memory pressure."""

from __future__ import annotations

import asyncio
import threading
import time

from aistack_core.model_cache import ModelCache


class Loader:
    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.calls = 0
        self.threads: set[str] = set()

    def __call__(self):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        return object()


async def test_racing_requests_load_once_in_a_thread():
    cache = ModelCache()
    loader = Loader(delay_s=0.2)

    async def use():
        async with cache.use(("asr", "m"), "asr", loader) as model:
            return model

    models = await asyncio.gather(*(use() for _ in range(10)))
    assert loader.calls == 1 and len({id(m) for m in models}) == 1
    assert threading.main_thread().name not in loader.threads


async def test_keep_alive_drops_idle_models():
    cache = ModelCache(keep_alive_s=0.2)
    sweeper = asyncio.create_task(cache.run_sweeper(interval_s=0.05))
    try:
        async with cache.use(("asr", "m"), "asr", Loader()):
            await asyncio.sleep(0.4)
            assert ("asr", "m") in cache  # in use: never dropped
        await asyncio.sleep(0.4)
        assert ("asr", "m") not in cache
    finally:
        sweeper.cancel()


async def test_evict_by_category_spares_other_categories_and_models_in_use():
    cache = ModelCache()
    for key, category in (("a", "asr"), ("b", "asr"), ("t", "tts")):
        async with cache.use((category, key), category, Loader()):
            pass
    async with cache.use(("asr", "busy"), "asr", Loader()):
        assert sorted(cache.evict("asr")) == [("asr", "a"), ("asr", "b")]
    assert sorted(m["key"] for m in cache.loaded()) == ["asr:busy", "tts:t"]


async def test_ids_are_unique_per_capability_only():
    cache = ModelCache()
    async with cache.use(("asr", "same-id"), "asr", Loader()) as asr_model:
        async with cache.use(("tts", "same-id"), "tts", Loader()) as tts_model:
            assert asr_model is not tts_model
    assert sorted(m["key"] for m in cache.loaded()) == ["asr:same-id", "tts:same-id"]


async def test_low_memory_evicts_least_recently_used_before_loading():
    # Pretend each resident model costs 1 GB of a machine with 2.5 GB free when empty.
    cache = ModelCache(min_free_mb=1000, free_memory=lambda: 2500 - 1000 * len(cache.loaded()))
    for key in ("old", "newer"):
        async with cache.use(("asr", key), "asr", Loader()):
            pass
        await asyncio.sleep(0.01)
    async with cache.use(("asr", "new"), "asr", Loader()):
        pass
    assert sorted(m["key"] for m in cache.loaded()) == ["asr:new", "asr:newer"]
    assert cache.evictions == 1
