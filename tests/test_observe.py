"""Observability over real HTTP: metrics by class, Prometheus text, access log, payload capture, logging."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import attrs
import numpy as np
import pytest
from aiohttp import web

from aistack_core import ModelCard, hookimpl
from aistack_core.observe.access_log import AccessLog
from aistack_core.observe.capture import PayloadStore
from aistack_core.observe.record import Measured, RequestOutcome
from aistack_core.cli import configure_logging
from aistack_core.observe.middleware import observability_key, observe_middleware
from aistack_core.observe.record import current_request_id

from .helpers import BackendPlugin, SlowAsr, tone_wav
from .test_core import assert_envelope, form


class SineTts:
    """An in-process TTS test backend: ``pieces`` chunks of a 440 Hz tone."""

    def __init__(self, model_id: str = "sine-tts", pieces: int = 3, piece_s: float = 0.2) -> None:
        self.card = ModelCard(id=model_id, capabilities=("tts",), owned_by="tests", provider="SineTTS",
                              supports_streaming=True)
        self.voices = ("tone",)
        self.default_voice = "tone"
        self.sample_rate = 16000
        self.native_speed = True
        self.pieces, self.piece_s = pieces, piece_s

    def load(self):
        return object()

    def synthesize(self, model, options, cancel):
        t = np.arange(int(self.sample_rate * self.piece_s)) / self.sample_rate
        for _ in range(self.pieces):
            cancel.raise_if_cancelled()
            yield (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)


class TtsPlugin:
    def __init__(self, backend) -> None:
        self.backend = backend

    @hookimpl
    def register_tts_backends(self, register, config):
        register(self.backend)


def utc_today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


async def admin_metrics(client) -> dict:
    response = await client.get("/admin/api/metrics", params={"recent": "100"})
    assert response.status == 200
    return await response.json()


async def prometheus_samples(client) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families  # the optional `observe` extra

    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):  # raises on malformed exposition
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def eventually(predicate, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def flush(client, *request_ids: str) -> None:
    """Wait until these requests were recorded (the server finishes a moment after the
    client has the last byte), then until the writer threads wrote everything queued."""
    observability = client.app[observability_key]

    async def recorded():
        seen = {outcome.request_id for outcome in observability.metrics.recent()}
        return seen.issuperset(request_ids)

    assert await eventually(recorded)
    for sink in (observability.access_log, observability.payloads):
        if sink is not None:
            assert await asyncio.to_thread(sink.writer.wait_until_handled, 5.0)


# --- metrics --------------------------------------------------------------------


async def test_metrics_move_for_every_class(make_client, tmp_path):
    ok = SlowAsr("slow-asr", steps=2, step_s=0.05)
    broken = SlowAsr("bad-asr", fail_with=RuntimeError("boom"))
    holder = SlowAsr("hold-asr", steps=100, step_s=0.1)
    client = await make_client(plugins={"asr": BackendPlugin(ok, broken, holder)})
    wav = tone_wav(tmp_path / "tone.wav", seconds=1.0)
    url = "/v1/audio/transcriptions"

    assert (await client.post(url, data=form(wav, model="slow-asr"))).status == 200
    assert (await client.post(url, data=form(wav, model="no-such-model"))).status == 400
    assert (await client.post(url, data=form(wav, model="bad-asr"))).status == 500

    # hold-asr streams and keeps the slot; meanwhile another request is shed.
    stream = await client.post(url, data=form(wav, model="hold-asr", stream="true"))
    await stream.content.readline()
    busy = await client.post(url, data=form(wav, model="slow-asr"))
    assert busy.status == 503 and busy.headers["Retry-After"] == "5"
    assert_envelope(await busy.json(), "network")
    during = await admin_metrics(client)
    assert during["slot"]["busy"] is True and during["slot"]["model"] == "hold-asr"
    samples = await prometheus_samples(client)
    assert samples[("aistack_slot_busy", frozenset())] == 1
    assert samples[("aistack_slot_holder", frozenset({("capability", "asr"), ("model", "hold-asr")}))] == 1
    stream.close()  # the client hangs up mid-transcription

    async def disconnect_counted():
        body = await admin_metrics(client)
        return body["metrics"]["capabilities"]["asr"]["totals"]["by_class"].get("client-disconnect")

    assert await eventually(disconnect_counted) == 1
    body = await admin_metrics(client)
    asr = body["metrics"]["capabilities"]["asr"]
    assert asr["totals"]["by_class"] == {"2xx": 1, "4xx": 1, "5xx": 1, "503-busy": 1, "client-disconnect": 1}
    assert asr["window"]["requests"] == 5
    models = asr["models"]
    assert models["slow-asr"]["totals"]["by_class"] == {"2xx": 1, "503-busy": 1}
    assert models["bad-asr"]["totals"]["by_class"] == {"5xx": 1}
    assert models["hold-asr"]["totals"]["by_class"] == {"client-disconnect": 1}
    served = models["slow-asr"]["window"]
    assert served["latency_ms"]["p50"] > 0 and served["latency_ms"]["p99"] >= served["latency_ms"]["p50"]
    assert served["slot_wait_ms"]["p50"] is not None
    assert served["audio_sec"] == pytest.approx(1.0, abs=0.01)  # only the served request's audio counts
    assert 0 < served["rtf"]["p50"] < 5
    assert body["slot"]["busy"] is False and body["slot"]["busy_rejections"] == 1
    assert {m["key"] for m in body["loaded_models"]} >= {"asr:slow-asr", "asr:hold-asr"}
    recent = [r for r in body["metrics"]["recent"] if r["capability"] == "asr"]  # newest first
    assert [r["class"] for r in recent] == ["client-disconnect", "503-busy", "5xx", "4xx", "2xx"]
    assert recent[0]["model"] == "hold-asr" and recent[0]["stream"] is True

    samples = await prometheus_samples(client)

    def requests(model: str, outcome_class: str) -> float:
        key = ("aistack_requests_total",
               frozenset({("capability", "asr"), ("model", model), ("class", outcome_class)}))
        return samples.get(key, 0)

    assert requests("slow-asr", "2xx") == 1 and requests("slow-asr", "503-busy") == 1
    assert requests("bad-asr", "5xx") == 1 and requests("hold-asr", "client-disconnect") == 1
    assert requests("unknown", "4xx") == 1  # the unknown model never resolved: no label of its own
    slow = frozenset({("capability", "asr"), ("model", "slow-asr")})
    assert samples[("aistack_request_duration_seconds_count", slow)] == 2
    assert samples[("aistack_slot_wait_seconds_count", slow)] == 1
    assert samples[("aistack_audio_seconds_total", slow)] == pytest.approx(1.0, abs=0.01)
    assert samples[("aistack_realtime_factor_count", slow)] == 1
    assert samples[("aistack_slot_busy", frozenset())] == 0
    assert samples[("aistack_slot_busy_rejections_total", frozenset())] == 1
    assert samples[("aistack_model_loaded", frozenset({("model", "slow-asr"), ("category", "asr")}))] == 1
    gateway = frozenset({("capability", "gateway"), ("model", "unknown"), ("class", "2xx")})
    assert samples[("aistack_requests_total", gateway)] >= 2  # the admin and metrics reads themselves


async def test_in_process_tts_reports_audio_and_rtf(make_client):
    client = await make_client(plugins={"tts": TtsPlugin(SineTts(pieces=3, piece_s=0.2))})
    response = await client.post("/v1/audio/speech", json={
        "model": "sine-tts", "input": "Hello there.", "response_format": "wav", "cache": False,
    })
    assert response.status == 200
    await response.read()
    model = (await admin_metrics(client))["metrics"]["capabilities"]["tts"]["models"]["sine-tts"]
    assert model["totals"]["by_class"] == {"2xx": 1}
    assert model["totals"]["audio_sec"] == pytest.approx(0.6, abs=0.01)
    assert model["window"]["rtf"]["p50"] > 0
    assert model["totals"]["bytes_out"] > 0.6 * 16000 * 2  # the WAV went out


async def test_prometheus_is_optional(make_client, monkeypatch):
    client = await make_client()
    # As if prometheus-client were not installed: importing it fails.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    response = await client.get("/metrics")
    assert response.status == 503
    error = assert_envelope(await response.json(), "network")
    assert "aistack[observe]" in error["message"]
    assert (await admin_metrics(client))["metrics"]["capabilities"]["gateway"]


async def test_switched_off(make_client):
    client = await make_client(obs_metrics=False, obs_access_log=False, obs_payload=False)
    assert not client.app[observability_key].records  # nothing per request but the id
    response = await client.get("/metrics")
    assert response.status == 503
    assert "AISTACK_OBS_METRICS" in assert_envelope(await response.json(), "network")["message"]
    body = await admin_metrics(client)
    assert body["metrics"] is None and body["access_log"] is None and body["slot"]["busy"] is False
    health = await client.get("/health", headers={"X-Request-ID": "still-echoed"})
    assert health.headers["X-Request-ID"] == "still-echoed"


# --- access log -----------------------------------------------------------------


async def test_access_log_lines_carry_request_fields(make_client, tmp_path):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr("slow-asr", steps=2, step_s=0.05))},
                               obs_access_log=True)
    wav = tone_wav(tmp_path / "tone.wav", seconds=1.0)
    response = await client.post("/v1/audio/transcriptions", data=form(wav, model="slow-asr"),
                                 headers={"X-Request-ID": "trace-asr-1", "Authorization": "Bearer not-logged"})
    assert response.status == 200
    assert (await client.get("/nowhere", headers={"X-Request-ID": "trace-404"})).status == 404
    probe = await client.get("/health", headers={"X-Request-ID": "probe"})
    assert probe.headers["X-Request-ID"] == "probe"
    await flush(client, "trace-asr-1", "trace-404")
    path = tmp_path / "logs" / f"access-{utc_today()}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    asr = by_id["trace-asr-1"]
    assert asr["method"] == "POST" and asr["path"] == "/v1/audio/transcriptions"
    assert asr["status"] == 200 and asr["class"] == "2xx"
    assert (asr["capability"], asr["model"], asr["provider"]) == ("asr", "slow-asr", "SlowASR")
    assert asr["latency_ms"] > 0 and asr["slot_wait_ms"] is not None and asr["client"] == "127.0.0.1"
    assert asr["audio_sec"] == pytest.approx(1.0, abs=0.01) and asr["rtf"] > 0
    assert asr["stream"] is False and asr["response_format"] == "json"
    assert asr["ts"].startswith(utc_today()) and asr["ts"].endswith("Z")
    missing = by_id["trace-404"]
    assert (missing["status"], missing["class"], missing["capability"]) == (404, "4xx", "gateway")
    assert "not-logged" not in path.read_text()
    assert "probe" not in by_id  # liveness probes are not logged


async def test_blocked_log_disk_never_stalls_requests(make_client, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    fifo = logs / f"access-{utc_today()}.jsonl"
    os.mkfifo(fifo)  # opening it for writing blocks until a reader comes: a disk that hangs
    client = await make_client(obs_access_log=True)
    access_log = client.app[observability_key].access_log
    started = time.monotonic()
    slowest = 0.0
    for _ in range(100):
        before = time.monotonic()
        assert (await client.get("/v1/models")).status == 200
        slowest = max(slowest, time.monotonic() - before)
    assert slowest < 0.5 and time.monotonic() - started < 5
    assert access_log.written == 0  # the writer thread is stuck in open()

    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()  # the disk comes back
    await client.close()  # shutdown writes what was queued
    await asyncio.to_thread(reader.join, 5)
    lines = received[0].decode().splitlines()
    assert len(lines) == 100 and all(json.loads(line)["path"] == "/v1/models" for line in lines)
    assert access_log.dropped == 0


async def test_full_log_disk_loses_records_with_one_warning(make_client, tmp_path, caplog):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / f"access-{utc_today()}.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    client = await make_client(obs_access_log=True)
    for batch in range(3):
        ids = [f"full-{batch}-{number}" for number in range(10)]
        for request_id in ids:
            assert (await client.get("/v1/models", headers={"X-Request-ID": request_id})).status == 200
        await flush(client, *ids)
    access_log = client.app[observability_key].access_log
    assert access_log.failed == 30 and access_log.written == 0
    warnings = [r for r in caplog.records if r.name == "aistack.access_log" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()


def _outcome(number: int) -> RequestOutcome:
    return RequestOutcome(
        started_at=time.time(), request_id=f"r{number}", method="GET", path="/health", status=200,
        outcome_class="2xx", capability="gateway", model="", provider=None, latency_s=0.001,
        slot_wait_s=None, client="127.0.0.1", bytes_in=0, bytes_out=10,
    )


async def test_metrics_readers_see_every_finished_request_at_once(make_client, monkeypatch):
    """Finished requests wait a moment to be recorded in a batch; a reader must never see that."""
    from aistack_core.observe import middleware

    monkeypatch.setattr(middleware, "RECORD_AFTER_S", 3600.0)  # the batch would come only much later
    client = await make_client()
    ids = [f"at-once-{number}" for number in range(3)]
    for request_id in ids:
        assert (await client.get("/v1/models", headers={"X-Request-ID": request_id})).status == 200
    body = await (await client.get("/admin/api/metrics?recent=10")).json()
    assert [entry["request_id"] for entry in body["metrics"]["recent"][:3]] == ids[::-1]  # newest first
    assert body["metrics"]["capabilities"]["gateway"]["totals"]["by_class"]["2xx"] == 3
    assert (await client.get("/v1/models")).status == 200
    text = await (await client.get("/metrics")).text()
    counted = sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("aistack_requests_total{") and 'capability="gateway"' in line
    )
    assert counted == 5  # three, the metrics read, one more: all there before the scrape itself


async def test_access_log_keeps_the_last_requests_at_shutdown(make_client, monkeypatch, tmp_path):
    from aistack_core.observe import middleware

    monkeypatch.setattr(middleware, "RECORD_AFTER_S", 3600.0)
    client = await make_client(obs_access_log=True)
    ids = [f"last-{number}" for number in range(4)]
    for request_id in ids:
        assert (await client.get("/v1/models", headers={"X-Request-ID": request_id})).status == 200
    await client.close()  # the app's cleanup: the waiting batch, then the writer thread's last write
    lines = (tmp_path / "logs" / f"access-{utc_today()}.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ids


def test_recent_requests_come_back_whole_from_their_rows():
    outcome = attrs.evolve(_outcome(7), measured=Measured(audio_sec=1.5, cache="HIT", stream=False))
    assert RequestOutcome.from_row(outcome.to_row()) == outcome


@pytest.mark.parametrize("limit", ["lines", "size"])
def test_access_log_queue_full_drops_and_counts(tmp_path, caplog, limit):
    fifo = tmp_path / f"access-{utc_today()}.jsonl"
    os.mkfifo(fifo)
    if limit == "lines":
        outcomes = [_outcome(number) for number in range(21)]
        access_log = AccessLog(tmp_path, max_pending=5, wake_every_s=0.01)
    else:  # a client's path of odd characters makes a line of tens of KB: six of them (one being written) fill the queue
        outcomes = [attrs.evolve(_outcome(number), path="/\u00e9" * 4000) for number in range(21)]
        line_chars = len(outcomes[1].to_json_line())
        assert line_chars > 25_000
        access_log = AccessLog(tmp_path, max_pending_chars=int(6.5 * line_chars), wake_every_s=0.01)
    access_log.start()
    access_log.submit(outcomes[0])
    time.sleep(0.2)  # the thread took that record and now hangs opening the file
    started = time.monotonic()
    for outcome in outcomes[1:]:
        access_log.submit(outcome)
    assert time.monotonic() - started < 0.1  # submitting never waits
    assert access_log.dropped == 15 and access_log.writer.pending == 5
    warnings = [r for r in caplog.records if r.name == "aistack.access_log" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropping records" in warnings[0].getMessage()
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    assert access_log.stop(5)
    reader.join(5)
    ids = [json.loads(line)["request_id"] for line in received[0].decode().splitlines()]
    assert ids == ["r0", "r1", "r2", "r3", "r4", "r5"]  # kept in order; the overflow was dropped


# --- payload capture --------------------------------------------------------------


def test_capture_body_chunks_are_bounded_by_the_bytes_waiting(tmp_path):
    store = PayloadStore(tmp_path, max_bytes=10**9, max_age_s=3600, request_cap_bytes=10**6, max_pending_bytes=10_000)
    capture = store.begin("budget", time.time())  # the thread is not started: nothing leaves the queue
    accepted = [store.queue_bytes(capture, "req.bin", b"x" * 3000) for _ in range(4)]
    assert accepted == [True, True, True, False] and store.writer.pending_size == 9000

SECRETS = {
    "Authorization": "Bearer sekrit-one",
    "Cookie": "session=sekrit-two",
    "X-Api-Key": "sekrit-three",
    "Proxy-Authorization": "Basic sekrit-four",
}


def capture_folder(tmp_path: Path, request_id: str) -> Path:
    return tmp_path / "payloads" / utc_today() / request_id


async def test_capture_writes_three_files_and_redacts(make_client, tmp_path):
    client = await make_client(plugins={"tts": TtsPlugin(SineTts())}, obs_payload=True)
    request_body = json.dumps({"model": "sine-tts", "input": "Hello.", "response_format": "wav", "cache": False})
    response = await client.post("/v1/audio/speech", data=request_body, headers={
        **SECRETS, "Content-Type": "application/json", "X-Request-ID": "cap-1",
    })
    assert response.status == 200
    response_body = await response.read()
    await flush(client, "cap-1")
    folder = capture_folder(tmp_path, "cap-1")
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "req.bin", "resp.bin"]
    assert (folder / "req.bin").read_bytes() == request_body.encode()
    assert (folder / "resp.bin").read_bytes() == response_body
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["method"], meta["path"], meta["route"], meta["status"]) == (
        "POST", "/v1/audio/speech", "/v1/audio/speech", 200)
    assert (meta["capability"], meta["model"], meta["provider"]) == ("tts", "sine-tts", "SineTTS")
    for name in SECRETS:
        assert meta["request"]["headers"][name] == "[redacted]"
    assert meta["request"]["content_type"] == "application/json"
    assert meta["response"]["content_type"] == "audio/wav"
    assert meta["response"]["headers"]["X-Request-ID"] == "cap-1"
    assert meta["request"]["truncated"] is False and meta["response"]["truncated"] is False
    assert meta["response"]["bytes"] == len(response_body) and meta["incomplete"] is False
    assert meta["timing"]["latency_ms"] > 0 and meta["timing"]["slot_wait_ms"] is not None
    for path in folder.iterdir():
        assert b"sekrit" not in path.read_bytes()


async def test_capture_respects_the_per_request_cap(make_client, tmp_path):
    client = await make_client(plugins={"tts": TtsPlugin(SineTts())}, obs_payload=True,
                               obs_payload_request_cap_kb=1)
    request_body = json.dumps({"model": "sine-tts", "input": "word " * 400, "response_format": "wav",
                               "cache": False}).encode()
    response = await client.post("/v1/audio/speech", data=request_body,
                                 headers={"Content-Type": "application/json", "X-Request-ID": "cap-2"})
    response_body = await response.read()
    await flush(client, "cap-2")
    folder = capture_folder(tmp_path, "cap-2")
    assert (folder / "req.bin").read_bytes() == request_body[:1024]
    assert (folder / "resp.bin").read_bytes() == response_body[:1024]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["request"] | {"headers": None} == {
        "headers": None, "content_type": "application/json", "bytes": len(request_body),
        "captured_bytes": 1024, "truncated": True, "body_captured": True,
    }
    assert meta["response"]["bytes"] == len(response_body) and meta["response"]["truncated"] is True


async def test_capture_tees_a_streamed_response(make_client, tmp_path):
    client = await make_client(plugins={"tts": TtsPlugin(SineTts(pieces=4))}, obs_payload=True)
    response = await client.post("/v1/audio/speech", headers={"X-Request-ID": "cap-stream"}, json={
        "model": "sine-tts", "input": "One. Two.", "response_format": "pcm", "stream": True, "cache": False,
    })
    assert response.status == 200
    chunks = [chunk async for chunk in response.content.iter_any()]
    await flush(client, "cap-stream")
    folder = capture_folder(tmp_path, "cap-stream")
    streamed = b"".join(chunks)
    assert len(streamed) == 4 * 0.2 * 24000 * 2  # pcm is OpenAI's 24 kHz, whatever the voice's rate
    assert (folder / "resp.bin").read_bytes() == streamed
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["response"]["bytes"] == len(streamed) and meta["response"]["note"] is None
    assert meta["outcome"]["stream"] is True


async def test_capture_sweeps_old_folders_at_startup(make_client, tmp_path):
    old = tmp_path / "payloads" / "2000-01-01" / "ancient"
    old.mkdir(parents=True)
    (old / "meta.json").write_text("{}")
    past = time.time() - 100 * 3600
    for path in (old / "meta.json", old):
        os.utime(path, (past, past))
    client = await make_client(obs_payload=True, obs_payload_max_age_h=72)
    await flush(client)
    assert not old.exists() and not old.parent.exists()
    assert client.app[observability_key].payloads.swept_folders == 1


def test_capture_size_limit_removes_oldest_first(tmp_path):
    store = PayloadStore(tmp_path, max_bytes=3000, max_age_s=3600, request_cap_bytes=1024)
    now = time.time()
    for number in range(5):
        folder = tmp_path / utc_today() / f"req-{number}"
        folder.mkdir(parents=True)
        (folder / "resp.bin").write_bytes(b"x" * 1000)
        stamp = now - 100 + number  # req-0 is the oldest
        os.utime(folder / "resp.bin", (stamp, stamp))
        os.utime(folder, (stamp, stamp))
    assert store.sweep(now=now) == 2
    assert sorted(p.name for p in (tmp_path / utc_today()).iterdir()) == ["req-2", "req-3", "req-4"]
    assert store.sweep(now=now + 7200) == 3  # all past the age limit now
    assert not (tmp_path / utc_today()).exists()


# --- logging --------------------------------------------------------------------


@contextlib.contextmanager
def root_logging_restored():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_json_log_lines_carry_the_request_id(make_client, tmp_path, capsys):
    client = await make_client(plugins={"asr": BackendPlugin(SlowAsr("bad-asr", fail_with=RuntimeError("boom")))})
    wav = tone_wav(tmp_path / "tone.wav")
    with root_logging_restored():
        configure_logging("json")
        response = await client.post("/v1/audio/transcriptions", data=form(wav, model="bad-asr"),
                                     headers={"X-Request-ID": "log-me-1"})
        assert response.status == 500
        token = current_request_id.set("outside")
        logging.getLogger("aistack.test").warning("plain line")
        current_request_id.reset(token)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    failure = next(line for line in lines if line["logger"] == "aistack.errors")
    assert failure["request_id"] == "log-me-1" and failure["level"] == "ERROR" and "boom" in failure["exc"]
    plain = next(line for line in lines if line["logger"] == "aistack.test")
    assert plain == {"ts": plain["ts"], "level": "WARNING", "logger": "aistack.test", "request_id": "outside",
                     "message": "plain line"}
    with pytest.raises(ValueError):
        configure_logging("xml")


async def test_proxied_stream_is_counted_and_captured(base_config, plugin_set):
    """Chat through the Ollama emulator: relayed bytes in the metrics, the SSE stream in resp.bin."""
    import aistack_plugins.ollama

    from aistack_core.app import create_app

    from .upstreams import run_gateway
    from .upstreams.ollama import OllamaEmulator

    emulator = OllamaEmulator()
    async with emulator.running():
        plugin_set.register(aistack_plugins.ollama, name="ollama")
        config = attrs.evolve(base_config, env={"AISTACK_OLLAMA_URL": emulator.url}, obs_payload=True)
        async with run_gateway(create_app(config, plugins=plugin_set)) as client:
            request_body = json.dumps({"model": "qwen3:4b", "stream": True,
                                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
            async with client.post("/v1/chat/completions", data=request_body, headers={
                "Content-Type": "application/json", "X-Request-ID": "chat-1",
            }) as response:
                assert response.status == 200
                streamed = await response.read()
            assert streamed.rstrip().endswith(b"data: [DONE]")
            await flush(client, "chat-1")
            folder = capture_folder(Path(config.obs_payload_dir).parent, "chat-1")
            assert (folder / "resp.bin").read_bytes() == streamed
            sent = json.loads((folder / "req.bin").read_bytes())
            assert sent["messages"] == [{"role": "user", "content": "Hi"}]
            meta = json.loads((folder / "meta.json").read_text())
            assert meta["response"]["content_type"].startswith("text/event-stream")
            llm = (await admin_metrics(client))["metrics"]["capabilities"]["llm"]["models"]["qwen3:4b"]
            assert llm["totals"]["by_class"] == {"2xx": 1}
            assert llm["totals"]["bytes_out"] == len(streamed)  # what the proxy relayed
            assert llm["totals"]["bytes_in"] == len(request_body)


async def test_upstream_body_tees_a_streamed_request(base_config, plugin_set):
    from aistack_core.app import create_app
    from aistack_core.observe.capture import upstream_body

    from .upstreams import run_gateway

    async def relay(request):  # stands in for proxy code forwarding the body
        received = 0
        async for chunk in upstream_body(request):
            received += len(chunk)
        return web.json_response({"received": received})

    app = create_app(attrs.evolve(base_config, obs_payload=True), plugins=plugin_set)
    app.router.add_post("/relay", relay)
    parts = [bytes([n]) * 40_000 for n in range(5)]

    async def body():
        for part in parts:
            yield part

    async with run_gateway(app) as client:
        async with client.post("/relay", data=body(), headers={"X-Request-ID": "relay-1"}) as response:
            assert (await response.json())["received"] == 200_000
        await flush(client, "relay-1")
        folder = capture_folder(Path(base_config.obs_payload_dir).parent, "relay-1")
        assert (folder / "req.bin").read_bytes() == b"".join(parts)


async def test_capture_store_stays_under_its_size_limit(make_client, tmp_path):
    client = await make_client(plugins={"tts": TtsPlugin(SineTts(pieces=40))}, obs_payload=True,
                               obs_payload_max_mb=1, obs_payload_request_cap_kb=512)
    ids = [f"big-{n}" for n in range(6)]
    for request_id in ids:
        response = await client.post("/v1/audio/speech", headers={"X-Request-ID": request_id}, json={
            "model": "sine-tts", "input": "Long tone.", "response_format": "wav", "cache": False,
        })
        assert len(await response.read()) > 250_000
    await flush(client, *ids)
    store = client.app[observability_key].payloads
    assert store.writer.offer(("sweep", None, None))  # one more pass, on the writer thread as always
    assert await asyncio.to_thread(store.writer.wait_until_handled, 5.0)
    day = tmp_path / "payloads" / utc_today()
    kept = sorted(p.name for p in day.iterdir())
    total = sum(f.stat().st_size for f in day.rglob("*") if f.is_file())
    assert total <= 1024 * 1024
    assert kept == ids[-len(kept):] and 2 <= len(kept) < len(ids)  # the newest survive
    assert store.swept_folders == len(ids) - len(kept)


def test_access_line_is_valid_json_for_awkward_values():
    measured = Measured(audio_sec=2.0, stream=True, rtf=float("nan"), requested_model="\ud800 lone surrogate")
    outcome = attrs.evolve(
        _outcome(1), path='/v1/"quoted"\\path', model="modèle\n", provider=None, slot_wait_s=0.25, measured=measured,
    )
    line = outcome.to_json_line()
    assert "\n" not in line and line.isascii()  # any file encoding can hold it
    record = json.loads(line)
    assert record["path"] == '/v1/"quoted"\\path' and record["model"] == "modèle\n"
    assert record["status"] == 200 and record["slot_wait_ms"] == 250.0
    assert record["audio_sec"] == 2.0 and record["stream"] is True and record["rtf"] is None
    assert record["requested_model"] == "\ud800 lone surrogate"


async def test_capture_keeps_an_uploaded_audio_file(make_client, tmp_path):
    from .helpers import BackendPlugin, SlowAsr, tone_wav
    from .test_core import form

    wav = tone_wav(tmp_path / "tone.wav")
    client = await make_client(plugins={"slow": BackendPlugin(SlowAsr(steps=1, step_s=0.01))}, obs_payload=True)
    response = await client.post("/v1/audio/transcriptions", data=form(wav, model="slow-asr"),
                                 headers={"X-Request-ID": "cap-asr"})
    assert response.status == 200
    await flush(client, "cap-asr")
    captured = (capture_folder(tmp_path, "cap-asr") / "req.bin").read_bytes()
    assert wav.read_bytes() in captured  # the multipart body, file part included
