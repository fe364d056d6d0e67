"""More than one device: a slot per device, models per device, engines sharing GPU memory.

No GPU here: the CPU devices (``cpu*N``) run real concurrent inferences,
and GPU devices are named explicitly with backends that record which device
they were asked to load on (nothing touches CUDA); GPU free memory comes
from a test plugin's ``device_free_memory_mb`` answer, as it would from a
torch plugin's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import aiohttp
import attrs
import pytest

import aistack_plugins.faster_whisper
import aistack_plugins.ollama
import aistack_plugins.qwen3_tts
from aistack_core import Device, hookimpl
from aistack_core.app import create_app
from aistack_core.config import Config
from aistack_core.context import model_cache_key, slot_key, upstream_devices_key
from aistack_core.devices import parse_device_names, parse_devices, upstream_devices
from aistack_core.model_cache import ModelCache

from .helpers import BackendPlugin, SlowAsr, tone_wav, word_error_rate
from .upstreams import run_gateway
from .upstreams.ollama import OllamaEmulator

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Name a river that crosses three countries."}]


class PlacedAsr(SlowAsr):
    """A test ASR backend that takes the device to load on and holds each request until released."""

    def __init__(self, model_id: str = "placed-asr", **kwargs) -> None:
        super().__init__(model_id, steps=1, step_s=0.0, **kwargs)
        self.loaded_on: list[str] = []
        self.served_on: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Semaphore(0)

    def load(self, device: Device | None = None):
        assert device is not None, "the core passes the device to a backend that takes one"
        self.loaded_on.append(device.name)
        return {"device": device.name, "threads": device.cpu_threads}

    def transcribe(self, model, audio, options, cancel):
        self.served_on.append(model["device"])
        self.started.release()
        while not self.release.wait(0.01):
            cancel.raise_if_cancelled()
        return super().transcribe(model, audio, options, cancel)


class OldStyleAsr(SlowAsr):
    """A backend from before devices: its ``load`` takes no device."""


@pytest.fixture
def clip(tmp_path):
    return tone_wav(tmp_path / "clip.wav", seconds=0.5)


async def transcribe(client, clip, model: str):
    with open(clip, "rb") as audio:
        form = aiohttp.FormData()
        form.add_field("file", audio, filename="clip.wav", content_type="audio/wav")
        form.add_field("model", model)
        form.add_field("response_format", "json")
        return await client.post("/v1/audio/transcriptions", data=form)


async def wait_started(backend: PlacedAsr, count: int, timeout_s: float = 10.0) -> None:
    for _ in range(count):
        assert await asyncio.to_thread(backend.started.acquire, True, timeout_s), "a request never started"


# --- AISTACK_DEVICES ------------------------------------------------------------------


def test_devices_setting_forms():
    assert parse_devices("auto") is None and parse_devices("") is None
    two = parse_devices("cpu*2", cores=8)
    assert [(d.name, d.kind, d.cpu_threads) for d in two] == [("cpu:0", "cpu", 4), ("cpu:1", "cpu", 4)]
    assert [d.name for d in parse_devices("cuda:0, CUDA:1")] == ["cuda:0", "cuda:1"]
    assert [(d.name, d.index) for d in parse_devices("cuda")] == [("cuda:0", 0)]
    assert parse_devices("cpu*3", cores=2)[2].cpu_threads == 1  # never fewer than one core
    assert [d.qualified_name for d in parse_devices("cuda:1,cpu")] == ["cuda:1", "cpu"]
    assert Config.from_env({"AISTACK_DEVICES": "cpu*2"}).devices[1].name == "cpu:1"
    assert Config.from_env({}).devices is None


@pytest.mark.parametrize("value", ["gpu", "cpu*0", "cpu*x", "cuda:0,cuda:0", "cpu,cpu*2", "cuda:-1", ",", "cpu*9999"])
def test_bad_devices_settings_are_refused_at_start(value):
    with pytest.raises(ValueError, match="AISTACK_DEVICES"):
        Config.from_env({"AISTACK_DEVICES": value})


# --- slots ----------------------------------------------------------------------------


async def test_two_cpu_slots_run_two_inferences_and_turn_a_third_away(make_client, clip):
    backend = PlacedAsr()
    client = await make_client(plugins={"tests": BackendPlugin(backend)}, devices="cpu*2")
    backend.release.clear()
    first = asyncio.create_task(transcribe(client, clip, "placed-asr"))
    second = asyncio.create_task(transcribe(client, clip, "placed-asr"))
    await wait_started(backend, 2)

    health = await (await client.get("/health")).json()
    assert health["devices"] == {"total": 2, "busy": 2} and health["routing"]["accepts_requests"] is False
    assert [d["busy"] for d in health["device_slots"]] == [True, True]

    third = await transcribe(client, clip, "placed-asr")
    assert third.status == 503 and third.headers["Retry-After"] == "5"
    message = (await third.json())["error"]["message"]
    assert "all 2 devices" in message and "2 of 2 devices are busy" in message
    assert "cpu:0" in message and "cpu:1" in message

    backend.release.set()
    answers = await asyncio.gather(first, second)
    assert [a.status for a in answers] == [200, 200]
    assert sorted(backend.served_on) == ["cpu:0", "cpu:1"]
    assert client.app[slot_key].is_free
    health = await (await client.get("/health")).json()
    assert health["devices"] == {"total": 2, "busy": 0}
    assert [d["inferences"] for d in health["device_slots"]] == [1, 1]


async def test_one_free_device_is_enough(make_client, clip):
    backend = PlacedAsr()
    client = await make_client(plugins={"tests": BackendPlugin(backend)}, devices="cpu*2")
    backend.release.clear()
    held = asyncio.create_task(transcribe(client, clip, "placed-asr"))
    await wait_started(backend, 1)
    status = (await (await client.get("/admin/api/status")).json())
    assert status["slot"]["busy"] is False and status["slot"]["busy_devices"] == 1
    assert [d["busy"] for d in status["device_slots"]] == [True, False]
    health = await (await client.get("/health")).json()
    assert health["routing"] == {"accepts_requests": True, "load_score": 0.5}
    backend.release.set()
    assert (await transcribe(client, clip, "placed-asr")).status == 200
    assert (await held).status == 200


async def test_the_pool_says_whether_a_device_that_can_serve_is_free():
    from aistack_core.slot import GpuSlot

    pool = GpuSlot(devices=parse_devices("cpu*2"))
    async with pool.acquire_or_busy("asr", "m", "r1", prefer=["cpu:1"]) as lease:
        assert lease.device.name == "cpu:1"  # the preferred device, though cpu:0 comes first
        assert pool.can_take() and pool.can_take(["cpu:0"]) and not pool.can_take(["cpu:1"])
        assert not pool.is_free and pool.holder.request_id == "r1"
        async with pool.acquire_or_busy("asr", "m", "r2"):
            assert not pool.can_take() and pool.status()["busy"] is True
            assert pool.status()["request_id"] == "r1"  # the longest-running holder
    assert pool.is_free and pool.can_take(["cpu:1"])


async def test_each_core_share_reaches_the_backend(make_client, clip):
    backend = PlacedAsr()
    client = await make_client(plugins={"tests": BackendPlugin(backend)}, devices=parse_devices("cpu*2", cores=6))
    assert (await transcribe(client, clip, "placed-asr")).status == 200
    cache = client.app[model_cache_key]
    assert cache.entry(("asr", "placed-asr"), "cpu:0").model == {"device": "cpu:0", "threads": 3}


async def test_a_backend_that_cannot_choose_its_device_stays_on_the_first(make_client, clip):
    old = OldStyleAsr("old-asr", steps=20, step_s=0.05)
    client = await make_client(plugins={"tests": BackendPlugin(old)}, devices="cpu*2")
    running = asyncio.create_task(transcribe(client, clip, "old-asr"))
    while not old.running.is_set():
        await asyncio.sleep(0.01)
    refused = await transcribe(client, clip, "old-asr")
    assert refused.status == 503
    message = (await refused.json())["error"]["message"]
    assert "the one device that can serve this request is busy" in message and "1 of 2 devices" in message
    assert (await running).status == 200
    assert client.app[model_cache_key].resident_devices(("asr", "old-asr")) == ["cpu:0"]


async def test_faster_whisper_runs_on_both_cpu_devices_at_once(make_client, sentences_wav):
    """The real plugin on ``cpu*2``: two copies of tiny.en, one per CPU share, transcribing side by side."""
    client = await make_client(plugins={"faster_whisper": aistack_plugins.faster_whisper}, devices="cpu*2")

    async def one(text, path):
        with open(path, "rb") as audio:
            form = aiohttp.FormData()
            form.add_field("file", audio, filename=path.name, content_type="audio/wav")
            form.add_field("model", "whisper-tiny.en")
            response = await client.post("/v1/audio/transcriptions", data=form)
            assert response.status == 200, await response.text()
            return text, (await response.json())["text"]

    (first, second) = sentences_wav[:2]
    answers = await asyncio.gather(one(*first), one(*second))
    assert all(word_error_rate(text, heard) < 0.3 for text, heard in answers), answers
    cache = client.app[model_cache_key]
    assert sorted(cache.resident_devices(("asr", "whisper-tiny.en"))) == ["cpu:0", "cpu:1"]
    for device in ("cpu:0", "cpu:1"):
        loaded = cache.entry(("asr", "whisper-tiny.en"), device).model
        assert loaded.device.device == "cpu"  # CTranslate2 has one CPU device: index 0, its own threads


# --- models per device ----------------------------------------------------------------


async def test_the_same_model_is_resident_on_each_device_that_ran_it(make_client, clip):
    backend = PlacedAsr()
    client = await make_client(plugins={"tests": BackendPlugin(backend)}, devices="cpu*2")
    backend.release.clear()
    both = [asyncio.create_task(transcribe(client, clip, "placed-asr")) for _ in range(2)]
    await wait_started(backend, 2)
    backend.release.set()
    assert [(await task).status for task in both] == [200, 200]
    assert sorted(backend.loaded_on) == ["cpu:0", "cpu:1"]

    health = await (await client.get("/health")).json()
    assert [[m["model"] for m in d["models"]] for d in health["device_slots"]] == [["placed-asr"], ["placed-asr"]]
    listed = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    assert sorted(listed["placed-asr"]["resident_devices"]) == ["cpu:0", "cpu:1"]
    admin = {m["id"]: m for m in (await (await client.get("/admin/api/models")).json())["data"]}
    assert sorted(admin["placed-asr"]["devices"]) == ["cpu:0", "cpu:1"]

    # An unload drops every copy.
    assert (await client.delete("/admin/api/models/placed-asr")).status == 200
    assert client.app[model_cache_key].resident_devices(("asr", "placed-asr")) == []


async def test_a_request_goes_where_its_model_already_is(make_client, clip):
    first, second = PlacedAsr("first-asr"), PlacedAsr("second-asr")
    client = await make_client(plugins={"tests": BackendPlugin(first, second)}, devices="cpu*2")
    for model in ("first-asr", "second-asr", "second-asr", "first-asr", "second-asr"):
        assert (await transcribe(client, clip, model)).status == 200
    # Different models spread over the devices, and each stays where it was loaded.
    assert first.loaded_on == ["cpu:0"] and second.loaded_on == ["cpu:1"]
    assert first.served_on == ["cpu:0", "cpu:0"] and second.served_on == ["cpu:1", "cpu:1", "cpu:1"]

    # When the device holding it is busy, the other device loads a copy rather than refusing.
    first.release.clear()
    held = asyncio.create_task(transcribe(client, clip, "first-asr"))
    await wait_started(first, 3)
    second.release.clear()
    moved = asyncio.create_task(transcribe(client, clip, "second-asr"))
    await wait_started(second, 4)
    first.release.set()
    second.release.set()
    assert [(await held).status, (await moved).status] == [200, 200]
    assert second.loaded_on == ["cpu:1"] and second.served_on[-1] == "cpu:1"
    assert first.served_on[-1] == "cpu:0"


async def test_admin_load_places_the_model_on_a_device(make_client):
    backend = PlacedAsr()
    client = await make_client(plugins={"tests": BackendPlugin(backend)}, devices="cpu*2")
    response = await client.post("/admin/api/models/placed-asr/load")
    assert response.status == 200 and (await response.json())["devices"] == ["cpu:0"]
    assert backend.loaded_on == ["cpu:0"]


# --- eviction per device -------------------------------------------------------------------


class Weights:
    pass


async def test_keep_alive_expires_each_device_copy_on_its_own():
    cache = ModelCache(keep_alive_s=0.15, default_device="cpu:0")
    async with cache.use(("asr", "m"), "asr", Weights, device="cpu:0"):
        pass
    async with cache.use(("asr", "m"), "asr", Weights, device="cpu:1"):
        pass
    await asyncio.sleep(0.2)
    async with cache.use(("asr", "m"), "asr", Weights, device="cpu:1"):  # used again: its keep-alive restarts
        pass
    assert cache.evict_expired() == [("asr", "m")]
    assert cache.resident_devices(("asr", "m")) == ["cpu:1"]


async def test_gpu_memory_pressure_evicts_only_on_that_gpu():
    free = {"cuda:0": 5000.0, "cuda:1": 5000.0}
    cache = ModelCache(default_device="cuda:0", device_free_memory=free.get, min_free_device_mb=1000)
    for device in ("cuda:0", "cuda:1"):
        for model in ("a", "b"):
            async with cache.use(("asr", model), "asr", Weights, device=device):
                pass
            await asyncio.sleep(0.01)
    free["cuda:0"] = 200.0  # something else filled cuda:0
    async with cache.use(("asr", "c"), "asr", Weights, device="cuda:0"):
        pass
    # Every idle model on cuda:0 went (the reading never recovered); cuda:1 kept both.
    assert sorted(cache.resident_devices(("asr", "a")) + cache.resident_devices(("asr", "b"))) == ["cuda:1", "cuda:1"]
    assert cache.resident_devices(("asr", "c")) == ["cuda:0"]


async def test_ram_pressure_may_evict_any_cpu_device_own_device_first():
    # Each resident model costs 1 GB of 3.5 GB free; CPU devices share that RAM.
    cache = ModelCache(min_free_mb=1000, free_memory=lambda: 3500 - 1000 * len(cache.loaded()),
                       default_device="cpu:0")
    for device, model in (("cpu:1", "x"), ("cpu:0", "y"), ("cpu:0", "z"), ("cpu:0", "w")):
        async with cache.use(("asr", model), "asr", Weights, device=device):
            pass
        await asyncio.sleep(0.01)
    # Loading w found 500 MB free: cpu:0's own oldest (y) went, not the older x on cpu:1.
    assert sorted(m["model"] for m in cache.loaded()) == ["w", "x", "z"]
    # A load on cpu:1 now (500 MB free again) takes cpu:1's own x first, then the oldest on cpu:0.
    async with cache.use(("asr", "v"), "asr", Weights, device="cpu:1"):
        pass
    assert sorted(m["model"] for m in cache.loaded()) == ["v", "w", "z"]


async def test_chat_evicts_speech_models_only_on_the_device_it_takes(base_config, plugin_set, clip):
    ollama = OllamaEmulator()
    backend = PlacedAsr()
    async with ollama.running():
        plugin_set.register(aistack_plugins.ollama, name="ollama")
        plugin_set.register(BackendPlugin(backend), name="tests")
        config = attrs.evolve(base_config, env={"AISTACK_OLLAMA_URL": ollama.url}, devices=parse_devices("cpu*2"))
        async with run_gateway(create_app(config, plugins=plugin_set)) as client:
            cache = client.app[model_cache_key]
            for device in ("cpu:0", "cpu:1"):
                await cache.load(("asr", "placed-asr"), "asr", lambda: Weights(), device=device)
            async with client.app[slot_key].acquire_or_busy("asr", "placed-asr", "holding", devices=["cpu:1"]):
                # cpu:1 is busy, so the chat takes cpu:0 and frees the speech model there only.
                async with client.post(CHAT, json={"model": "qwen3:4b", "messages": MESSAGES}) as response:
                    assert response.status == 200
            assert cache.resident_devices(("asr", "placed-asr")) == ["cpu:1"]


# --- upstreams' devices -----------------------------------------------------------------------


def test_an_upstream_on_this_machine_uses_every_device_and_a_remote_one_none():
    devices = parse_devices("cuda:0,cuda:1")
    assert upstream_devices("ollama", None, True, devices) == ("cuda:0", "cuda:1")
    assert upstream_devices("ollama", None, False, devices) == ()
    assert upstream_devices("ollama", ("cuda:1",), False, devices) == ("cuda:1",)  # declared: even if remote
    assert upstream_devices("ollama", ("all",), True, devices) == ("cuda:0", "cuda:1")
    assert upstream_devices("ollama", (), True, devices) == ()
    with pytest.raises(ValueError, match="cuda:7"):
        upstream_devices("ollama", ("cuda:7",), True, devices)
    assert parse_device_names(None) is None and parse_device_names(" ") is None
    assert parse_device_names("none") == () and parse_device_names("cuda,cuda:1") == ("cuda:0", "cuda:1")
    assert parse_device_names("cpu*2") == ("cpu:0", "cpu:1")
    with pytest.raises(ValueError):
        parse_device_names("tpu:0")


def test_upstream_plugins_read_their_device_settings(base_config, plugin_set):
    plugin_set.register(aistack_plugins.ollama, name="ollama")
    plugin_set.register(aistack_plugins.qwen3_tts, name="qwen3-tts")
    config = attrs.evolve(
        base_config, devices=parse_devices("cuda:0,cuda:1"),
        env={"AISTACK_OLLAMA_URL": "http://127.0.0.1:11434", "AISTACK_QWEN3_TTS_URL": "http://tts-host.example:17860",
             "AISTACK_OLLAMA_DEVICES": "cuda:1"},
    )
    app = create_app(config, plugins=plugin_set)
    assert app[upstream_devices_key] == {"ollama": ("cuda:1",), "qwen3-tts": ()}
    config = attrs.evolve(config, env={**config.env, "AISTACK_OLLAMA_DEVICES": "", "AISTACK_QWEN3_TTS_DEVICES": "cuda:0"})
    assert create_app(config, plugins=plugin_set)[upstream_devices_key] == {
        "ollama": ("cuda:0", "cuda:1"), "qwen3-tts": ("cuda:0",)
    }
    with pytest.raises(ValueError, match="cuda:3"):
        create_app(attrs.evolve(config, env={"AISTACK_OLLAMA_DEVICES": "cuda:3"}), plugins=plugin_set)


@pytest.fixture
async def ollama():
    emulator = OllamaEmulator()
    async with emulator.running():
        yield emulator


@pytest.fixture
async def gateway(base_config, plugin_set, ollama):
    async with contextlib.AsyncExitStack() as stack:

        async def factory(*plugins, devices: str, **env: str):
            plugin_set.register(aistack_plugins.ollama, name="ollama")
            for i, plugin in enumerate(plugins):
                plugin_set.register(plugin, name=f"tests-{i}")
            config = attrs.evolve(base_config, devices=devices, env={"AISTACK_OLLAMA_URL": ollama.url, **env})
            return await stack.enter_async_context(run_gateway(create_app(config, plugins=plugin_set)))

        yield factory


async def test_a_chat_takes_a_slot_only_on_the_devices_its_engine_declares(gateway):
    client = await gateway(devices="cpu*2", AISTACK_OLLAMA_DEVICES="cpu:1")
    slots = client.app[slot_key]
    async with slots.acquire_or_busy("asr", "speech", "holding", devices=["cpu:1"]):
        async with client.post(CHAT, json={"model": "qwen3:4b", "messages": MESSAGES}) as response:
            assert response.status == 503 and "the one device" in (await response.json())["error"]["message"]
    async with slots.acquire_or_busy("asr", "speech", "holding", devices=["cpu:0"]):
        async with client.post(CHAT, json={"model": "qwen3:4b", "messages": MESSAGES}) as response:
            assert response.status == 200


async def test_an_engine_declared_on_no_device_takes_no_slot(gateway):
    client = await gateway(devices="cpu", AISTACK_OLLAMA_DEVICES="none")
    async with client.app[slot_key].acquire_or_busy("asr", "speech", "holding"):
        async with client.post(CHAT, json={"model": "qwen3:4b", "messages": MESSAGES}) as response:
            assert response.status == 200


# --- GPU memory shared with Ollama ------------------------------------------------------------------


class GpuMemory:
    """A plugin answering ``device_free_memory_mb`` as a torch plugin would on a real GPU."""

    def __init__(self, free_mb: dict[str, float]) -> None:
        self.free_mb = free_mb
        self.asked: list[str] = []

    @hookimpl
    def device_free_memory_mb(self, device: str):
        self.asked.append(device)
        return self.free_mb.get(device)


async def test_ollama_is_asked_to_unload_before_a_load_on_a_short_gpu(gateway, ollama, clip):
    backend = PlacedAsr()
    memory = GpuMemory({"cuda:0": 300.0, "cuda:1": 40_000.0})
    client = await gateway(BackendPlugin(backend), memory, devices="cuda:0,cuda:1")
    for model in ("qwen3:4b", "llama3.2:1b"):
        async with client.post(CHAT, json={"model": model, "messages": MESSAGES}) as response:
            assert response.status == 200
    assert sorted(ollama.in_memory) == ["llama3.2:1b", "qwen3:4b"]
    ollama.requests.clear()

    assert (await transcribe(client, clip, "placed-asr")).status == 200
    assert backend.loaded_on == ["cuda:0"] and "cuda:0" in memory.asked
    seen = [(r.method, r.path) for r in ollama.requests]
    assert seen[0] == ("GET", "/api/ps")
    unloads = sorted(json.loads(r.body)["model"] for r in ollama.requests if r.path == "/api/generate")
    assert unloads == ["llama3.2:1b", "qwen3:4b"]
    assert all(json.loads(r.body)["keep_alive"] == 0 for r in ollama.requests if r.path == "/api/generate")
    assert ollama.in_memory == {}


async def test_ollama_is_left_alone_when_the_gpu_has_room_or_is_not_its_own(gateway, ollama, clip):
    backend = PlacedAsr()
    memory = GpuMemory({"cuda:0": 40_000.0, "cuda:1": 100.0})
    client = await gateway(BackendPlugin(backend), memory, devices="cuda:0,cuda:1", AISTACK_OLLAMA_DEVICES="cuda:0")
    async with client.post(CHAT, json={"model": "qwen3:4b", "messages": MESSAGES}) as response:
        assert response.status == 200
    ollama.requests.clear()
    assert (await transcribe(client, clip, "placed-asr")).status == 200  # cuda:0: room enough
    backend.release.clear()
    held = asyncio.create_task(transcribe(client, clip, "placed-asr"))
    await wait_started(backend, 2)
    moved = asyncio.create_task(transcribe(client, clip, "placed-asr"))  # cuda:0 is busy: cuda:1 loads a copy
    await wait_started(backend, 1)
    backend.release.set()
    assert [(await held).status, (await moved).status] == [200, 200]
    # cuda:1 is short of memory, but Ollama does not work there: it is not asked.
    assert backend.loaded_on == ["cuda:0", "cuda:1"]
    assert [r.path for r in ollama.requests] == []
    assert "qwen3:4b" in ollama.in_memory


async def test_ollama_emulator_answers_unloads_as_ollama_does(ollama):
    async with aiohttp.ClientSession() as session:
        async with session.post(ollama.url + "/api/generate", json={"model": "qwen3:4b"}) as loaded:
            assert (await loaded.json())["done_reason"] == "load"
        async with session.get(ollama.url + "/api/ps") as ps:
            (model,) = (await ps.json())["models"]
            assert model["name"] == "qwen3:4b" and model["size_vram"] == model["size"] and "expires_at" in model
        async with session.post(ollama.url + "/api/generate", json={"model": "qwen3:4b", "keep_alive": 0}) as gone:
            body = await gone.json()
            assert (body["done"], body["done_reason"], body["response"]) == (True, "unload", "")
        async with session.get(ollama.url + "/api/ps") as ps:
            assert (await ps.json())["models"] == []
        async with session.post(ollama.url + "/api/generate", json={"model": "nope", "keep_alive": 0}) as missing:
            assert missing.status == 404 and "not found" in (await missing.json())["error"]


# --- the hooks ------------------------------------------------------------------------------------


class SeesGpus:
    def __init__(self, *names, fail: bool = False) -> None:
        self.names, self.fail = names, fail

    @hookimpl
    def list_devices(self, config):
        if self.fail:
            raise RuntimeError("driver went away")
        return list(self.names)


async def test_hook_list_devices(make_client, plugin_set):
    plugin_set.register(SeesGpus("cuda:1", "tpu:0"), name="one")
    plugin_set.register(SeesGpus("cuda:0", "cuda:1"), name="two")
    plugin_set.register(SeesGpus(fail=True), name="broken")
    client = await make_client()
    health = await (await client.get("/health")).json()
    assert [d["device"] for d in health["device_slots"]] == ["cuda:0", "cuda:1"]
    assert [d["kind"] for d in health["device_slots"]] == ["cuda", "cuda"]


async def test_auto_without_gpus_is_one_cpu_device(make_client):
    client = await make_client()
    assert [d.name for d in client.app[slot_key].devices] == ["cpu"]


async def test_an_explicit_setting_wins_over_what_plugins_see(make_client, plugin_set):
    plugin_set.register(SeesGpus("cuda:0"), name="one")
    client = await make_client(devices="cpu*3")
    assert client.app[slot_key].device_names == ("cpu:0", "cpu:1", "cpu:2")


async def test_hook_device_free_memory_mb(make_client, clip):
    backend = PlacedAsr()
    memory = GpuMemory({"cuda:0": 100.0})
    client = await make_client(plugins={"tests": BackendPlugin(backend), "memory": memory},
                               devices="cuda:0", min_free_vram_mb=500)
    cache = client.app[model_cache_key]
    await cache.load(("asr", "idle"), "asr", Weights, device="cuda:0")
    cache.entry(("asr", "idle")).pinned = False
    assert (await transcribe(client, clip, "placed-asr")).status == 200
    # Asked before the load (from a worker thread); short, so the idle model made way.
    assert memory.asked and set(memory.asked) == {"cuda:0"}
    assert ("asr", "idle") not in cache and cache.resident_devices(("asr", "placed-asr")) == ["cuda:0"]


# --- metrics ------------------------------------------------------------------------------------


async def test_metrics_report_slot_and_models_per_device(make_client, clip):
    pytest.importorskip("prometheus_client")
    backend = PlacedAsr()
    client = await make_client(plugins={"tests": BackendPlugin(backend)}, devices="cpu*2")
    assert (await transcribe(client, clip, "placed-asr")).status == 200
    text = await (await client.get("/metrics")).text()
    assert 'aistack_device_busy{device="cpu:0"} 0.0' in text
    assert 'aistack_device_models_loaded{device="cpu:0"} 1.0' in text
    assert 'aistack_device_models_loaded{device="cpu:1"} 0.0' in text
    assert 'aistack_device_inferences_total{device="cpu:0"} 1.0' in text
    body = await (await client.get("/admin/api/metrics")).json()
    assert [d["device"] for d in body["device_slots"]] == ["cpu:0", "cpu:1"]
    (recent,) = [r for r in body["metrics"]["recent"] if r["path"] == "/v1/audio/transcriptions"]
    assert recent["device"] == "cpu:0"  # the access-log line says where it ran
