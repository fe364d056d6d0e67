"""The gateway core over real HTTP: health, plugins, slot, envelope, request ids, /v1/models."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import pytest

from aistack_core import ModelCard, Upstream, __version__, hookimpl
from aistack_core.errors import ENVELOPE_KINDS
from aistack_core.plugins import load_plugins
from aistack_core.registry import Registry
from aistack_core.config import Config

from .helpers import BackendPlugin, SlowAsr, tone_wav


def assert_envelope(body: dict, kind: str) -> dict:
    assert set(body) == {"error"}, body
    error = body["error"]
    # The contract's three fields, plus OpenAI's type, code and param.
    assert set(error) == {"kind", "provider", "message", "type", "code", "param"}
    assert error["kind"] == kind and kind in ENVELOPE_KINDS
    assert isinstance(error["type"], str) and isinstance(error["code"], str) and error["code"]
    assert error["message"] and "Traceback" not in error["message"]
    return error


async def test_health_get_and_head(make_client):
    client = await make_client()
    response = await client.get("/health")
    assert response.status == 200
    body = await response.json()
    assert (body["status"], body["version"]) == ("ok", __version__)  # the contract; load fields are additive
    head = await client.head("/health")
    assert head.status == 200 and await head.read() == b""


async def test_models_empty_without_plugins(make_client):
    client = await make_client()
    body = await (await client.get("/v1/models")).json()
    assert body == {"object": "list", "data": []}


async def test_models_lists_registered_backend_and_auto(make_client):
    client = await make_client(plugins={"slow": BackendPlugin(SlowAsr(streaming=False))})
    data = (await (await client.get("/v1/models")).json())["data"]
    by_id = {entry["id"]: entry for entry in data}
    assert by_id["auto"]["is_routing_alias"] is True and "languages" not in by_id["auto"]
    assert by_id["auto"]["supports_streaming"] is False  # AND over the pool
    entry = by_id["slow-asr"]
    assert entry["object"] == "model" and entry["capabilities"] == ["asr"] and entry["languages"] == ["en"]
    assert entry["is_routing_alias"] is False


# --- plugins -----------------------------------------------------------------


def write_distribution(root, dist: str, modules: dict[str, str]) -> None:
    """A minimal installed distribution on ``root`` with entry points in group aistack."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    # Installers write the name with underscores; a hyphen would end the name early.
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    entry_points = "\n".join(f"{name} = {name}" for name in modules)
    (info / "entry_points.txt").write_text(f"[aistack]\n{entry_points}\n")


