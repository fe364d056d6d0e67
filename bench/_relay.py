"""What the relay benchmarks share: an emulator and an `aistack serve` in their own processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_emulator_and_gateway(
    emulator_module: str, plugin: str, url_variable: str, state_dir: str
) -> tuple[subprocess.Popen, subprocess.Popen, str, str]:
    """Start ``python -m <emulator_module>`` and a gateway with only ``plugin``
    pointed at it; returns (emulator, gateway, emulator URL, gateway URL)."""
    upstream_port, gateway_port = free_port(), free_port()
    emulator = subprocess.Popen([sys.executable, "-m", emulator_module, "--port", str(upstream_port)], cwd=ROOT)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AISTACK_PORT": str(gateway_port),
        "AISTACK_LOAD_PLUGINS": plugin,
        url_variable: f"http://127.0.0.1:{upstream_port}",
        "AISTACK_OBS_LOG_DIR": state_dir,
        "AISTACK_TTS_CACHE_DIR": state_dir,
    }
    log = open(Path(state_dir) / "gateway.log", "w")
    gateway = subprocess.Popen([sys.executable, "-m", "aistack_core", "serve"], cwd=ROOT, env=env, stderr=log)
    return emulator, gateway, f"http://127.0.0.1:{upstream_port}", f"http://127.0.0.1:{gateway_port}"


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")
