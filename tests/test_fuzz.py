"""The OpenAPI document at /openapi.json is true, and every operation in it survives fuzzing.

``test_document_matches_the_router`` keeps the hand-written document and the
app's router in step.  ``test_fuzz_operation`` lets schemathesis generate
valid and invalid requests for each documented operation (a bounded number
of examples each: ``AISTACK_FUZZ_EXAMPLES``, default 12) and sends them over
real HTTP to a gateway served on loopback with its real routes, test
backends in process and the upstream emulators behind the proxy routes.
Every answer must hold to the contract:

* no 5xx except a documented 502/503/504, and those only as the envelope;
* every error the gateway makes is the envelope (an upstream's own error
  passes through as the upstream wrote it, and only when the upstream was
  really asked);
* the server is alive afterwards, and no spooled upload is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from pathlib import Path

import aiohttp
import attrs
import pytest
import requests
import schemathesis
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

import aistack_plugins.ollama
import aistack_plugins.qwen3_tts
from aistack_core.app import create_app
from aistack_core.config import Config
from aistack_core.plugins import load_plugins
from aistack_core.routes import fallback, openapi

from .helpers import BackendPlugin, SlowAsr
from .test_observe import SineTts, TtsPlugin
from .upstreams import serve
from .upstreams.ollama import OllamaEmulator
from .upstreams.vllm_omni import VllmOmniEmulator

EXAMPLES = int(os.environ.get("AISTACK_FUZZ_EXAMPLES", "12"))
DOCUMENT = openapi.document()
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
ENVELOPE_FIELDS = {"kind", "provider", "message", "type", "code", "param"}
# Each run's tally, for the report line the last test prints.
TALLY = {"requests": 0, "5xx": 0, "relayed upstream 5xx": 0, "by_status": {}}


def _operation_id(operation) -> str:
    return f"{operation.method.upper()} {operation.path}"


# --- the document is true ---------------------------------------------------------------


def _app(tmp_path: Path):
    plugins = load_plugins(load_entrypoints=False)
    plugins.register(aistack_plugins.qwen3_tts, name="qwen3_tts")
    plugins.register(aistack_plugins.ollama, name="ollama")
    return create_app(Config(upload_dir=tmp_path, obs_access_log=False, tts_cache_dir=tmp_path / "c"), plugins=plugins)


def _concrete(path: str) -> str:
    return path.replace("{", "").replace("}", "")  # /v1/models/{model} -> /v1/models/model


async def test_document_matches_the_router(tmp_path):
    app = _app(tmp_path)
    app.freeze()
    documented: dict[str, set[str]] = {
        path: {method.upper() for method in item if method in ("get", "post", "put", "patch", "delete")}
        for path, item in DOCUMENT["paths"].items()
    }
    # Every documented operation reaches a route of the gateway (not the 404 fallback).
    catch_all_reached = set()
    for path, methods in documented.items():
        for method in methods:
            request = make_mocked_request(method, _concrete(path), app=app)
            match = await app.router.resolve(request)
            assert match.http_exception is None, (method, path)
            resource = match.route.resource
            assert match.route.handler is not fallback.unmatched, f"{method} {path} is documented but not routed"
            operation = DOCUMENT["paths"][path][method.lower()]
            if resource.canonical != path:
                # Only the proxied upstream routes may be served by a catch-all.
                assert operation.get("x-aistack-proxied"), f"{method} {path} lands on {resource.canonical}"
                catch_all_reached.add(resource.canonical)
    # Every route of the router is documented (the catch-alls through the paths they relay).
    for resource in app.router.resources():
        canonical = resource.canonical
        if any(route.handler is fallback.unmatched for route in resource):
            continue
        for route in resource:
            method = route.method
            if method == "HEAD" and "GET" in documented.get(canonical, ()):
                continue  # aiohttp answers HEAD wherever it answers GET
            if method == "*":
                assert canonical in catch_all_reached, f"the catch-all {canonical} documents no path it serves"
                continue
            assert method in documented.get(canonical, ()), f"{method} {canonical} is routed but not documented"


async def test_openapi_json_is_served(aiohttp_client, tmp_path):
    client = await aiohttp_client(_app(tmp_path))
    response = await client.get("/openapi.json")
    assert response.status == 200
    body = await response.json()
    assert body["openapi"].startswith("3.") and body["info"]["version"]
    assert set(body["paths"]) == set(DOCUMENT["paths"])


# --- fuzzing --------------------------------------------------------------------------------


@attrs.define
class Served:
    url: str
    upload_dir: Path
    tts: VllmOmniEmulator
    ollama: OllamaEmulator

    def upstream_requests(self) -> int:
        return len(self.tts.requests) + len(self.ollama.requests)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Emulators and the gateway on loopback, in a thread of their own (schemathesis calls are blocking)."""
    folder = tmp_path_factory.mktemp("fuzz")
    upload_dir = folder / "uploads"
    upload_dir.mkdir()
    loop = asyncio.new_event_loop()
    ready: dict = {}
    stop = asyncio.Event()

    async def main():
        tts, ollama = VllmOmniEmulator(), OllamaEmulator()
        async with tts.running(), ollama.running():
            plugins = load_plugins(load_entrypoints=False)
            plugins.register(aistack_plugins.qwen3_tts, name="qwen3_tts")
            plugins.register(aistack_plugins.ollama, name="ollama")
            plugins.register(BackendPlugin(SlowAsr("slow-asr", steps=1, step_s=0.001)), name="asr")
            plugins.register(TtsPlugin(SineTts("sine-tts", pieces=1, piece_s=0.05)), name="tts")
            config = Config(
                upload_dir=upload_dir, tts_cache_dir=folder / "tts-cache", obs_log_dir=folder / "logs",
                obs_payload_dir=folder / "payloads", obs_access_log=False, max_upload_mb=4,
                env={"AISTACK_QWEN3_TTS_URL": tts.url, "AISTACK_OLLAMA_URL": ollama.url},
            )
            async with serve(create_app(config, plugins=plugins)) as url:
                ready["served"] = Served(url, upload_dir, tts, ollama)
                await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while "served" not in ready:
        assert time.monotonic() < deadline and thread.is_alive(), "the fuzz server did not start"
        time.sleep(0.05)
    yield ready["served"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=10)


