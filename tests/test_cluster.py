"""The cluster path for real: the shipped nginx configuration in front of two gateway processes.

nginx (the system package) runs docker/cluster/nginx.conf on loopback, with
only the gateway addresses, the listen port and the log directory changed.
Each gateway is its own process (tests/cluster_node.py: ``aistack serve``
with a test ASR whose timing is fixed, and the real qwen3_tts plugin in
front of the vLLM-Omni emulator, also a process of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import aiohttp
import attrs
import pytest
import yaml

from aistack_core.context import slot_key
from aistack_core.load import DeviceLoad, device_load

from .nginx_runner import CLUSTER_DIR, ROOT, NginxMissing, start_nginx, stop, wait_port
from .upstreams import free_port
from .helpers import BackendPlugin, SlowAsr, tone_wav
from .upstreams.vllm_omni import synthesize

TRANSCRIBE = "/v1/audio/transcriptions"
ASR_STEPS, ASR_STEP_S = 10, 0.15  # each transcription holds its node's slot for about 1.5 s
TIMEOUT = aiohttp.ClientTimeout(total=30)


# --- the pieces -------------------------------------------------------------------------


def python_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


@attrs.define
class Node:
    name: str
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_node(workdir: Path, name: str, tts_url: str) -> Node:
    state = workdir / name
    for sub in ("uploads", "logs", "tts-cache", "payloads"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = python_env(
        AISTACK_PORT=str(port),
        AISTACK_UPLOAD_DIR=str(state / "uploads"),
        AISTACK_OBS_LOG_DIR=str(state / "logs"),
        AISTACK_TTS_CACHE_DIR=str(state / "tts-cache"),
        AISTACK_OBS_PAYLOAD_DIR=str(state / "payloads"),
        AISTACK_QWEN3_TTS_URL=tts_url,
        AISTACK_TEST_ASR_STEPS=str(ASR_STEPS),
        AISTACK_TEST_ASR_STEP_S=str(ASR_STEP_S),
    )
    log = open(state / "gateway.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "tests.cluster_node"], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    return Node(name, port, process)


@attrs.define
class Cluster:
    nodes: list[Node]
    nginx: subprocess.Popen
    port: int
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_line(self, request_id: str, timeout_s: float = 3.0) -> dict[str, str]:
        """nginx's access-log fields for the request with this id (nginx writes a line as a request ends)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.access_log.read_text().splitlines():
                if f"rid={request_id} " in line:
                    return dict(re.findall(r"(\w+)=(.*?)(?= \w+=|$)", line))
            if time.monotonic() > deadline:
                raise AssertionError(f"no nginx log line for {request_id}:\n{self.access_log.read_text()}")
            time.sleep(0.05)


