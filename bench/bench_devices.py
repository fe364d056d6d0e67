"""Throughput with one CPU slot against two: ``AISTACK_DEVICES=cpu*1`` vs ``cpu*2``.

N parallel clients each transcribe a 30 s speech clip (Piper, cached in
bench/out/) a few times against a real ``aistack serve`` subprocess (only
the faster_whisper plugin, bundled tiny.en).  With ``cpu*1`` one model
instance uses every core and requests take turns; with ``cpu*2`` two
instances, each on its share of the cores, run side by side.  The server
queues requests (``AISTACK_SLOT_WAIT_S``) rather than answering 503, so the
clients measure service, not retry timing.

Both settings run in one invocation, alternated round by round, and the
script prints requests per second for each, their ratio, per-request
latency, the server's CPU seconds per request (the cost, whatever share of the cores
it got) and the load average before and after.  Note that ``cpu*N`` splits
the cores rather than adding any: on two cores the gain is only what one
instance on two threads leaves unused (its serial parts), so expect well
under 2x, and less while other work shares the cores.

    PYTHONPATH=$PWD python bench/bench_devices.py [--clients 4] [--requests 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_asr_overhead import HTTP_TIMEOUT, MODEL, Server, form, percentile  # noqa: E402
from bench_whisper_batched import speech_clip, word_error_rate  # noqa: E402

CLIP_S = 30.0


async def transcribe(session: aiohttp.ClientSession, base: str, clip: Path) -> str:
    async with session.post(base + "/v1/audio/transcriptions", data=form(clip, model=MODEL)) as response:
        body = await response.json()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body}")
        return body["text"]


async def measure(devices: str, clients: int, requests: int, clip: Path, reference: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        os.environ["AISTACK_DEVICES"] = devices
        os.environ["AISTACK_SLOT_WAIT_S"] = "900"
        server = Server(Path(workdir))
        try:
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
                await server.wait_ready(session)
                health = await (await session.get(server.base + "/health")).json()
                slots = health["devices"]["total"]
                # Untimed: load the model on every device (concurrent requests spread over them).
                await asyncio.gather(*(transcribe(session, server.base, clip) for _ in range(slots)))
                latencies: list[float] = []
                texts: list[str] = []

                async def client() -> None:
                    for _ in range(requests):
                        started = time.perf_counter()
                        texts.append(await transcribe(session, server.base, clip))
                        latencies.append(time.perf_counter() - started)

                cpu_before, started = server.cpu_seconds(), time.perf_counter()
                await asyncio.gather(*(client() for _ in range(clients)))
                wall = time.perf_counter() - started
                # The server's own CPU time: what a request costs, whatever share of the cores it got.
                cpu_used = server.cpu_seconds() - cpu_before
                health = await (await session.get(server.base + "/health")).json()
        except Exception:
            server.stop()
            print(f"--- server log ({devices}) ---\n{server.log_path.read_text()[-6000:]}", file=sys.stderr)
            raise
        else:
            server.stop()
    done = clients * requests
    return {
        "devices": devices,
        "slots": slots,
        "cpu_threads": [d["cpu_threads"] for d in health["device_slots"]],
        "inferences_per_device": [d["inferences"] for d in health["device_slots"]],
        "requests": done,
        "wall_s": round(wall, 2),
        "requests_per_s": round(done / wall, 4),
        "audio_s_per_s": round(done * CLIP_S / wall, 2),
        "server_cpu_s_per_request": round(cpu_used / done, 2),
        "server_cores_busy": round(cpu_used / wall, 2),
        "latency_median_s": round(statistics.median(latencies), 2),
        "latency_p95_s": round(percentile(latencies, 0.95), 2),
        "worst_wer": round(max(word_error_rate(reference, text) for text in texts), 3),
    }


async def run(clients: int, requests: int, rounds: int) -> dict:
    clip, reference = speech_clip(CLIP_S)
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {"cpu*1": [], "cpu*2": []}
    for round_index in range(rounds):
        order = ("cpu*1", "cpu*2") if round_index % 2 == 0 else ("cpu*2", "cpu*1")
        for devices in order:
            results[devices].append(await measure(devices, clients, requests, clip, reference))
    load_after = os.getloadavg()
    one = statistics.median(r["requests_per_s"] for r in results["cpu*1"])
    two = statistics.median(r["requests_per_s"] for r in results["cpu*2"])
    return {
        "clip_s": CLIP_S,
        "clients": clients,
        "requests_per_client": requests,
        "cores": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "cpu*1": results["cpu*1"],
        "cpu*2": results["cpu*2"],
        "throughput_ratio_cpu2_over_cpu1": round(two / one, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds of both settings")
    args = parser.parse_args()
    report = asyncio.run(run(args.clients, args.requests, args.rounds))
    print(json.dumps(report, indent=2))
    one, two = report["cpu*1"][-1], report["cpu*2"][-1]
    print(
        f"\ncpu*2 / cpu*1 throughput: {report['throughput_ratio_cpu2_over_cpu1']}x "
        f"({two['requests_per_s']} vs {one['requests_per_s']} requests/s); median latency "
        f"{two['latency_median_s']} s vs {one['latency_median_s']} s; load average "
        f"{report['load_average_before'][0]} -> {report['load_average_after'][0]} on {report['cores']} cores",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