def _documented_statuses(operation) -> set[str]:
    return set(operation.definition.raw.get("responses", {}))


def _check(served: Served, operation, case, response, upstream_asked: bool) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.content[:300]!r}"
    status = response.status_code
    TALLY["requests"] += 1
    TALLY["by_status"][status] = TALLY["by_status"].get(status, 0) + 1
    if status >= 400:
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        is_envelope = isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict) \
            and set(body["error"]) == ENVELOPE_FIELDS
        if not is_envelope:
            # Only an upstream's own answer may be something else, and only if it was asked
            # (the gateway relays it as it was written, even the upstream's own 500).
            assert operation.definition.raw.get("x-aistack-proxied") and upstream_asked, where
            if status >= 500:
                TALLY["relayed upstream 5xx"] += 1
        elif status >= 500:
            TALLY["5xx"] += 1
            assert status in (502, 503, 504) and str(status) in _documented_statuses(operation), where
            assert body["error"]["kind"] == "network", where
    # The spooled upload is gone once the answer is complete.
    deadline = time.monotonic() + 1.0
    while (left := list(served.upload_dir.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, (where, left)


def _has_inputs(operation) -> bool:
    """A body or a query parameter to get wrong (a string path parameter cannot be invalid)."""
    raw = operation.definition.raw
    return bool(raw.get("requestBody") or any(p["in"] != "path" for p in raw.get("parameters", ())))


# Invalid requests only for operations that take something that can be invalid.
FUZZ_CASES = [
    pytest.param(operation, mode, id=f"{_operation_id(operation)}-{mode.value}")
    for operation in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _has_inputs(operation)
]


@pytest.mark.parametrize(("operation", "mode"), FUZZ_CASES)
def test_fuzz_operation(served, operation, mode):
    session = requests.Session()

    @given(case=operation.as_strategy(generation_mode=mode))
    # No shrinking: a failure is reported as found, and the run stays within its time.
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))
    def exchange(case):
        before = served.upstream_requests()
        try:
            response = case.call(base_url=served.url, session=session, timeout=30)
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeEncodeError, ValueError):
            return  # a request the HTTP client itself refuses to send
        except requests.exceptions.ConnectionError as exc:
            # The server may close a connection after a broken body; it must still serve the next one.
            assert requests.get(served.url + "/health", timeout=5).status_code == 200, exc
            return
        _check(served, operation, case, response, upstream_asked=served.upstream_requests() > before)

    exchange()
    assert requests.get(served.url + "/health", timeout=5).status_code == 200, "the server died"


def test_fuzz_tally(served):
    """Runs last in this file: the figures for the report (and at least some requests were made)."""
    print(f"\nfuzz: {TALLY['requests']} requests, {TALLY['5xx']} documented 5xx from the gateway, "
          f"{TALLY['relayed upstream 5xx']} upstream 5xx relayed, by status {TALLY['by_status']}")
    assert TALLY["requests"] >= len(OPERATIONS)