GOOD_PLUGIN = """
    from aistack_core import hookimpl, ModelCard, Transcription

    class Backend:
        card = ModelCard(id="good-asr", capabilities=("asr",), owned_by="tests", provider="Good")
        def load(self):
            return None
        def transcribe(self, model, audio, options, cancel):
            return Transcription(language="en", duration=audio.duration, segments=[])

    @hookimpl
    def register_asr_backends(register, config):
        register(Backend())
"""


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    write_distribution(tmp_path, "aistack-test-plugins", {
        "tp_good": GOOD_PLUGIN,
        "tp_broken": "raise RuntimeError('this plugin is broken on purpose')\n",
        "tp_typo": """
            from aistack_core import hookimpl
            @hookimpl
            def register_asr_backend(register, config):
                pass
        """,
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    return ("tp_good", "tp_broken", "tp_typo")


def test_failing_plugins_are_skipped_not_fatal(third_party):
    plugins = load_plugins(allow=third_party)
    records = {r["name"]: r for r in plugins.listing()}
    assert records["tp_good"]["status"] == "loaded"
    assert records["tp_good"]["distribution"] == "aistack-test-plugins" and records["tp_good"]["version"] == "1.0"
    assert records["tp_broken"]["status"] == "skipped"
    assert "RuntimeError: this plugin is broken on purpose" in records["tp_broken"]["error"]
    assert records["tp_typo"]["status"] == "skipped" and "register_asr_backend" in records["tp_typo"]["error"]


async def test_server_serves_with_a_broken_plugin(third_party, aiohttp_client, base_config):
    from aistack_core.app import create_app
    import attrs

    app = create_app(attrs.evolve(base_config, load_plugins=third_party))
    client = await aiohttp_client(app)
    listing = {p["name"]: p for p in (await (await client.get("/-/plugins")).json())["plugins"]}
    assert listing["tp_broken"]["status"] == "skipped"
    assert listing["tp_good"]["registered"] == ["asr:good-asr"]
    ids = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert "good-asr" in ids


def test_allow_list(third_party):
    none = load_plugins(allow=())
    assert all(r.status == "disabled" for r in none.records.values())
    only_good = load_plugins(allow=["tp_good"])
    assert only_good.records["tp_good"].status == "loaded"
    assert only_good.records["tp_broken"].status == "disabled"
    assert Config.from_env({"AISTACK_LOAD_PLUGINS": ""}).load_plugins == ()
    assert Config.from_env({"AISTACK_LOAD_PLUGINS": "a, b"}).load_plugins == ("a", "b")
    assert Config.from_env({}).load_plugins is None


def test_duplicate_model_id_names_both_plugins(plugin_set):
    plugin_set.register(BackendPlugin(SlowAsr("same-id")), name="first")
    plugin_set.register(BackendPlugin(SlowAsr("same-id")), name="second")
    registry = Registry.from_plugins(plugin_set, Config())
    assert list(registry.asr) == ["same-id"] and registry.asr["same-id"].plugin == "first"
    record = plugin_set.records["second"]
    assert record.status == "skipped"
    assert "'first'" in record.error and "'second'" in record.error


def test_cli_plugins_table_and_json(third_party, tmp_path):
    env = {"PYTHONPATH": str(tmp_path), "AISTACK_LOAD_PLUGINS": ",".join(third_party), "PATH": "/usr/bin:/bin"}
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "aistack_core", "plugins", *args], env=env, capture_output=True, text=True, timeout=60
    )
    as_json = run("--json")
    assert as_json.returncode == 0, as_json.stderr
    records = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert records["tp_good"]["registered"] == ["asr:good-asr"]
    assert records["tp_broken"]["status"] == "skipped"
    table = run()
    assert table.returncode == 0
    assert "tp_broken" in table.stdout and "skipped" in table.stdout and "broken on purpose" in table.stdout


# --- the GPU slot ---------------------------------------------------------------


def form(path, **fields):
    import aiohttp

    data = aiohttp.FormData()
    data.add_field("file", open(path, "rb"), filename=path.name, content_type="audio/wav")
    for key, value in fields.items():
        data.add_field(key, str(value))
    return data


async def test_fifty_concurrent_requests_one_runs(make_client, tmp_path):
    backend = SlowAsr(steps=4, step_s=0.25)
    client = await make_client(plugins={"slow": BackendPlugin(backend)})
    wav = tone_wav(tmp_path / "tone.wav")

    async def call():
        response = await client.post("/v1/audio/transcriptions", data=form(wav, model="slow-asr"))
        return response.status, dict(response.headers), await response.json()

    results = await asyncio.gather(*(call() for _ in range(50)))
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    assert len(ok) == 1 and len(busy) == 49
    assert ok[0][2]["text"] == "part 0. part 1. part 2. part 3."
    for status, headers, body in busy:
        assert headers["Retry-After"] == "5"
        error = assert_envelope(body, "network")
        assert error["provider"] == "aistack" and "slow-asr" in error["message"]
    assert client.app[__import__("aistack_core.context", fromlist=["slot_key"]).slot_key].is_free
    again = await client.post("/v1/audio/transcriptions", data=form(wav, model="slow-asr"))
    assert again.status == 200


async def test_slot_wait_option_queues_instead(make_client, tmp_path):
    client = await make_client(plugins={"slow": BackendPlugin(SlowAsr(steps=2, step_s=0.1))}, slot_wait_s=5.0)
    wav = tone_wav(tmp_path / "tone.wav")
    statuses = await asyncio.gather(
        *(client.post("/v1/audio/transcriptions", data=form(wav, model="slow-asr")) for _ in range(3))
    )
    assert [r.status for r in statuses] == [200, 200, 200]


async def test_slot_released_after_backend_error(make_client, tmp_path):
    from aistack_core.context import slot_key

    client = await make_client(plugins={"bad": BackendPlugin(SlowAsr(fail_with=RuntimeError("boom")))})
    wav = tone_wav(tmp_path / "tone.wav")
    response = await client.post("/v1/audio/transcriptions", data=form(wav, model="slow-asr"))
    assert response.status == 500
    error = assert_envelope(await response.json(), "unknown")
    assert "boom" not in error["message"]  # details go to the log, not the client
    assert client.app[slot_key].is_free