@contextlib.contextmanager
def running_cluster(workdir: Path, gateways: int = 2) -> Iterator[Cluster]:
    tts_port = free_port()
    tts = subprocess.Popen([sys.executable, "-m", "tests.upstreams.vllm_omni", "--port", str(tts_port)], cwd=ROOT,
                           env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes: list[Node] = []
    nginx = None
    try:
        nodes = [start_node(workdir, f"gateway-{i}", f"http://127.0.0.1:{tts_port}") for i in range(gateways)]
        wait_port(tts_port, tts, "the vLLM-Omni emulator")
        for node in nodes:
            wait_port(node.port, node.process, node.name)
        try:
            nginx, port, access_log = start_nginx(workdir, [node.address for node in nodes])
        except NginxMissing as missing:
            pytest.fail(str(missing))
        yield Cluster(nodes, nginx, port, access_log)
    finally:
        if nginx is not None:
            stop(nginx, signal.SIGQUIT)
        for process in [node.process for node in nodes] + [tts]:
            stop(process)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


def upload(wav: Path, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", wav.read_bytes(), filename=wav.name, content_type="audio/wav")
    form.add_field("model", "slow-asr")
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def transcribe(http: aiohttp.ClientSession, url: str, wav: Path, request_id: str) -> tuple[int, dict, dict]:
    async with http.post(url + TRANSCRIBE, data=upload(wav), headers={"X-Request-ID": request_id}) as response:
        return response.status, dict(response.headers), await response.json()


async def wait_all_busy(http: aiohttp.ClientSession, nodes: list[Node], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        states = []
        for node in nodes:
            async with http.get(node.url + "/health") as response:
                states.append((await response.json())["devices"]["busy"])
        if all(states):
            return
        assert time.monotonic() < deadline, f"the nodes never got busy: {states}"
        await asyncio.sleep(0.02)


def final_upstream(fields: dict[str, str]) -> str:
    return fields["upstream"].split(", ")[-1]


EXPECTED_TEXT = " ".join(f"part {i}." for i in range(ASR_STEPS))


# --- the tests ------------------------------------------------------------------------------


async def test_two_concurrent_transcriptions_run_one_per_gateway(cluster, http, sentences_wav):
    (_, first_wav), (_, second_wav) = sentences_wav[0], sentences_wav[1]
    started = time.monotonic()
    results = await asyncio.gather(
        transcribe(http, cluster.url, first_wav, "pair-a"),
        transcribe(http, cluster.url, second_wav, "pair-b"),
    )
    elapsed = time.monotonic() - started
    assert [status for status, _, _ in results] == [200, 200]
    assert all(body["text"] == EXPECTED_TEXT for _, _, body in results)
    served_by = {final_upstream(cluster.log_line(rid)) for rid in ("pair-a", "pair-b")}
    assert served_by == {node.address for node in cluster.nodes}
    # Side by side, not one after the other (each holds a slot ~1.5 s).
    assert elapsed < 2 * ASR_STEPS * ASR_STEP_S


async def test_a_third_concurrent_one_is_503_after_nginx_tried_both(cluster, http, sentences_wav):
    wavs = [path for _, path in sentences_wav]
    running = [asyncio.create_task(transcribe(http, cluster.url, wavs[i], f"busy-{i}")) for i in range(2)]
    await wait_all_busy(http, cluster.nodes)

    health = await (await http.get(cluster.nodes[0].url + "/health")).json()
    assert health["routing"] == {"accepts_requests": False, "load_score": 1.0}
    assert health["in_flight"]["asr"] == 1 and health["status"] == "ok"

    status, headers, body = await transcribe(http, cluster.url, wavs[2], "busy-third")
    assert status == 503 and headers["Retry-After"] == "5"
    assert body["error"]["kind"] == "network" and body["error"]["code"] == "gpu_busy"
    fields = cluster.log_line("busy-third")
    assert fields["upstream_status"] == "503, 503"
    assert set(fields["upstream"].split(", ")) == {node.address for node in cluster.nodes}

    assert [result[0] for result in await asyncio.gather(*running)] == [200, 200]
    # Busy is not down: both gateways are still in rotation right after.
    after = await asyncio.gather(*(transcribe(http, cluster.url, wavs[3 + i], f"after-{i}") for i in range(2)))
    assert [result[0] for result in after] == [200, 200]
    assert {final_upstream(cluster.log_line(f"after-{i}")) for i in range(2)} == {n.address for n in cluster.nodes}


async def test_streamed_transcription_events_arrive_as_they_happen(cluster, http, sentences_wav):
    arrivals: list[tuple[float, dict]] = []
    async with http.post(cluster.url + TRANSCRIBE, data=upload(sentences_wav[2][1], stream="true")) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                arrivals.append((time.monotonic(), json.loads(line[5:])))
    kinds = [event["type"] for _, event in arrivals]
    assert kinds == ["transcript.text.delta"] * ASR_STEPS + ["transcript.text.done"]
    # nginx relays each event as it comes (proxy_buffering off): the first one
    # was here most of a second before the last one.
    assert arrivals[-1][0] - arrivals[0][0] > (ASR_STEPS - 3) * ASR_STEP_S


async def test_websocket_through_nginx(cluster, http):
    async with http.ws_connect(cluster.url.replace("http", "ws") + "/v1/audio/speech/stream") as ws:
        await ws.send_json({"type": "session.config", "voice": "serena", "response_format": "pcm"})
        await ws.send_json({"type": "input.text", "text": "Across the proxy."})
        await ws.send_json({"type": "input.done"})
        start = await ws.receive_json(timeout=5)
        assert start["type"] == "audio.start" and start["sentence_text"] == "Across the proxy."
        assert await ws.receive_bytes(timeout=5) == synthesize("serena", "Across the proxy.")
        assert (await ws.receive_json(timeout=5))["type"] == "audio.done"
        assert (await ws.receive_json(timeout=5))["type"] == "session.done"


async def test_request_id_survives_the_hop(cluster, http):
    async with http.get(cluster.url + "/v1/models", headers={"X-Request-ID": "trace:cluster-1.a"}) as response:
        assert response.status == 200 and response.headers["X-Request-ID"] == "trace:cluster-1.a"
    assert cluster.log_line("trace:cluster-1.a")["upstream_status"] == "200"
    # Without one, nginx's own id reaches the gateway, which echoes it: one id in both logs.
    async with http.get(cluster.url + "/v1/models") as response:
        generated = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert cluster.log_line(generated)["upstream_status"] == "200"


async def test_stopping_a_gateway_leaves_the_other_serving(tmp_path, http, sentences_wav):
    with running_cluster(tmp_path) as small:
        stopped, survivor = small.nodes
        stop(stopped.process)
        statuses = []
        for i in range(4):
            async with http.get(small.url + "/v1/models", headers={"X-Request-ID": f"gone-{i}"}) as response:
                statuses.append(response.status)
        status, _, body = await transcribe(http, small.url, sentences_wav[3][1], "gone-asr")
        assert statuses == [200] * 4 and status == 200 and body["text"] == EXPECTED_TEXT
        fields = [small.log_line(f"gone-{i}") for i in range(4)] + [small.log_line("gone-asr")]
        assert {final_upstream(f) for f in fields} == {survivor.address}
        # Round robin still offers the stopped one; its refused connect moved on at once.
        assert any(f["upstream"] == f"{stopped.address}, {survivor.address}" for f in fields)

        # With none left, nginx's own 502 still speaks the gateway's envelope.
        stop(survivor.process)
        async with http.get(small.url + "/v1/models", headers={"X-Request-ID": "none-left"}) as response:
            body = await response.json()
            assert response.status == 502 and response.headers["X-Request-ID"] == "none-left"
        assert body["error"]["kind"] == "network" and body["error"]["provider"] == "nginx"
        assert set(body["error"]) == {"kind", "provider", "message", "type", "code", "param"}  # the gateway's shape


def test_shipped_files_agree():
    """Every gateway of the compose file is pinned to its own GPU and listed in nginx.conf."""
    compose = yaml.safe_load((CLUSTER_DIR / "docker-compose.yml").read_text())
    gateways = {name: svc for name, svc in compose["services"].items() if name.startswith("gateway-")}
    devices = [svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for svc in gateways.values()]
    assert len(gateways) >= 2 and all(len(ids) == 1 for ids in devices)
    assert len({ids[0] for ids in devices}) == len(gateways)
    nginx = (CLUSTER_DIR / "nginx.conf").read_text()
    listed = re.findall(r"(?m)^\s*server (\S+):11500 max_fails=0;", nginx)
    assert sorted(listed) == sorted(gateways)
    assert f"proxy_next_upstream_tries {len(gateways)};" in nginx
    assert compose["services"]["nginx"]["volumes"] == ["./nginx.conf:/etc/nginx/conf.d/default.conf:ro"]


# --- /health's load, in process ------------------------------------------------------------


async def test_health_load_idle_busy_and_queueing(make_client, tmp_path):
    asr = SlowAsr(steps=20, step_s=0.05)
    client = await make_client(plugins={"slow": BackendPlugin(asr)})
    idle = await (await client.get("/health")).json()
    assert idle["routing"] == {"accepts_requests": True, "load_score": 0.0}
    assert idle["devices"] == {"total": 1, "busy": 0} and idle["in_flight"] == {"asr": 0, "tts": 0, "llm": 0}

    wav = tone_wav(tmp_path / "tone.wav")
    running = asyncio.create_task(client.post(TRANSCRIBE, data={"file": wav.read_bytes(), "model": "slow-asr"}))
    while not asr.running.is_set():
        await asyncio.sleep(0.01)
    busy = await (await client.get("/health")).json()
    assert busy["routing"] == {"accepts_requests": False, "load_score": 1.0}
    assert busy["devices"] == {"total": 1, "busy": 1} and busy["in_flight"]["asr"] == 1
    assert (await running).status == 200
    after = await (await client.get("/health")).json()
    assert after["in_flight"]["asr"] == 0 and after["devices"]["busy"] == 0


async def test_health_accepts_while_busy_when_requests_may_queue(make_client):
    client = await make_client(slot_wait_s=30.0)
    async with client.app[slot_key].acquire_or_busy("asr", "m", "holder"):
        body = await (await client.get("/health")).json()
    assert body["devices"]["busy"] == 1 and body["routing"]["accepts_requests"] is True


def test_device_load_reads_one_slot_or_a_list_of_devices():
    assert device_load({"busy": False}) == DeviceLoad(total=1, busy=0)
    assert device_load({"busy": True, "capability": "asr"}) == DeviceLoad(total=1, busy=1)
    several = device_load({"devices": [{"busy": True}, {"busy": False}, {"busy": False}, {"busy": True}]})
    assert several == DeviceLoad(total=4, busy=2) and several.load_score == 0.5


async def test_a_client_hanging_up_frees_the_gateway_behind_nginx(cluster, http, sentences_wav):
    """nginx passes the hang-up on (proxy_ignore_client_abort stays off): the gateway stops and frees its slot."""
    request = asyncio.create_task(transcribe(http, cluster.url, sentences_wav[4][1], "hang-up"))
    deadline = time.monotonic() + 5
    busy_node = None
    while busy_node is None:
        assert time.monotonic() < deadline, "no gateway got busy"
        for node in cluster.nodes:
            async with http.get(node.url + "/health") as response:
                if (await response.json())["devices"]["busy"]:
                    busy_node = node
        await asyncio.sleep(0.02)
    request.cancel()
    hung_up_at = time.monotonic()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    while True:
        async with http.get(busy_node.url + "/health") as response:
            if not (await response.json())["devices"]["busy"]:
                break
        await asyncio.sleep(0.02)
    # Well before the ~1.5 s the transcription would have taken to finish.
    assert time.monotonic() - hung_up_at < 0.6
