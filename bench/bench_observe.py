"""What observability costs: requests per second with it on and with it off.

``aistack serve`` subprocesses run side by side, identical except for the
observability switches:

* ``on``:  AISTACK_OBS_METRICS=on, AISTACK_OBS_ACCESS_LOG=on (to a temp
  dir), AISTACK_OBS_PAYLOAD=off;
* ``off``: all three off (only the request id remains).

Workloads, each measured round by round on every server (see below for
why):

* ``GET /health`` (liveness probes are not recorded: this shows that the
  bypass costs nothing);
* a small in-process request: ``POST /v1/audio/speech`` with the Piper
  voice, a short sentence, served from the TTS cache after one warm-up
  (the full in-process path minus synthesis, so the per-request cost of
  observability is not hidden behind seconds of inference);
* for information, not judged against the target: ``GET /v1/models``, the
  lightest route that is recorded, where the fixed per-request cost
  (metrics + one access-log line) is most visible.  The "added CPU" column
  is that cost in microseconds.

The load generator is a minimal keep-alive HTTP/1.1 client on raw asyncio
streams (a few microseconds per request), so the server process, not the
client, is what saturates.  Besides requests per second it prints the
server's own CPU time per request.  Target: rps with observability on at
most 5 % below off.

Two kinds of noise hide a few per cent here.  Drift: on a 2-core machine
shared by the servers and the client, throughput changes from one second to
the next, so every round measures each server back to back (rotating which
goes first) and the figure is one minus the median of the per-round ratios.
Luck: two processes of the very same code differ by up to 5 % for as long
as they run (where the allocator and address-space randomisation put the
hot objects), so one "on" process against one "off" process measures
mostly which of them was lucky.  Each side is therefore a group of
``--processes`` servers, and a round compares the groups' mean throughput.
A third group identical to ``off`` (A/A) is measured against ``off`` the
same way: its "overhead" is the noise floor to read the figure against.

    python bench/bench_observe.py [--rounds 10] [--seconds 1.5] [--processes 3] [--connections 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_OVERHEAD = 0.05
INFORMATIONAL = "GET /v1/models (information only)"
SPEECH_BODY = json.dumps({"model": "piper", "input": "Hello there.", "response_format": "pcm", "stream": False}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m aistack_core.cli serve`` with only the piper plugin and its state in ``workdir``."""

    def __init__(self, name: str, workdir: Path, observability: bool) -> None:
        self.name = name
        self.port = free_port()
        self.workdir = workdir
        switch = "on" if observability else "off"
        env = dict(os.environ)
        env.update(
            AISTACK_LOAD_PLUGINS="piper",
            AISTACK_OBS_METRICS=switch,
            AISTACK_OBS_ACCESS_LOG=switch,
            AISTACK_OBS_PAYLOAD="off",
            AISTACK_OBS_LOG_DIR=str(workdir / "logs"),
            AISTACK_OBS_PAYLOAD_DIR=str(workdir / "payloads"),
            AISTACK_TTS_CACHE_DIR=str(workdir / "tts-cache"),
            AISTACK_UPLOAD_DIR=str(workdir),
            HF_HUB_OFFLINE="1",
            # One hash seed for all: dict and set layouts then match from process to process.
            PYTHONHASHSEED="0",
        )
        self._log = open(workdir / "server.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aistack_core.cli", "serve", "--port", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{(self.workdir / 'server.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} server did not start")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def build_request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise RuntimeError(f"response without Content-Length: {head!r}")
    await reader.readexactly(length)
    return status


async def hammer(port: int, request: bytes, connections: int, seconds: float) -> int:
    """Requests completed in ``seconds`` over ``connections`` keep-alive connections."""
    deadline = time.perf_counter() + seconds

    async def connection() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        done = 0
        try:
            while time.perf_counter() < deadline:
                status = await exchange(reader, writer, request)
                if status != 200:
                    raise RuntimeError(f"status {status}")
                done += 1
        finally:
            writer.close()
        return done

    return sum(await asyncio.gather(*(connection() for _ in range(connections))))


SIDES = (("on", True), ("off", False), ("off-twin", False))


async def run(rounds: int, seconds: float, connections: int, processes: int) -> dict:
    workloads = {
        "GET /health": build_request("GET", "/health"),
        "POST /v1/audio/speech (piper, cached)": build_request("POST", "/v1/audio/speech", SPEECH_BODY),
        INFORMATIONAL: build_request("GET", "/v1/models"),
    }
    with tempfile.TemporaryDirectory(prefix="bench-observe-") as tmp:
        groups: dict[str, list[Server]] = {side: [] for side, _ in SIDES}
        for number in range(processes):
            for index, (side, observability) in enumerate(SIDES):
                # Paths of one length: the environment's size moves the stack, and with it the timings.
                workdir = Path(tmp) / f"server-{number * len(SIDES) + index:03d}"
                workdir.mkdir()
                groups[side].append(Server(f"{side}-{number}", workdir, observability))
        servers = [server for group in groups.values() for server in group]
        try:
            for server in servers:
                server.wait_ready()
                # Warm-up: loads the voice, fills the TTS cache, settles the allocator.
                await hammer(server.port, workloads["POST /v1/audio/speech (piper, cached)"], 1, 0.5)
                await hammer(server.port, workloads["GET /health"], connections, 0.5)
            results: dict = {}
            for label, request in workloads.items():
                rps: dict[str, list[float]] = {server.name: [] for server in servers}
                cpu_us: dict[str, list[float]] = {server.name: [] for server in servers}
                for round_number in range(rounds):
                    # Every server goes first, second, ... equally often.
                    shift = round_number % len(servers)
                    for server in servers[shift:] + servers[:shift]:
                        cpu_before = server.cpu_seconds()
                        done = await hammer(server.port, request, connections, seconds)
                        cpu = server.cpu_seconds() - cpu_before
                        rps[server.name].append(done / seconds)
                        cpu_us[server.name].append(cpu / done * 1e6)

                def group_rps(side: str) -> list[float]:
                    """The group's mean throughput, round by round."""
                    return [statistics.fmean(rps[s.name][r] for s in groups[side]) for r in range(rounds)]

                def group_cpu(side: str) -> float:
                    return statistics.median(value for s in groups[side] for value in cpu_us[s.name])

                def paired(a: str, b: str) -> float:
                    return 1 - statistics.median(x / y for x, y in zip(group_rps(a), group_rps(b)))

                results[label] = {
                    "rps_on": round(statistics.median(group_rps("on")), 1),
                    "rps_off": round(statistics.median(group_rps("off")), 1),
                    "overhead": round(paired("on", "off"), 4),
                    "noise_floor": round(paired("off-twin", "off"), 4),
                    "cpu_us_per_request_on": round(group_cpu("on"), 1),
                    "cpu_us_per_request_off": round(group_cpu("off"), 1),
                    "cpu_us_per_request_twin": round(group_cpu("off-twin"), 1),
                    # Each process's median: how far apart same-code processes sit.
                    "process_rps": {name: round(statistics.median(values)) for name, values in rps.items()},
                }
            log_lines = sum(
                len(path.read_text().splitlines())
                for server in groups["on"] for path in (server.workdir / "logs").glob("access-*.jsonl")
            )
            results["access_log_lines_written_by_on"] = log_lines
        finally:
            for server in servers:
                server.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--processes", type=int, default=3, help="servers per side")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(args.rounds, args.seconds, args.connections, args.processes))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'workload':40} {'rps on':>8} {'rps off':>8} {'overhead':>9} {'A/A':>7} "
              f"{'server CPU µs/req on/off':>25} {'added':>6}")
        for label, row in results.items():
            if not isinstance(row, dict):
                continue
            if label == INFORMATIONAL:
                verdict = ""
            else:
                verdict = "ok" if row["overhead"] <= TARGET_OVERHEAD else "OVER TARGET"
            added = row["cpu_us_per_request_on"] - row["cpu_us_per_request_off"]
            print(
                f"{label:40} {row['rps_on']:8.0f} {row['rps_off']:8.0f} {row['overhead']:9.1%} {row['noise_floor']:7.1%} "
                f"{row['cpu_us_per_request_on']:>15.0f} / {row['cpu_us_per_request_off']:<7.0f} {added:6.0f}  {verdict}"
            )
        print(f"access-log lines written by the 'on' servers: {results['access_log_lines_written_by_on']}")
    worst = max(row["overhead"] for label, row in results.items() if isinstance(row, dict) and label != INFORMATIONAL)
    return 0 if worst <= TARGET_OVERHEAD else 1


if __name__ == "__main__":
    sys.exit(main())
