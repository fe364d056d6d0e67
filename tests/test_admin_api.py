"""The admin API, start-up preloads and readiness, the root answer and the page's files, over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import weakref

import attrs
import pytest

from aistack_core import __version__
from aistack_core.routes.admin import PRELOAD_RETRY_S, find_in_process
from aistack_core.app import create_app
from aistack_core.context import model_cache_key, slot_key
from aistack_core.model_cache import ModelCache

from .helpers import BackendPlugin, SlowAsr


class GatedAsr(SlowAsr):
    """A test ASR backend whose load waits until the test opens the gate."""

    def __init__(self, model_id: str = "gated-asr", **kwargs) -> None:
        super().__init__(model_id, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.last_model = None

    def load(self):
        self.loads += 1
        if not self.gate.wait(timeout=10):
            raise TimeoutError("the test never opened the gate")

        class Weights:  # an object the test can watch being freed
            pass

        self.last_model = weakref.ref(model := Weights())
        return model


def cache_key(app, model_id: str):
    """The model cache's key for an in-process model, however the cache spells it."""
    return find_in_process(app, model_id).cache_key


def resident(app, model_id: str) -> bool:
    return cache_key(app, model_id) in app[model_cache_key]


async def admin_client(make_client, *backends, **config):
    return await make_client(plugins={"tests": BackendPlugin(*backends)}, **config)


async def models_by_id(client) -> dict[str, dict]:
    response = await client.get("/admin/api/models")
    assert response.status == 200
    return {model["id"]: model for model in (await response.json())["data"]}


async def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


# --- status ---------------------------------------------------------------------


async def test_status_reports_version_uptime_and_the_slot_holder(make_client):
    client = await admin_client(make_client, SlowAsr())
    body = await (await client.get("/admin/api/status")).json()
    assert body["service"] == "aistack" and body["version"] == __version__
    assert body["uptime_s"] >= 0 and body["started_at"].endswith("Z")
    assert body["slot"] == {"busy": False, "busy_rejections": 0}
    assert body["readiness"]["ready"] is True
    assert body["api_key_required"] is False
    async with client.app[slot_key].acquire_or_busy("asr", "slow-asr", "req-holding"):
        await asyncio.sleep(0.05)
        held = (await (await client.get("/admin/api/status")).json())["slot"]
    assert held["busy"] is True and held["request_id"] == "req-holding" and held["model"] == "slow-asr"
    assert held["held_s"] >= 0.05


# --- models: list, load, unload ------------------------------------------------


async def test_load_then_unload_frees_the_model(make_client):
    backend = GatedAsr()
    client = await admin_client(make_client, backend)
    listed = await models_by_id(client)
    assert listed["gated-asr"]["resident"] is False and listed["gated-asr"]["capability"] == "asr"

    response = await client.post("/admin/api/models/gated-asr/load")
    assert response.status == 200, await response.text()
    loaded = await response.json()
    assert loaded["resident"] is True and loaded["loaded_now"] is True and loaded["pinned"] is True
    assert loaded["load_s"] >= 0 and "memory_mb" in loaded and loaded["last_used_at"].endswith("Z")
    again = await (await client.post("/admin/api/models/gated-asr/load")).json()
    assert again["loaded_now"] is False and backend.loads == 1
    assert (await models_by_id(client))["gated-asr"]["resident"] is True

    weights = backend.last_model
    assert weights() is not None
    response = await client.delete("/admin/api/models/gated-asr")
    assert response.status == 200
    assert (await response.json())["unloaded"] is True
    gc.collect()
    assert weights() is None, "the cache still holds the unloaded model"
    assert not resident(client.app, "gated-asr")
    # Unloading what is not resident is a no-op, not an error.
    response = await client.delete("/admin/api/models/gated-asr")
    assert response.status == 200 and (await response.json())["unloaded"] is False


async def test_model_ids_with_slashes_and_aliases_resolve(make_client):
    backend = SlowAsr("org/slow-asr")
    client = await admin_client(make_client, backend)
    response = await client.post("/admin/api/models/org/slow-asr/load")
    assert response.status == 200 and (await response.json())["id"] == "org/slow-asr"
    response = await client.delete("/admin/api/models/org%2Fslow-asr")
    assert response.status == 200 and (await response.json())["unloaded"] is True


