"""What the gateway costs on top of faster-whisper, and how it behaves at the edges.

Three measurements against a real ``aistack serve`` subprocess (only the
faster_whisper plugin loaded, bundled tiny.en model):

1. Overhead: the same 60 s clip transcribed over HTTP and by the plugin
   called in this process with the same model files and default settings,
   alternated round by round.  Target:
   HTTP median / in-process median <= 1.05.
2. Upload memory: a 300 MB file (random bytes named .wav) is POSTed and the
   server's resident memory is watched; the upload must be spooled to disk,
   not held in RAM.  Target: growth <= 32 MB.
3. Cancel latency: a streaming transcription is started, the client hangs
   up after the first event, and a small streaming request is retried until
   it stops getting 503 (slot busy).  Measured from hang-up to the slot
   being free, over several trials.  Target: p95 <= 1 s.

    python bench/bench_asr_overhead.py [--rounds 5] [--upload-mb 300] [--cancel-trials 10]
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
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_whisper_batched import speech_clip, tiny_en_backend, word_error_rate, write_wav  # noqa: E402

MODEL = "whisper-tiny.en"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=900)


# --- the server -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m aistack_core.cli serve`` in a subprocess, with its state in a temp dir."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        env = dict(os.environ)
        env.update(
            AISTACK_LOAD_PLUGINS="faster_whisper",
            AISTACK_UPLOAD_DIR=str(workdir / "uploads"),
            AISTACK_OBS_LOG_DIR=str(workdir / "logs"),
            AISTACK_OBS_PAYLOAD_DIR=str(workdir / "payloads"),
            AISTACK_TTS_CACHE_DIR=str(workdir / "tts-cache"),
            HF_HUB_OFFLINE="1",
        )
        (workdir / "uploads").mkdir()
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aistack_core.cli", "serve", "--port", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                async with session.get(self.base + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("server did not answer /health in time")

    def memory_kb(self) -> dict[str, int]:
        values = {}
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, amount, _unit = line.split()
                    values[name.rstrip(":")] = int(amount)
        return values

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_peak_memory(self) -> bool:
        """Zero VmHWM (Linux: write 5 to clear_refs) so the peak covers only what follows."""
        try:
            with open(f"/proc/{self.process.pid}/clear_refs", "w") as refs:
                refs.write("5")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def form(path: Path, **fields: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("file", open(path, "rb"), filename=path.name, content_type="audio/wav")
    for name, value in fields.items():
        data.add_field(name, value)
    return data


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    position = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[position]


# --- 1. overhead ----------------------------------------------------------------------


async def measure_overhead(server: Server, session: aiohttp.ClientSession, rounds: int) -> dict:
    from aistack_core import CancelToken, Config, TranscriptionOptions
    from aistack_core.media.audio import DecodedAudio

    clip, reference = speech_clip(60.0)
    # The plugin with the server's default settings, called directly: the
    # same decode path (VAD pieces, batched chunks, word timings for
    # verbose_json), so the difference is what HTTP and the gateway add.
    backend = tiny_en_backend(batched_above_s=Config().whisper_batched_above_s)
    loaded = backend.load()  # the same files, device and compute type as the server's

    def in_process() -> str:
        result = backend.transcribe(
            loaded, DecodedAudio.open(clip), TranscriptionOptions(word_timestamps=True), CancelToken()
        )
        return " ".join(segment.text for segment in result.segments)

    async def over_http() -> str:
        data = form(clip, model=MODEL, response_format="verbose_json")
        async with session.post(server.base + "/v1/audio/transcriptions", data=data) as response:
            body = await response.json()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {body}")
            return body["text"]

    # One untimed call each: the server loads the model, both sides warm caches.
    http_text = await over_http()
    local_text = await asyncio.to_thread(in_process)
    wall = {"http": [], "local": []}
    cpu = {"http": [], "local": []}

    async def timed(side: str) -> None:
        # Wall time is what a client sees; CPU time (the server's own, or this
        # process's) is steadier when other work shares the machine.
        if side == "http":
            cpu_before, started = server.cpu_seconds(), time.perf_counter()
            await over_http()
            wall[side].append(time.perf_counter() - started)
            cpu[side].append(server.cpu_seconds() - cpu_before)
        else:
            cpu_before, started = time.process_time(), time.perf_counter()
            await asyncio.to_thread(in_process)
            wall[side].append(time.perf_counter() - started)
            cpu[side].append(time.process_time() - cpu_before)

    for round_index in range(rounds):
        # ABBA order, so slow drift in machine load favours neither side.
        for side in ("http", "local") if round_index % 2 == 0 else ("local", "http"):
            await timed(side)
    http_median, local_median = statistics.median(wall["http"]), statistics.median(wall["local"])
    return {
        "clip_s": 60.0,
        "rounds": rounds,
        "http_s": [round(t, 3) for t in wall["http"]],
        "in_process_s": [round(t, 3) for t in wall["local"]],
        "http_median_s": round(http_median, 3),
        "in_process_median_s": round(local_median, 3),
        "ratio": round(http_median / local_median, 3),
        "http_cpu_median_s": round(statistics.median(cpu["http"]), 3),
        "in_process_cpu_median_s": round(statistics.median(cpu["local"]), 3),
        "cpu_ratio": round(statistics.median(cpu["http"]) / statistics.median(cpu["local"]), 3),
        "wer_http": round(word_error_rate(reference, http_text), 4),
        "wer_in_process": round(word_error_rate(reference, local_text), 4),
    }


# --- 2. upload memory ---------------------------------------------------------------------


async def measure_upload_memory(server: Server, session: aiohttp.ClientSession, workdir: Path, size_mb: int) -> dict:
    big = workdir / "random.wav"
    with open(big, "wb") as out:
        for _ in range(size_mb):
            out.write(os.urandom(1024 * 1024))
    before = server.memory_kb()
    peak_reset = server.reset_peak_memory()
    sampled_peak = before["VmRSS"]
    stop = threading.Event()

    def sample() -> None:
        nonlocal sampled_peak
        while not stop.is_set():
            sampled_peak = max(sampled_peak, server.memory_kb()["VmRSS"])
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        async with session.post(server.base + "/v1/audio/transcriptions", data=form(big, model=MODEL)) as response:
            status, body = response.status, await response.text()
    finally:
        stop.set()
        sampler.join()
        big.unlink()
    elapsed = time.perf_counter() - started
    after = server.memory_kb()
    peak = max(sampled_peak, after["VmHWM"]) if peak_reset else sampled_peak
    leftovers = list((workdir / "uploads").iterdir())
    return {
        "upload_mb": size_mb,
        "status": status,
        "answer": body[:160],
        "seconds": round(elapsed, 2),
        "rss_before_mb": round(before["VmRSS"] / 1024, 1),
        "rss_after_mb": round(after["VmRSS"] / 1024, 1),
        "rss_peak_mb": round(peak / 1024, 1),
        "peak_growth_mb": round((peak - before["VmRSS"]) / 1024, 1),
        "peak_from": "VmHWM after clear_refs + 5 ms sampling" if peak_reset else "5 ms sampling of VmRSS",
        "temp_files_left": len(leftovers),
    }


# --- 3. cancel latency --------------------------------------------------------------------


async def slot_free_after(server: Server, probe: Path, deadline_s: float = 60.0) -> tuple[float, int]:
    """Retry a small streaming request until it is not refused as busy; (time it got in, attempts)."""
    attempts = 0
    limit = time.monotonic() + deadline_s
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as probe_session:
        while time.monotonic() < limit:
            attempts += 1
            data = form(probe, model=MODEL, stream="true")
            async with probe_session.post(server.base + "/v1/audio/transcriptions", data=data) as response:
                got_in = time.perf_counter()
                if response.status != 503:
                    await response.read()  # let it finish so the next trial starts with a free slot
                    return got_in, attempts
                await response.read()
            await asyncio.sleep(0.01)
    raise RuntimeError("the slot never came free")


async def measure_cancel(server: Server, clip: Path, probe: Path, trials: int, max_delay_s: float = 0.0) -> dict:
    """Hang up after the first event, plus a random 0..max_delay_s so some hang-ups land mid-decode."""
    import random

    rng = random.Random(1)
    latencies, attempts_seen, first_event_s = [], [], []
    for _ in range(trials):
        session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT, connector=aiohttp.TCPConnector(force_close=True))
        started = time.perf_counter()
        response = await session.post(
            server.base + "/v1/audio/transcriptions", data=form(clip, model=MODEL, stream="true")
        )
        if response.status != 200:
            raise RuntimeError(f"streaming request got HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if line.startswith(b"data:"):
                break
        first_event_s.append(time.perf_counter() - started)
        if max_delay_s:
            await asyncio.sleep(rng.uniform(0, max_delay_s))
        response.close()  # hang up mid-stream
        await session.close()
        hung_up = time.perf_counter()
        got_in, attempts = await slot_free_after(server, probe)
        latencies.append(got_in - hung_up)
        attempts_seen.append(attempts)
    return {
        "clip": clip.name,
        "hang_up": f"first event + random 0..{max_delay_s} s" if max_delay_s else "right after the first event",
        "trials": trials,
        "latency_s": [round(t, 3) for t in latencies],
        "p50_s": round(percentile(latencies, 0.50), 3),
        "p95_s": round(percentile(latencies, 0.95), 3),
        "first_event_median_s": round(statistics.median(first_event_s), 3),
        "probe_attempts": attempts_seen,
    }


# --- main -------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict:
    results: dict = {"cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="aistack-bench-") as tmp:
        workdir = Path(tmp)
        probe = workdir / "probe.wav"
        rng = np.random.default_rng(0)
        write_wav(probe, (rng.normal(0, 300, 16000)).astype(np.int16), 16000)  # 1 s of faint noise
        server = Server(workdir)
        try:
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
                await server.wait_ready(session)
                if "overhead" in args.parts:
                    results["overhead"] = await measure_overhead(server, session, args.rounds)
                    print(json.dumps({"overhead": results["overhead"]}), file=sys.stderr)
                if "upload" in args.parts:
                    results["upload_memory"] = await measure_upload_memory(server, session, workdir, args.upload_mb)
                    print(json.dumps({"upload_memory": results["upload_memory"]}), file=sys.stderr)
            if "cancel" in args.parts:
                for seconds in args.cancel_clips:
                    clip, _ = speech_clip(seconds)
                    for delay in (0.0, args.cancel_max_delay):
                        key = f"cancel_{int(seconds)}s" + (f"_random_delay" if delay else "")
                        results[key] = await measure_cancel(server, clip, probe, args.cancel_trials, delay)
                        print(json.dumps({key: results[key]}), file=sys.stderr)
        except BaseException:
            print(server.log_path.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            server.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--upload-mb", type=int, default=300)
    parser.add_argument("--cancel-trials", type=int, default=10)
    parser.add_argument(
        "--cancel-clips", default="110,600",
        help="clip lengths in seconds for the cancel test (110 s decodes plainly, 600 s batched)",
    )
    parser.add_argument(
        "--cancel-max-delay", type=float, default=3.0,
        help="second cancel series: hang up this many seconds (at most, random) after the first event",
    )
    parser.add_argument("--parts", default="overhead,upload,cancel")
    args = parser.parse_args()
    args.parts = set(args.parts.split(","))
    args.cancel_clips = [float(s) for s in args.cancel_clips.split(",")]
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=2))
    lines = []
    if "overhead" in results:
        o = results["overhead"]
        lines.append(f"overhead: HTTP median {o['http_median_s']} s vs in-process {o['in_process_median_s']} s "
                     f"-> ratio {o['ratio']} (target <= 1.05); CPU-time ratio {o['cpu_ratio']}")
    if "upload_memory" in results:
        u = results["upload_memory"]
        lines.append(f"upload {u['upload_mb']} MB: HTTP {u['status']}, server RSS peak growth {u['peak_growth_mb']} MB "
                     f"(target <= 32)")
    for key, value in results.items():
        if key.startswith("cancel_"):
            lines.append(f"{key}: disconnect -> slot free p50 {value['p50_s']} s, "
                         f"p95 {value['p95_s']} s (target p95 <= 1)")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
