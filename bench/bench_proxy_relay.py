"""How much the gateway costs on the TTS pass-through path.

Runs the vLLM-Omni emulator and ``aistack serve`` in their own processes
and compares, in one run, the same requests made straight to the emulator
and through the gateway (alternating, so drift hits both alike):

* throughput of a large streamed audio body (default 500 MB); target: the
  gateway keeps >= 0.9 of the direct rate;
* time to first byte of a short synthesis; target: <= 1 ms added (p50);
* gateway memory (RSS from /proc) while it relays to a client that reads
  slowly; target: <= 16 MB growth (back-pressure, not buffering).

    python bench/bench_proxy_relay.py [--size-mb 500] [--rounds 3]

Numbers depend on the machine: client, gateway and emulator share its
cores, which the gateway path needs one more of.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _relay import start_emulator_and_gateway, wait_ready  # noqa: E402
MODEL = "qwen3-tts-12hz-0.6b-customvoice"
BYTES_PER_AUDIO_SECOND = 48000
MB = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def speech_request(text: str, fault: str = "") -> dict:
    return {
        "data": json.dumps({"model": MODEL, "input": text, "response_format": "pcm"}),
        "headers": {"Content-Type": "application/json", **({"X-Emulator-Fault": fault} if fault else {})},
    }


async def pull(session: aiohttp.ClientSession, base: str, size_bytes: int) -> float:
    """Download ``size_bytes`` of audio; returns MB/s."""
    seconds = size_bytes / BYTES_PER_AUDIO_SECOND
    request = speech_request("bench", f"audio-seconds={seconds:.6f};chunk-bytes=65536")
    started = time.perf_counter()
    received = 0
    async with session.post(base + "/v1/audio/speech", **request) as response:
        assert response.status == 200, await response.text()
        async for chunk in response.content.iter_any():
            received += len(chunk)
    elapsed = time.perf_counter() - started
    assert abs(received - size_bytes) < 4, (received, size_bytes)
    return received / MB / elapsed


async def first_byte_s(session: aiohttp.ClientSession, base: str) -> float:
    request = speech_request("Hello there.")
    started = time.perf_counter()
    async with session.post(base + "/v1/audio/speech", **request) as response:
        await response.content.readany()
        elapsed = time.perf_counter() - started
        await response.read()
    return elapsed


async def slow_reader_rss(session: aiohttp.ClientSession, gateway: str, gateway_pid: int, duration_s: float) -> tuple[float, float]:
    """Relay a big body to a client reading ~6 MB/s; returns (baseline RSS, peak RSS) in MB."""
    baseline = rss_mb(gateway_pid)
    peak = baseline
    request = speech_request("slow reader", "audio-seconds=20000;chunk-bytes=65536")  # ~915 MB on offer
    async with session.post(gateway + "/v1/audio/speech", **request) as response:
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            chunk = await response.content.read(64 * 1024)
            if not chunk:
                break
            await asyncio.sleep(0.01)
            peak = max(peak, rss_mb(gateway_pid))
        response.close()  # leave mid-body: the gateway must drop the upstream too
    return baseline, peak


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        emulator, gateway_process, direct, gateway = start_emulator_and_gateway(
            "tests.upstreams.vllm_omni", "qwen3_tts", "AISTACK_QWEN3_TTS_URL", state_dir
        )
        try:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await wait_ready(session, direct + "/health")
                await wait_ready(session, gateway + "/health")
                for base in (direct, gateway):  # warm connections and code paths
                    await pull(session, base, 8 * MB)
                    for _ in range(20):
                        await first_byte_s(session, base)

                size = args.size_mb * MB
                rates: dict[str, list[float]] = {"direct": [], "gateway": []}
                # CPU seconds per path: emulator, gateway, client, and wall time.
                cpu: dict[str, list[float]] = {"direct": [0.0] * 4, "gateway": [0.0] * 4}
                pids = (emulator.pid, gateway_process.pid)
                for round_index in range(args.rounds):
                    order = (("direct", direct), ("gateway", gateway))
                    for name, base in order if round_index % 2 == 0 else reversed(order):
                        before = [*(cpu_seconds(pid) for pid in pids), own_cpu_seconds(), time.perf_counter()]
                        rates[name].append(await pull(session, base, size))
                        after = [*(cpu_seconds(pid) for pid in pids), own_cpu_seconds(), time.perf_counter()]
                        cpu[name] = [total + b - a for total, a, b in zip(cpu[name], before, after)]
                        print(f"  round {round_index + 1}: {name:7s} {rates[name][-1]:8.1f} MB/s", flush=True)

                ttfb: dict[str, list[float]] = {"direct": [], "gateway": []}
                for _ in range(args.ttfb_samples):
                    for name, base in (("direct", direct), ("gateway", gateway)):
                        ttfb[name].append(await first_byte_s(session, base))

                baseline, peak = await slow_reader_rss(session, gateway, gateway_process.pid, args.slow_s)
        finally:
            for process in (gateway_process, emulator):
                process.terminate()
            for process in (gateway_process, emulator):
                process.wait(timeout=10)

    direct_rate = statistics.median(rates["direct"])
    gateway_rate = statistics.median(rates["gateway"])
    p50 = {name: statistics.median(values) * 1000 for name, values in ttfb.items()}
    p90 = {name: statistics.quantiles(values, n=10)[-1] * 1000 for name, values in ttfb.items()}
    print()
    print(f"machine: {os.cpu_count()} CPUs; body {args.size_mb} MB x {args.rounds} rounds; "
          f"{args.ttfb_samples} first-byte samples each way")
    print(f"throughput  direct {direct_rate:8.1f} MB/s   gateway {gateway_rate:8.1f} MB/s   "
          f"ratio {gateway_rate / direct_rate:5.2f}   (target >= 0.90)")
    for name in ("direct", "gateway"):
        emulator_s, gateway_s, client_s, wall_s = cpu[name]
        print(f"  {name:7s} path kept {(emulator_s + gateway_s + client_s) / wall_s:4.2f} of {os.cpu_count()} cores busy "
              f"(emulator {emulator_s / wall_s:4.2f}, gateway {gateway_s / wall_s:4.2f}, client {client_s / wall_s:4.2f}); "
              f"gateway CPU per GB relayed: {gateway_s / (args.size_mb * args.rounds / 1024):5.2f} s")
    print(f"first byte  direct p50 {p50['direct']:6.2f} ms  gateway p50 {p50['gateway']:6.2f} ms   "
          f"added p50 {p50['gateway'] - p50['direct']:5.2f} ms (target <= 1.0); "
          f"p90 {p90['direct']:.2f} / {p90['gateway']:.2f} ms")
    print(f"slow reader gateway RSS {baseline:6.1f} MB -> peak {peak:6.1f} MB   "
          f"growth {peak - baseline:5.1f} MB (target <= 16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttfb-samples", type=int, default=200)
    parser.add_argument("--slow-s", type=float, default=8.0, help="how long the slow reader reads")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