async def test_unload_is_refused_while_the_model_serves_a_request(make_client):
    backend = SlowAsr()
    client = await admin_client(make_client, backend)
    cache: ModelCache = client.app[model_cache_key]
    async with cache.use(cache_key(client.app, "slow-asr"), "asr", backend.load):
        response = await client.delete("/admin/api/models/slow-asr")
        assert response.status == 409
        error = (await response.json())["error"]
        assert "serving a request" in error["message"]
        assert resident(client.app, "slow-asr")
    assert (await client.delete("/admin/api/models/slow-asr")).status == 200
    assert not resident(client.app, "slow-asr")


async def test_load_gets_busy_while_the_slot_is_taken(make_client):
    client = await admin_client(make_client, SlowAsr())
    async with client.app[slot_key].acquire_or_busy("tts", "some-voice", "req-speaking"):
        response = await client.post("/admin/api/models/slow-asr/load")
    assert response.status == 503 and response.headers["Retry-After"] == "5"
    message = (await response.json())["error"]["message"]
    assert "req-speaking" in message and "GPU" not in message


async def test_unknown_models_and_methods_get_the_envelope(make_client):
    client = await admin_client(make_client, SlowAsr())
    for method, path in (("POST", "/admin/api/models/nope/load"), ("DELETE", "/admin/api/models/nope")):
        response = await client.request(method, path)
        assert response.status == 404
        assert "No in-process model 'nope'" in (await response.json())["error"]["message"]
    response = await client.put("/admin/api/models")
    assert response.status == 405 and (await response.json())["error"]["kind"] == "malformed"


async def test_another_sites_page_cannot_load_or_unload(make_client):
    client = await admin_client(make_client, SlowAsr(), cors_allow_origins=("http://tools.example",))
    cross_site = {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}
    response = await client.post("/admin/api/models/slow-asr/load", headers=cross_site)
    assert response.status == 403 and "AISTACK_CORS_ALLOW_ORIGINS" in (await response.json())["error"]["message"]
    assert (await client.delete("/admin/api/models/slow-asr", headers=cross_site)).status == 403
    assert not resident(client.app, "slow-asr")
    # The page itself (same-origin), an allowed origin, and API clients (no such header) may.
    assert (await client.post("/admin/api/models/slow-asr/load", headers={"Sec-Fetch-Site": "same-origin"})).status == 200
    allowed = {"Sec-Fetch-Site": "cross-site", "Origin": "http://tools.example"}
    assert (await client.delete("/admin/api/models/slow-asr", headers=allowed)).status == 200
    assert (await client.post("/admin/api/models/slow-asr/load")).status == 200


async def test_loaded_on_purpose_outlives_the_keep_alive(make_client):
    pinned, casual = SlowAsr("pinned-asr"), SlowAsr("casual-asr")
    client = await admin_client(make_client, pinned, casual, model_keep_alive_s=0.0)
    cache: ModelCache = client.app[model_cache_key]
    assert (await client.post("/admin/api/models/pinned-asr/load")).status == 200
    async with cache.use(cache_key(client.app, "casual-asr"), "asr", casual.load):
        pass
    assert cache.evict_expired() == [cache_key(client.app, "casual-asr")]
    assert resident(client.app, "pinned-asr")


# --- preload and readiness ---------------------------------------------------------


async def test_preload_runs_beside_the_server_and_readiness_follows(make_client):
    backend = GatedAsr("preloaded-asr")
    backend.gate.clear()
    client = await admin_client(make_client, backend, preload=("preloaded-asr",))
    try:
        health = await client.get("/health")
        assert health.status == 200
        ready = await client.get("/health/ready")
        assert ready.status == 503
        assert "loading preloaded-asr" in (await ready.json())["error"]["message"]
    finally:
        backend.gate.set()

    async def is_ready():
        return (await client.get("/health/ready")).status == 200

    await wait_for(is_ready)
    body = await (await client.get("/health/ready")).json()
    assert body["ready"] is True and body["loaded"] == ["preloaded-asr"] and body["failed"] == {}
    assert (await models_by_id(client))["preloaded-asr"]["pinned"] is True


async def test_a_failed_preload_keeps_readiness_at_503_and_says_why(make_client):
    broken = SlowAsr("broken-asr")
    broken.load = lambda: (_ for _ in ()).throw(OSError("weights file is truncated"))
    client = await admin_client(make_client, broken, SlowAsr(), preload=("no-such-model", "broken-asr", "slow-asr"))

    async def finished():
        status = await (await client.get("/admin/api/status")).json()
        return not status["readiness"]["pending"]

    await wait_for(finished)
    ready = await client.get("/health/ready")
    assert ready.status == 503
    message = (await ready.json())["error"]["message"]
    assert "no-such-model" in message and "weights file is truncated" in message
    assert resident(client.app, "slow-asr")  # the good one still loaded