# --- the envelope ---------------------------------------------------------------


async def test_every_error_kind_status_and_shape(make_client, tmp_path):
    client = await make_client(plugins={"slow": BackendPlugin(SlowAsr())}, max_upload_mb=1)
    wav = tone_wav(tmp_path / "tone.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio" * 100)
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))

    cases = [
        (client.get("/no/such/path"), 404, "malformed"),
        (client.post("/health"), 405, "malformed"),
        (client.post("/v1/audio/transcriptions", data={"model": "slow-asr"}), 400, "malformed"),
        (client.post("/v1/audio/transcriptions", data=form(wav, model="nope")), 400, "malformed"),
        (client.post("/v1/audio/transcriptions", data=form(garbage, model="slow-asr")), 400, "malformed"),
        (client.post("/v1/audio/transcriptions", data=form(wav, model="slow-asr", response_format="xml")), 400, "malformed"),
        (client.post("/v1/audio/transcriptions", data=form(big, model="slow-asr")), 413, "overflow"),
        (client.post("/v1/audio/transcriptions", data=form(wav, model="parakeet")), 400, "malformed"),
    ]
    for call, status, kind in cases:
        response = await call
        assert response.status == status, (status, await response.text())
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.headers["X-Request-ID"]
        assert_envelope(await response.json(), kind)
    uploads = list((tmp_path / "uploads").iterdir())
    assert uploads == [], f"temp files leaked: {uploads}"


async def test_not_installed_backend_names_the_extra(make_client, tmp_path):
    client = await make_client(plugins={"slow": BackendPlugin(SlowAsr())})
    wav = tone_wav(tmp_path / "tone.wav")
    response = await client.post("/v1/audio/transcriptions", data=form(wav, model="sensevoice"))
    assert response.status == 400  # permanent until installed: OpenAI clients must not retry it
    error = assert_envelope(await response.json(), "malformed")
    assert "pip install 'aistack[sensevoice]'" in error["message"] and error["code"] == "model_not_installed"


# --- request ids ------------------------------------------------------------------


@pytest.mark.parametrize("supplied, kept", [
    ("trace-01:abc.DEF_9", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("has space", False),
    ("emoji-\u2603", False),
    ("", False),
])
async def test_request_id_accept_replace_echo(make_client, supplied, kept):
    client = await make_client()
    for path in ("/health", "/missing"):
        response = await client.get(path, headers={"X-Request-ID": supplied})
        echoed = response.headers["X-Request-ID"]
        if kept:
            assert echoed == supplied
        else:
            assert len(echoed) == 16 and int(echoed, 16) >= 0


# --- /v1/models with a hanging upstream ------------------------------------------------


class HangingUpstreamPlugin:
    def __init__(self, hang_s: float = 30.0):
        self.hang_s = hang_s
        self.probes = 0

    @hookimpl
    def register_upstreams(self, register, config):
        async def probe(session, base_url):
            self.probes += 1
            await asyncio.sleep(self.hang_s)
            return [ModelCard(id="never", capabilities=("llm",), owned_by="x", provider="X")]

        async def quick_probe(session, base_url):
            return [ModelCard(id="quick-llm", capabilities=("llm",), owned_by="x", provider="X", supports_streaming=True)]

        register(Upstream(name="hanging", capability="tts", base_url="http://127.0.0.1:9", provider="H",
                          routes=("/v1/audio/*",), probe=probe, unreachable_hint="-"))
        register(Upstream(name="quick", capability="llm", base_url="http://127.0.0.1:9", provider="Q",
                          routes=("/v1/chat/completions",), probe=quick_probe, unreachable_hint="-"))


async def test_models_fast_with_hanging_upstream(make_client):
    hanging = HangingUpstreamPlugin()
    client = await make_client(plugins={"slow": BackendPlugin(SlowAsr()), "up": hanging})
    for _ in range(3):
        started = time.monotonic()
        response = await client.get("/v1/models")
        elapsed = time.monotonic() - started
        ids = [entry["id"] for entry in (await response.json())["data"]]
        assert elapsed < 0.8, elapsed
        assert "slow-asr" in ids and "quick-llm" in ids and "never" not in ids
    assert hanging.probes == 1  # one probe in flight at a time, results cached
