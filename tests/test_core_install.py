"""The core alone installs and serves: ``pip install .`` with no extra.

The test runs ``aistack serve`` in a Python where every installed package
outside the closure of aistack's own ``install_requires`` refuses to import,
as on a machine where only the core was installed, and speaks HTTP to it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs in the child: compute what `pip install .` would have installed, hide the rest, serve.
CORE_ONLY = r"""
import importlib.metadata, sys
from packaging.requirements import Requirement

def closure(name, seen):
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    try:
        requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement, or not for this platform
        closure(requirement.name, seen)

allowed = set()
closure("aistack", allowed)
allowed |= {"pip", "setuptools", "wheel", "packaging"}
blocked = set()
for module, dists in importlib.metadata.packages_distributions().items():
    if not any(d.lower().replace("_", "-") in allowed for d in dists) and module not in ("aistack_core", "aistack_plugins"):
        blocked.add(module)

# None in sys.modules is Python's own "not importable": `import x` raises
# ModuleNotFoundError and importlib.util.find_spec("x") answers None, as for a
# package that is not installed.
for module in blocked:
    sys.modules.setdefault(module, None)
print("allowed:", sorted(allowed), file=sys.stderr, flush=True)
from aistack_core.cli import main
sys.exit(main(["serve", "--port", sys.argv[1]]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, json.loads(response.read())


def test_core_without_extras_serves_health_and_models(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "AISTACK_OBS_ACCESS_LOG": "off",
    }
    env.pop("AISTACK_LOAD_PLUGINS", None)
    server = subprocess.Popen(
        [sys.executable, "-c", CORE_ONLY, str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health = _get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the core-only server did not start"
                time.sleep(0.2)
        assert status == 200 and health["status"] == "ok"
        status, models = _get(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200 and models["object"] == "list"
        # No backend library imports here, so no in-process model is listed...
        assert not [m for m in models["data"] if m.get("capabilities") in (["asr"], ["tts"])
                    and not m.get("is_routing_alias")]
        status, plugins = _get(f"http://127.0.0.1:{port}/-/plugins")
        by_name = {p["name"]: p for p in plugins["plugins"]}
        # ...and the backends are listed as skipped, with the import that failed.
        assert by_name["faster_whisper"]["status"] == "skipped"
        assert "ModuleNotFoundError" in by_name["faster_whisper"]["error"]
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert "Traceback" not in stderr, stderr[-3000:]
