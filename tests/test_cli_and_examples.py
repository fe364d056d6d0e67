"""`aistack serve` as a user runs it, and the example third-party plugin installed with pip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import wave
from pathlib import Path

import pytest

import numpy as np

from .helpers import tone_wav, write_wav
from .upstreams import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "aistack-energy-asr"
TINY_TTS = ROOT / "examples" / "aistack-tiny-tts"


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def start_server(tmp_path, **env_extra) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "AISTACK_PORT": str(port), "AISTACK_OBS_LOG_DIR": str(tmp_path / "logs"),
           "AISTACK_TTS_CACHE_DIR": str(tmp_path / "cache"), **env_extra}
    process = subprocess.Popen(
        [sys.executable, "-m", "aistack_core", "serve"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            get_json(url + "/health", timeout=1)
            return process, url
        except OSError:
            if process.poll() is not None:
                raise AssertionError(process.stdout.read())
            time.sleep(0.1)
    process.kill()
    raise AssertionError("server did not start")


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> tuple[int, str]:
    process.send_signal(sig)
    output, _ = process.communicate(timeout=20)
    return process.returncode, output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_starts_logs_plugins_and_stops_cleanly(tmp_path, sig):
    process, url = start_server(tmp_path, AISTACK_LOAD_PLUGINS="faster_whisper,ollama")
    try:
        assert get_json(url + "/health")["status"] == "ok"
        ids = [m["id"] for m in get_json(url + "/v1/models")["data"]]
        assert "whisper-tiny.en" in ids and "auto" in ids
    finally:
        code, output = stop(process, sig)
    assert code == 0, output
    assert "plugin faster_whisper loaded" in output
    assert "plugin piper disabled" in output and "Traceback" not in output


def test_serve_rejects_a_bad_setting():
    result = subprocess.run([sys.executable, "-m", "aistack_core", "serve"], env={**os.environ, "AISTACK_PORT": "eleven"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "AISTACK_PORT" in result.stderr


def pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


def plugin_names(load: str) -> dict[str, dict]:
    """``aistack plugins --json``, importing only ``load`` (every other plugin is listed as disabled):
    the heavy backends' imports would only slow this down."""
    result = subprocess.run([sys.executable, "-m", "aistack_core", "plugins", "--json"],
                            env={**os.environ, "AISTACK_LOAD_PLUGINS": load},
                            capture_output=True, text=True, timeout=60)
    return {p["name"]: p for p in json.loads(result.stdout)}


def run_own_tests(example: Path, tmp_path: Path) -> None:
    """An example's own tests, written with aistack_core.testing, pass against the installed copy."""
    own_tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example / "tests")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert own_tests.returncode == 0, own_tests.stdout + own_tests.stderr
    assert " passed" in own_tests.stdout


def test_example_plugin_install_serve_uninstall(tmp_path):
    installed = pip("install", "-q", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    assert installed.returncode == 0, installed.stderr
    try:
        record = plugin_names("energy_asr")["energy_asr"]
        assert record["status"] == "loaded" and record["distribution"] == "aistack-energy-asr"
        assert record["registered"] == ["asr:energy-vad"]
        assert record["install_hint"] == "pip install ./examples/aistack-energy-asr"
        run_own_tests(EXAMPLE, tmp_path)
        process, url = start_server(tmp_path, AISTACK_LOAD_PLUGINS="energy_asr")
        try:
            assert "energy-vad" in [m["id"] for m in get_json(url + "/v1/models")["data"]]
            tone = tone_wav(tmp_path / "tone.wav", seconds=1.0)
            rate, samples = 16000, np.frombuffer(tone.read_bytes()[44:], dtype=np.int16)
            silence = np.zeros(rate, dtype=np.int16)
            wav = write_wav(tmp_path / "speech-span.wav", np.concatenate([silence, samples, silence]), rate)
            curl = subprocess.run(
                ["curl", "-s", "-F", f"file=@{wav}", "-F", "model=energy-vad", "-F", "response_format=verbose_json",
                 url + "/v1/audio/transcriptions"], capture_output=True, text=True, timeout=30,
            )
            body = json.loads(curl.stdout)
            assert [s["text"] for s in body["segments"]] == ["[speech]"]
            assert abs(body["segments"][0]["start"] - 1.0) < 0.1 and abs(body["segments"][0]["end"] - 2.0) < 0.1
        finally:
            stop(process)
    finally:
        removed = pip("uninstall", "-y", "-q", "aistack-energy-asr")
    assert removed.returncode == 0, removed.stderr
    assert "energy_asr" not in plugin_names("energy_asr")


def test_tiny_tts_example_install_test_serve_uninstall(tmp_path):
    installed = pip("install", "-q", "--no-deps", "--no-build-isolation", str(TINY_TTS))
    assert installed.returncode == 0, installed.stderr
    try:
        record = plugin_names("tiny_tts")["tiny_tts"]
        assert record["status"] == "loaded" and record["distribution"] == "aistack-tiny-tts"
        assert record["registered"] == ["tts:tiny-tts"]
        assert record["install_hint"] == "pip install ./examples/aistack-tiny-tts"
        assert [s["name"] for s in record["settings"]] == ["AISTACK_TINY_TTS_PITCH_HZ"]
        run_own_tests(TINY_TTS, tmp_path)
        process, url = start_server(tmp_path, AISTACK_LOAD_PLUGINS="tiny_tts")
        try:
            assert "tiny-tts" in [m["id"] for m in get_json(url + "/v1/models")["data"]]
            out = tmp_path / "hello.wav"
            curl = subprocess.run(
                ["curl", "-s", "-o", str(out), "-w", "%{http_code} %{content_type}", url + "/v1/audio/speech",
                 "-H", "Content-Type: application/json",
                 "-d", json.dumps({"model": "tiny-tts", "input": "Hello there. How are you?", "voice": "high",
                                   "response_format": "wav"})],
                capture_output=True, text=True, timeout=30,
            )
            assert curl.stdout == "200 audio/wav", curl.stdout
            with wave.open(str(out)) as audio:
                assert audio.getnframes() / audio.getframerate() > 1.0
        finally:
            stop(process)
    finally:
        removed = pip("uninstall", "-y", "-q", "aistack-tiny-tts")
    assert removed.returncode == 0, removed.stderr
    assert "tiny_tts" not in plugin_names("tiny_tts")