async def test_preload_waits_for_a_slot_a_request_holds(aiohttp_client, base_config, plugin_set):
    plugin_set.register(BackendPlugin(SlowAsr()), name="tests")
    app = create_app(attrs.evolve(base_config, preload=("slow-asr",)), plugins=plugin_set)
    async with contextlib.AsyncExitStack() as held:
        # A request holds the slot before the server even starts.
        await held.enter_async_context(app[slot_key].acquire_or_busy("tts", "voice", "early-request"))
        client = await aiohttp_client(app)
        await asyncio.sleep(PRELOAD_RETRY_S * 2)
        assert (await client.get("/health/ready")).status == 503
        assert not resident(app, "slow-asr")

    async def is_ready():
        return (await client.get("/health/ready")).status == 200

    await wait_for(is_ready)
    assert resident(app, "slow-asr")


# --- the key ---------------------------------------------------------------------


async def test_with_a_key_only_the_page_shell_answers(make_client):
    client = await admin_client(make_client, SlowAsr(), api_key="k-123")
    for path in ("/admin/api/status", "/admin/api/models", "/admin/api/metrics", "/-/plugins"):
        response = await client.get(path)
        assert response.status == 401, path
        assert (await response.json())["error"]["kind"] == "malformed"
    assert (await client.post("/admin/api/models/slow-asr/load")).status == 401
    assert (await client.delete("/admin/api/models/slow-asr")).status == 401
    for path, content_type in (("/admin", "text/html"), ("/admin/static/admin.js", "text/javascript"),
                               ("/admin/static/admin.css", "text/css"), ("/health/ready", "application/json")):
        response = await client.get(path)
        assert response.status == 200, path
        assert response.content_type == content_type
    headers = {"Authorization": "Bearer k-123"}
    assert (await client.get("/admin/api/status", headers=headers)).status == 200
    assert (await client.post("/admin/api/models/slow-asr/load", headers=headers)).status == 200


# --- the page's files and the root -------------------------------------------------


async def test_page_files_are_served_with_a_strict_policy(make_client):
    client = await admin_client(make_client, SlowAsr())
    page = await client.get("/admin")
    html = await page.text()
    assert page.status == 200 and '<script src="/admin/static/admin.js"' in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    script = await (await client.get("/admin/static/admin.js")).text()
    assert "fetch(" in script and "https://" not in script and "innerHTML" not in script
    for path in ("/admin/static/index.html", "/admin/static/../admin.py", "/admin/static/%2e%2e%2fadmin.py",
                 "/admin/static/admin.js.map"):
        response = await client.get(path)
        assert response.status == 404, path
        assert "error" in await response.json()


async def test_root_sends_browsers_to_the_page_and_tells_clients_where_to_look(make_client):
    client = await admin_client(make_client, SlowAsr())
    browser = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},
                               allow_redirects=False)
    assert browser.status == 302 and browser.headers["Location"] == "/admin"
    for accept in ("application/json", "*/*", None):
        response = await client.get("/", headers={"Accept": accept} if accept else {})
        assert response.status == 200
        body = await response.json()
        assert body["service"] == "aistack" and body["version"] == __version__
        assert body["models"] == "/v1/models" and body["admin"] == "/admin"


@pytest.mark.parametrize("path", ["/admin/api/status", "/admin/api/models", "/admin"])
async def test_the_pages_polling_reads_are_not_counted(make_client, path):
    client = await admin_client(make_client, SlowAsr())
    for _ in range(3):
        assert (await client.get(path)).status == 200
    metrics = (await (await client.get("/admin/api/metrics")).json())["metrics"]
    assert [r["path"] for r in metrics["recent"]] == []  # this read is recorded only once it is over


def test_the_page_files_are_package_data():
    """``pip install .`` must ship every file the page needs: setup.cfg's patterns cover them."""
    import configparser
    import fnmatch
    from pathlib import Path

    from aistack_core.routes.admin import STATIC_DIR, STATIC_FILES

    root = Path(__file__).resolve().parent.parent
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    patterns = [p.strip() for p in setup["options.package_data"]["aistack_core"].split(",")]
    shipped = {"index.html", *STATIC_FILES}
    assert {path.name for path in STATIC_DIR.iterdir()} == shipped
    for name in shipped:
        relative = f"static/admin/{name}"
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
