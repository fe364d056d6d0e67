"""Piper through the gateway versus Piper in-process, side by side.

Prints three figures:

* real-time factor (compute seconds per second of audio) of a WAV made by
  Piper called directly in this process and of the same request sent to
  ``aistack serve`` over HTTP with the cache off; rounds alternate between
  the two and the medians are compared (target: gateway / in-process <= 1.1);
* for a ten-sentence text, the time until the first audio byte arrives when
  streaming, next to the time the whole non-streamed answer takes;
* the latency of a cache HIT (p50 / p90), next to the MISS that filled it.

The gateway runs as a subprocess with only the piper plugin and its cache,
logs and uploads in a temporary directory.  Usage::

    python bench/bench_tts.py [--rounds 7] [--port 0] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from aistack_core import CancelToken, Config, SpeechOptions

try:
    from aistack_plugins import piper as piper_plugin
except ImportError as exc:  # pragma: no cover - depends on the installation
    sys.exit(f"bench_tts needs the piper extra (pip install 'aistack[piper]'): {exc}")

RTF_TEXT = (
    "The committee met on Thursday to review the quarterly results. "
    "Revenue grew faster than expected, mostly thanks to the new service contracts. "
    "Costs stayed flat, although travel spending rose slightly in the spring. "
    "Next quarter, the team plans to hire two engineers and open a small office downtown."
)
TEN_SENTENCES = " ".join(
    f"This is sentence number {n}, and it carries a handful of ordinary words." for n in range(1, 11)
)
WAV_HEADER_BYTES = 44  # the gateway's streaming WAV header (RIFF + fmt + data chunk headers)


# --- in-process -------------------------------------------------------------------


def wav_bytes(pcm: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


class InProcess:
    def __init__(self) -> None:
        backend = next(b for b in piper_plugin.build_backends(Config.from_env({})) if b.card.auto_priority == 0)
        self.backend = backend
        self.model = backend.load()

    def wav(self, text: str) -> tuple[float, float]:
        """(seconds spent, seconds of audio) for a whole WAV."""
        started = time.perf_counter()
        options = SpeechOptions(text=text, voice=self.backend.default_voice)
        chunks = list(self.backend.synthesize(self.model, options, CancelToken()))
        pcm = np.concatenate(chunks)
        wav_bytes(pcm, self.backend.sample_rate)
        return time.perf_counter() - started, len(pcm) / self.backend.sample_rate

    def first_chunk(self, text: str) -> float:
        started = time.perf_counter()
        options = SpeechOptions(text=text, voice=self.backend.default_voice)
        chunks = self.backend.synthesize(self.model, options, CancelToken())
        next(iter(chunks))
        return time.perf_counter() - started


# --- through the gateway ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Gateway:
    def __init__(self, port: int, state_dir: Path) -> None:
        self.port = port
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "AISTACK_LOAD_PLUGINS": "piper",
            "AISTACK_TTS_CACHE_DIR": str(state_dir / "tts-cache"),
            "AISTACK_OBS_LOG_DIR": str(state_dir / "logs"),
            "AISTACK_OBS_PAYLOAD_DIR": str(state_dir / "payloads"),
            "AISTACK_UPLOAD_DIR": str(state_dir),
            "AISTACK_OBS_ACCESS_LOG": "off",
        }
        self.log = open(state_dir / "server.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aistack_core.cli", "serve", "--port", str(port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self._wait_ready(state_dir / "server.log")

    def _wait_ready(self, log_path: Path, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"aistack serve exited:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                status, _, _ = self.request("GET", "/health")
                if status == 200:
                    return
            except OSError:
                self.connection.close()
                time.sleep(0.2)
        raise RuntimeError("aistack serve did not answer /health in time")

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, bytes]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        self.connection.request(method, path, body=payload, headers=headers)
        response = self.connection.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), data

    def speech(self, text: str, **extra) -> tuple[float, bytes, dict]:
        body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "wav", **extra}
        started = time.perf_counter()
        status, headers, data = self.request("POST", "/v1/audio/speech", body)
        elapsed = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"speech request failed with {status}: {data[:500]!r}")
        return elapsed, data, headers

    def first_audio_byte(self, text: str) -> tuple[float, float]:
        """(seconds to the first byte after the WAV header, seconds to the end) for a streamed request."""
        body = json.dumps({"model": "tts-1", "voice": "alloy", "input": text, "response_format": "wav",
                           "stream": True, "cache": False}).encode()
        started = time.perf_counter()
        self.connection.request("POST", "/v1/audio/speech", body=body, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"streamed request failed with {response.status}: {response.read()[:500]!r}")
        received = 0
        first_audio = None
        while True:
            piece = response.read1(65536)
            if not piece:
                break
            received += len(piece)
            if first_audio is None and received > WAV_HEADER_BYTES:
                first_audio = time.perf_counter() - started
        return first_audio or float("nan"), time.perf_counter() - started

    def close(self) -> None:
        self.connection.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as audio:
        return audio.getnframes() / audio.getframerate()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


# --- the run ----------------------------------------------------------------------


def run(rounds: int, port: int) -> dict:
    local = InProcess()
    with tempfile.TemporaryDirectory(prefix="aistack-bench-tts-") as state:
        gateway = Gateway(port or free_port(), Path(state))
        try:
            # Warm both sides: the gateway loads its voice on first use.
            local.wav(RTF_TEXT)
            gateway.speech(RTF_TEXT, cache=False)

            local_rtf, gateway_rtf = [], []
            for _ in range(rounds):
                spent, audio_s = local.wav(RTF_TEXT)
                local_rtf.append(spent / audio_s)
                spent, data, headers = gateway.speech(RTF_TEXT, cache=False)
                assert headers.get("X-Cache") == "BYPASS", headers
                gateway_rtf.append(spent / wav_seconds(data))

            first_audio, streamed_total, whole = [], [], []
            local_first = []
            for _ in range(max(3, rounds // 2)):
                ttfa, total = gateway.first_audio_byte(TEN_SENTENCES)
                first_audio.append(ttfa)
                streamed_total.append(total)
                whole.append(gateway.speech(TEN_SENTENCES, cache=False)[0])
                local_first.append(local.first_chunk(TEN_SENTENCES))

            cache_text = "Caching makes repeated announcements instant."
            miss_s, _, headers = gateway.speech(cache_text)
            assert headers.get("X-Cache") == "MISS", headers
            hits = []
            for _ in range(max(20, rounds * 4)):
                spent, _, headers = gateway.speech(cache_text)
                assert headers.get("X-Cache") == "HIT", headers
                hits.append(spent)
        finally:
            gateway.close()

    local_median = statistics.median(local_rtf)
    gateway_median = statistics.median(gateway_rtf)
    return {
        "rounds": rounds,
        "rtf_in_process_median": round(local_median, 4),
        "rtf_gateway_median": round(gateway_median, 4),
        "rtf_ratio_gateway_over_in_process": round(gateway_median / local_median, 3),
        "stream_first_audio_byte_s_median": round(statistics.median(first_audio), 4),
        "stream_total_s_median": round(statistics.median(streamed_total), 4),
        "non_streamed_total_s_median": round(statistics.median(whole), 4),
        "in_process_first_sentence_s_median": round(statistics.median(local_first), 4),
        "cache_miss_s": round(miss_s, 4),
        "cache_hit_p50_ms": round(percentile(hits, 0.5) * 1000, 2),
        "cache_hit_p90_ms": round(percentile(hits, 0.9) * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternated RTF rounds (default 7)")
    parser.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args()
    figures = run(args.rounds, args.port)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    ratio = figures["rtf_ratio_gateway_over_in_process"]
    print(f"Piper RTF, median of {args.rounds} alternated rounds (lower is faster)")
    print(f"  in-process          {figures['rtf_in_process_median']:.4f}")
    print(f"  through the gateway {figures['rtf_gateway_median']:.4f}")
    print(f"  ratio               {ratio:.3f}  (target <= 1.1: {'met' if ratio <= 1.1 else 'MISSED'})")
    print("Ten sentences, medians")
    print(f"  streamed: first audio byte {figures['stream_first_audio_byte_s_median']:.3f} s, "
          f"last byte {figures['stream_total_s_median']:.3f} s")
    print(f"  not streamed: whole answer {figures['non_streamed_total_s_median']:.3f} s "
          f"(first-audio speed-up x{figures['non_streamed_total_s_median'] / figures['stream_first_audio_byte_s_median']:.1f})")
    print(f"  in-process first sentence  {figures['in_process_first_sentence_s_median']:.3f} s")
    print("Cache")
    print(f"  MISS {figures['cache_miss_s'] * 1000:.1f} ms; HIT p50 {figures['cache_hit_p50_ms']:.2f} ms, "
          f"p90 {figures['cache_hit_p90_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
