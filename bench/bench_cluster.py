"""One gateway vs two gateways behind nginx, on this machine, with real short transcriptions.

Two ``aistack serve`` processes (only the faster_whisper plugin, bundled
tiny.en model) and two nginx instances running the shipped
docker/cluster/nginx.conf: one in front of both gateways, one in front of
the first gateway alone.  Measured side by side in one run:

1. Load: ``--clients`` clients (default 4) send the same short clip for
   ``--seconds`` each, first straight to gateway 0, then to nginx over both
   gateways.  A client that gets 503 (busy) retries after 200 ms, as a
   client with its own backoff would; a request's latency runs from its
   first attempt to its answer.  Reported: requests/s, p50/p95 latency,
   the 503s clients saw, and the throughput ratio cluster / single.
2. The cost nginx adds: one client, requests one after another, straight
   to gateway 0 and through nginx in front of it alone, alternated round by
   round: ``GET /v1/models`` and a clip upload the gateway refuses after
   reading it (an unknown model: the whole multipart body is relayed and
   parsed, no inference).  Reported: median latency each way and the
   difference per request.

On a machine with fewer cores than gateways both gateways share the CPUs,
so the cluster's gain here is bounded by the cores, not by the slot; with a
GPU per gateway it is bounded by the GPUs.

    python bench/bench_cluster.py [--seconds 20] [--clients 4] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _relay import wait_ready  # noqa: E402
from bench_whisper_batched import SENTENCES, synthesize_sentences, write_wav  # noqa: E402

from tests.nginx_runner import free_port, start_nginx, stop  # noqa: E402

MODEL = "whisper-tiny.en"
BUSY_BACKOFF_S = 0.2
TIMEOUT = aiohttp.ClientTimeout(total=120)


def start_gateway(workdir: Path, name: str) -> tuple[subprocess.Popen, str]:
    state = workdir / name
    for sub in ("uploads", "logs", "payloads", "tts-cache"):
        (state / sub).mkdir(parents=True)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "AISTACK_PORT": str(port),
        "AISTACK_LOAD_PLUGINS": "faster_whisper",
        "AISTACK_UPLOAD_DIR": str(state / "uploads"),
        "AISTACK_OBS_LOG_DIR": str(state / "logs"),
        "AISTACK_OBS_PAYLOAD_DIR": str(state / "payloads"),
        "AISTACK_TTS_CACHE_DIR": str(state / "tts-cache"),
    }
    log = open(state / "gateway.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "aistack_core", "serve"], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    return process, f"127.0.0.1:{port}"


def form(clip: bytes, model: str = MODEL) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("file", clip, filename="clip.wav", content_type="audio/wav")
    data.add_field("model", model)
    return data


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


async def transcribe_until_served(session: aiohttp.ClientSession, url: str, clip: bytes) -> tuple[float, int]:
    """(latency from the first attempt, 503s seen on the way)."""
    started, busy = time.monotonic(), 0
    while True:
        async with session.post(url + "/v1/audio/transcriptions", data=form(clip)) as response:
            await response.read()
            if response.status == 200:
                return time.monotonic() - started, busy
            if response.status != 503:
                raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        busy += 1
        await asyncio.sleep(BUSY_BACKOFF_S)


async def load(url: str, clip: bytes, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    busy_seen = [0]

    async def client() -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                latency, busy = await transcribe_until_served(session, url, clip)
                latencies.append(latency)
                busy_seen[0] += busy

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.monotonic() - started
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 0.95),
        "busy_503s": busy_seen[0],
    }


async def timed(session: aiohttp.ClientSession, method: str, url: str, **kwargs) -> float:
    started = time.monotonic()
    async with session.request(method, url, **kwargs) as response:
        await response.read()
    return time.monotonic() - started


async def nginx_cost(direct: str, proxied: str, clip: bytes, rounds: int) -> dict:
    samples: dict[str, dict[str, list[float]]] = {
        "GET /v1/models": {"direct": [], "nginx": []},
        "upload refused after reading": {"direct": [], "nginx": []},
    }
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for round_index in range(rounds):
            # Alternate which goes first, so neither side always meets a warm cache.
            order = (("direct", direct), ("nginx", proxied)) if round_index % 2 == 0 else (
                ("nginx", proxied), ("direct", direct))
            for side, url in order:
                samples["GET /v1/models"][side].append(await timed(session, "GET", url + "/v1/models"))
                samples["upload refused after reading"][side].append(
                    await timed(session, "POST", url + "/v1/audio/transcriptions", data=form(clip, "no-such-model"))
                )
    return {
        name: {side: statistics.median(values) for side, values in sides.items()}
        for name, sides in samples.items()
    }


async def run(seconds: float, clients: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="aistack-bench-cluster-") as tmp:
        workdir = Path(tmp)
        pieces, rate = synthesize_sentences(SENTENCES[:1])
        write_wav(workdir / "clip.wav", pieces[0], rate)
        clip = (workdir / "clip.wav").read_bytes()
        processes: list[subprocess.Popen] = []
        try:
            (first, first_address), (second, second_address) = (
                start_gateway(workdir, "gateway-0"), start_gateway(workdir, "gateway-1"))
            processes += [first, second]
            both, both_port, _ = start_nginx(workdir / "pair", [first_address, second_address])
            # The shipped file has two server lines; both name gateway 0 here.
            alone, alone_port, _ = start_nginx(workdir / "alone", [first_address, first_address])
            processes += [both, alone]
            direct = f"http://{first_address}"
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                for address in (first_address, second_address):
                    await wait_ready(session, f"http://{address}/health")
                    await transcribe_until_served(session, f"http://{address}", clip)  # load the model
            print(f"clip: {len(clip) / 1024:.0f} KiB, {len(pieces[0]) / rate:.1f} s of speech; "
                  f"{clients} clients, {seconds:g} s per setup; {os.cpu_count()} CPUs", flush=True)

            single = await load(direct, clip, clients, seconds)
            cluster = await load(f"http://127.0.0.1:{both_port}", clip, clients, seconds)
            for name, result in (("one gateway, direct", single), ("two gateways + nginx", cluster)):
                print(f"{name:24s} {result['rps']:6.2f} req/s  p50 {result['p50_s'] * 1000:6.0f} ms  "
                      f"p95 {result['p95_s'] * 1000:6.0f} ms  ({result['requests']} requests, "
                      f"{result['busy_503s']} busy 503s seen by clients)")
            print(f"throughput ratio cluster / single: {cluster['rps'] / single['rps']:.2f}  "
                  f"p95 ratio: {cluster['p95_s'] / single['p95_s']:.2f}")

            costs = await nginx_cost(direct, f"http://127.0.0.1:{alone_port}", clip, rounds)
            for name, sides in costs.items():
                added = (sides["nginx"] - sides["direct"]) * 1000
                print(f"nginx cost, {name:30s} direct {sides['direct'] * 1000:6.2f} ms  "
                      f"via nginx {sides['nginx'] * 1000:6.2f} ms  added {added:+.2f} ms per request")
        finally:
            for process in processes:
                stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration per setup")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=200, help="sequential rounds for the nginx cost")
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.clients, args.rounds))


if __name__ == "__main__":
    main()
