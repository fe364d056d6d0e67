"""How much the gateway adds to a streamed chat completion.

Runs the Ollama emulator and ``aistack serve`` in their own processes and
alternates the same streamed request straight to the emulator and through
the gateway:

* per-chunk latency: the emulator stamps each SSE frame with its send time
  (an SSE comment line, ignored by clients); the client subtracts that
  from the arrival time.  Target: p50 added by the gateway <= 1 ms.
* throughput of a long stream sent as fast as the emulator can (tokens and
  MB per second).  Target: the gateway keeps >= 0.9 of the direct rate.

    python bench/bench_chat_relay.py [--rounds 3]

Both processes and the client share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _relay import start_emulator_and_gateway, wait_ready  # noqa: E402
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


async def stream(session: aiohttp.ClientSession, base: str, tokens: int, fault: str) -> tuple[list[float], int, float, int]:
    """One streamed chat; returns (per-frame latencies, frames, seconds, bytes)."""
    body = {"model": "qwen3:4b", "messages": MESSAGES, "stream": True, "max_tokens": tokens}
    latencies: list[float] = []
    frames = 0
    received = 0
    started = time.perf_counter()
    async with session.post(base + CHAT, json=body, headers={"X-Emulator-Fault": fault}) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            received += len(line)
            if line.startswith(b": sent="):
                latencies.append(time.monotonic() - float(line[7:]))
            elif line.startswith(b"data: "):
                frames += 1
    return latencies, frames, time.perf_counter() - started, received


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        emulator, gateway_process, direct, gateway = start_emulator_and_gateway(
            "tests.upstreams.ollama", "ollama", "AISTACK_OLLAMA_URL", state_dir
        )
        try:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, direct + "/")
                await wait_ready(session, gateway + "/health")
                for base in (direct, gateway):
                    await stream(session, base, 50, "stamp;token-interval=0.001")

                latency: dict[str, list[float]] = {"direct": [], "gateway": []}
                rate: dict[str, list[float]] = {"direct": [], "gateway": []}
                byte_rate: dict[str, list[float]] = {"direct": [], "gateway": []}
                order = (("direct", direct), ("gateway", gateway))
                for round_index in range(args.rounds):
                    for name, base in order if round_index % 2 == 0 else reversed(order):
                        lat, _, _, _ = await stream(
                            session, base, args.paced_tokens, f"stamp;token-interval={args.interval_ms / 1000}"
                        )
                        latency[name].extend(lat)
                        _, frames, seconds, size = await stream(session, base, args.long_tokens, "token-interval=0")
                        rate[name].append(frames / seconds)
                        byte_rate[name].append(size / seconds / 1024 / 1024)
                        print(f"  round {round_index + 1}: {name:7s} latency p50 {statistics.median(lat) * 1000:6.3f} ms"
                              f"   long stream {rate[name][-1]:9.0f} frames/s", flush=True)
        finally:
            for process in (gateway_process, emulator):
                process.terminate()
            for process in (gateway_process, emulator):
                process.wait(timeout=10)

    p50 = {name: statistics.median(values) * 1000 for name, values in latency.items()}
    p90 = {name: statistics.quantiles(values, n=10)[-1] * 1000 for name, values in latency.items()}
    direct_rate, gateway_rate = statistics.median(rate["direct"]), statistics.median(rate["gateway"])
    print()
    print(f"machine: {os.cpu_count()} CPUs; {args.rounds} rounds; paced stream {args.paced_tokens} tokens every "
          f"{args.interval_ms} ms; long stream {args.long_tokens} tokens unpaced")
    print(f"per-chunk latency  direct p50 {p50['direct']:6.3f} ms  gateway p50 {p50['gateway']:6.3f} ms  "
          f"added p50 {p50['gateway'] - p50['direct']:6.3f} ms (target <= 1.0); "
          f"p90 {p90['direct']:.3f} / {p90['gateway']:.3f} ms")
    print(f"long stream        direct {direct_rate:9.0f} frames/s ({statistics.median(byte_rate['direct']):5.1f} MB/s)"
          f"  gateway {gateway_rate:9.0f} frames/s ({statistics.median(byte_rate['gateway']):5.1f} MB/s)"
          f"  ratio {gateway_rate / direct_rate:5.2f} (target >= 0.90)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paced-tokens", type=int, default=300)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--long-tokens", type=int, default=20000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
