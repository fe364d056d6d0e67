"""CORS and the optional API key, over real HTTP (and the official openai client)."""

from __future__ import annotations

import asyncio
import logging

import openai
import pytest

from aistack_core.config import Config
from aistack_core.observe.middleware import observability_key
from aistack_core.security import warn_if_exposed

from .helpers import BackendPlugin, SlowAsr
from .test_core import assert_envelope

KEY = "sk-local-7f3a9c2e"
PAGE = "https://app.example"


def preflight_headers(origin: str = PAGE, method: str = "POST", headers: str | None = "authorization,content-type"):
    result = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        result["Access-Control-Request-Headers"] = headers
    return result


# --- CORS -----------------------------------------------------------------------


async def test_cors_is_off_by_default(make_client):
    client = await make_client()
    response = await client.get("/v1/models", headers={"Origin": PAGE})
    assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
    preflight = await client.options("/v1/models", headers=preflight_headers())
    assert preflight.status == 405 and "Access-Control-Allow-Origin" not in preflight.headers


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/audio/voices/someone", "/v1/models", "/not/a/route"])
async def test_preflight_answered_for_every_route(make_client, path):
    client = await make_client(cors_allow_origins=(PAGE, "http://localhost:5173"))
    response = await client.options(path, headers=preflight_headers(method="DELETE"))
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert "DELETE" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    assert "Origin" in response.headers.getall("Vary")
    assert response.headers["X-Request-ID"]


async def test_cors_headers_on_answers_and_errors(make_client):
    client = await make_client(cors_allow_origins=(PAGE,))
    ok = await client.get("/v1/models", headers={"Origin": PAGE})
    assert ok.headers["Access-Control-Allow-Origin"] == PAGE
    assert "X-Request-ID" in ok.headers["Access-Control-Expose-Headers"]
    assert "Retry-After" in ok.headers["Access-Control-Expose-Headers"]
    missing = await client.get("/nowhere", headers={"Origin": PAGE})
    assert missing.status == 404 and missing.headers["Access-Control-Allow-Origin"] == PAGE
    stranger = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert stranger.status == 200 and "Access-Control-Allow-Origin" not in stranger.headers
    refused = await client.options("/v1/models", headers=preflight_headers(origin="https://evil.example"))
    assert refused.status == 403 and "Access-Control-Allow-Origin" not in refused.headers
    assert_envelope(await refused.json(), "malformed")


async def test_cors_any_origin(make_client):
    client = await make_client(cors_allow_origins=("*",))
    preflight = await client.options("/v1/audio/speech", headers=preflight_headers(origin="http://anything.test"))
    assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == "*"
    response = await client.get("/health", headers={"Origin": "http://anything.test"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_preflight_needs_no_key_and_401_carries_cors(make_client):
    client = await make_client(cors_allow_origins=(PAGE,), api_key=KEY)
    preflight = await client.options("/v1/chat/completions", headers=preflight_headers())
    assert preflight.status == 204
    refused = await client.post("/v1/chat/completions", json={}, headers={"Origin": PAGE})
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == PAGE


# --- API key --------------------------------------------------------------------


def openai_client(client, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://{client.server.host}:{client.server.port}/v1", api_key=api_key, max_retries=0
    )


async def test_api_key_accepted_from_the_openai_client(make_client):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr("slow-asr"))}, api_key=KEY)
    models = await openai_client(client, KEY).models.list()
    assert "slow-asr" in [model.id for model in models.data]
    with pytest.raises(openai.AuthenticationError) as refused:
        await openai_client(client, "sk-wrong").models.list()
    assert refused.value.status_code == 401
    assert refused.value.body["kind"] == "malformed"  # the openai client unwraps the "error" object


async def test_api_key_required_everywhere_but_health(make_client):
    client = await make_client(api_key=KEY)
    assert (await client.get("/health")).status == 200
    for path in ("/v1/models", "/metrics", "/admin/api/metrics", "/-/plugins", "/nowhere"):
        response = await client.get(path)
        assert response.status == 401, path
        error = assert_envelope(await response.json(), "malformed")
        assert "AISTACK_API_KEY" in error["message"]
    for wrong in (f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"Bearer {KEY[:-1]}"):
        response = await client.get("/v1/models", headers={"Authorization": wrong})
        assert response.status == 401, wrong
        assert KEY not in await response.text()
    assert (await client.get("/v1/models", headers={"Authorization": f"bearer {KEY}"})).status == 200


async def test_api_key_never_logged_or_captured(make_client, tmp_path):
    client = await make_client(api_key=KEY, obs_access_log=True, obs_payload=True)
    for request_id, key in (("right-key", KEY), ("wrong-key", f"{KEY}-wrong")):
        response = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id})
        assert response.status == (200 if key == KEY else 401)
    observability = client.app[observability_key]
    while {"right-key", "wrong-key"} - {outcome.request_id for outcome in observability.metrics.recent()}:
        await asyncio.sleep(0.01)  # the server records a request a moment after the client has it
    for sink in (observability.access_log, observability.payloads):
        assert await asyncio.to_thread(sink.writer.wait_until_handled, 5.0)
    written = [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]
    written += [p for p in (tmp_path / "payloads").rglob("*") if p.is_file()]
    assert len(written) == 1 + 2 * 3  # the day's access log, two capture folders
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("host", "key", "warns"),
    [("0.0.0.0", None, True), ("192.168.1.20", None, True), ("gpu-box.lan", None, True),
     ("0.0.0.0", KEY, False), ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False)],
)
def test_warns_when_exposed_without_a_key(host, key, warns, caplog):
    caplog.set_level(logging.WARNING, logger="aistack.security")
    assert warn_if_exposed(Config(host=host, api_key=key)) is warns
    messages = [r.getMessage() for r in caplog.records if r.name == "aistack.security"]
    assert len(messages) == int(warns)
    if warns:
        assert host in messages[0] and "AISTACK_API_KEY" in messages[0]
