"""The command line as a newcomer meets it: a taken port, skipped plugins, ``aistack doctor``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import attrs

import aistack_plugins.faster_whisper
from aistack_core import DoctorCheck, hookimpl
from aistack_core.doctor import report, run_checks

from .upstreams import free_port, refused_url
from .upstreams.ollama import OllamaEmulator

ROOT = Path(__file__).resolve().parent.parent


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
        "AISTACK_UPLOAD_DIR": str(tmp_path / "uploads"),
        "AISTACK_TTS_CACHE_DIR": str(tmp_path / "cache"),
        "AISTACK_OBS_LOG_DIR": str(tmp_path / "logs"),
        **extra,
    }


def broken_distribution(tmp_path: Path) -> Path:
    """A site dir holding an installed distribution whose aistack plugin cannot import."""
    site = tmp_path / "site"
    info = site / "aistack_broken_backend-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aistack-broken-backend\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[aistack]\nbroken_backend = aistack_no_such_module_for_tests\n")
    return site


def run_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aistack_core", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


async def run_cli_async(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str, str]:
    """For a CLI that must reach an emulator served by this test's event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aistack_core", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, out.decode(), err.decode()


# --- serve ------------------------------------------------------------------------


def test_serve_on_a_taken_port_says_so_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port), env=cli_env(tmp_path, AISTACK_LOAD_PLUGINS=""), timeout=60)
    assert result.returncode == 1, result
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "listening" not in output
    problem = [line for line in result.stderr.splitlines() if line.startswith("aistack:")]
    assert problem == [
        f"aistack: port {port} on 127.0.0.1 is already in use (another aistack, or another server); "
        "choose another with --port N or AISTACK_PORT=N"
    ]


def test_serve_on_an_address_that_is_not_ours_says_so(tmp_path):
    result = run_cli("serve", "--host", "192.0.2.1", "--port", str(free_port()),
                     env=cli_env(tmp_path, AISTACK_LOAD_PLUGINS="", AISTACK_API_KEY="k"), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is not an address of this machine; set --host or AISTACK_HOST" in result.stderr


def test_a_skipped_plugin_is_logged_once_and_listed_with_its_error(tmp_path):
    site = broken_distribution(tmp_path)
    env = cli_env(tmp_path, AISTACK_LOAD_PLUGINS="broken_backend")
    env["PYTHONPATH"] += os.pathsep + str(site)
    with socket.socket() as taken:  # serve stops at the bind, after the start-up log
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", "--port", str(taken.getsockname()[1]), env=env, timeout=60)
    mentions = [line for line in result.stderr.splitlines() if "broken_backend" in line]
    assert len(mentions) == 1, result.stderr
    assert "skipped" in mentions[0] and "aistack_no_such_module_for_tests" in mentions[0]
    listed = run_cli("plugins", env=env, timeout=60)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("broken_backend"))
    assert "skipped" in row and "aistack-broken-backend 0.3" in row and "No module named" in row


# --- doctor -------------------------------------------------------------------------


async def test_doctor_on_a_healthy_set_up(tmp_path):
    emulator = OllamaEmulator()
    async with emulator.running():
        env = cli_env(tmp_path, AISTACK_LOAD_PLUGINS="faster_whisper,piper,ollama", AISTACK_OLLAMA_URL=emulator.url)
        code, out, err = await run_cli_async("doctor", env=env)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith("aistack ") and lines[-1].startswith("All is well")
    for expected in ("plugin faster_whisper", "plugin piper", "Whisper models", "Piper voices", "upload dir",
                     "speech cache dir", "log dir", "disk", "memory"):
        assert any(line.startswith("ok") and expected in line for line in lines), (expected, out)
    assert any(line.startswith("ok") and "upstream ollama" in line and "qwen3:4b" in line for line in lines), out
    # On this machine CTranslate2 sees no GPU, which is a note with a fix, not a failure.
    gpu = next(line for line in lines if "CTranslate2 GPU" in line)
    assert gpu.split()[0] in ("ok", "warn")
    assert "extras" in out and "installed:" in out


def test_doctor_on_a_broken_set_up_lists_what_to_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    site = broken_distribution(tmp_path)
    env = cli_env(tmp_path, AISTACK_LOAD_PLUGINS="faster_whisper,ollama,broken_backend",
                  AISTACK_UPLOAD_DIR=str(blocker / "uploads"), AISTACK_OLLAMA_URL=refused_url(),
                  AISTACK_WHISPER_DIR=str(tmp_path / "no-models"))
    env["PYTHONPATH"] += os.pathsep + str(site)
    result = run_cli("doctor", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    summary = out[out.index("to fix:"):]
    assert "upload dir" in summary and "AISTACK_UPLOAD_DIR" in summary
    assert "upstream ollama" not in summary  # a stopped upstream is a note, not a failure
    assert any(line.startswith("warn") and "upstream ollama" in line for line in out.splitlines())
    assert "ollama serve" in out
    assert any(line.startswith("warn") and "plugin broken_backend" in line for line in out.splitlines())

    as_json = json.loads(run_cli("doctor", "--json", env=env).stdout)
    assert as_json["ok"] is False
    failed = {check["name"] for check in as_json["checks"] if check["status"] == "fail"}
    assert "upload dir" in failed


# --- the hook -------------------------------------------------------------------------


class CheckingPlugin:
    def __init__(self, *checks: DoctorCheck) -> None:
        self.checks = checks

    @hookimpl
    def doctor_checks(self, config):
        return list(self.checks)


class CrashingPlugin:
    @hookimpl
    def doctor_checks(self, config):
        raise RuntimeError("the check itself is broken")


def test_hook_doctor_checks(base_config, plugin_set):
    config = attrs.evolve(base_config, obs_access_log=False)
    plugin_set.register(aistack_plugins.faster_whisper, name="faster_whisper")
    plugin_set.register(CheckingPlugin(DoctorCheck("widget", "ok", "present")), name="fine")
    checks = run_checks(config, plugin_set)
    assert DoctorCheck("widget", "ok", "present") in checks
    assert any(check.name == "Whisper models" for check in checks)  # a real plugin's own check
    assert report(checks)[1] == 0, report(checks)[0]

    plugin_set.register(CheckingPlugin(DoctorCheck("weights", "fail", "missing", "download them")), name="needy")
    plugin_set.register(CrashingPlugin(), name="crashing")
    checks = run_checks(config, plugin_set)
    text, status = report(checks)
    assert status == 1
    assert "  - weights: missing -> download them" in text
    crashed = next(check for check in checks if check.name == "plugin crashing" and check.status == "fail")
    assert "RuntimeError: the check itself is broken" in crashed.detail


def test_a_check_has_one_of_three_statuses():
    try:
        DoctorCheck("x", "fine", "?")
    except ValueError:
        pass
    else:
        raise AssertionError("a status outside ok/warn/fail was accepted")
