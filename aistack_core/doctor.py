"""``aistack doctor``: what a newcomer's set-up lacks, and what to do about it.

The core checks what it knows without naming a backend: which extras of the
aistack distribution are installed, what each plugin loaded or why it was
skipped, whether each registered upstream answers its probe, whether the
directories the server writes to are writable, free disk and memory.
Everything backend-specific (does the backend's library see a GPU, is a model file
there) comes from the plugins' ``doctor_checks`` hook.

A check is ``ok``, ``warn`` (worth knowing; the server works) or ``fail``
(the server cannot do what it is set up to do).  The command exits 1 when
any check fails.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import aiohttp

from .backends import DoctorCheck
from .config import Config
from .model_cache import free_memory_mb
from .plugins import PluginSet
from .registry import Registry

DISTRIBUTION = "aistack"
# Free space below which writing uploads, the speech cache and logs is at risk.
DISK_FAIL_BELOW_MB = 1024
DISK_WARN_BELOW_MB = 5 * 1024
UPSTREAM_PROBE_TIMEOUT_S = 3.0


# --- extras ---------------------------------------------------------------------

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def check_extras(distribution: str = DISTRIBUTION) -> DoctorCheck:
    """Which extras of the installed distribution have all their packages."""
    try:
        requirements = importlib.metadata.distribution(distribution).requires or []
    except importlib.metadata.PackageNotFoundError:
        return DoctorCheck("extras", "warn", f"{distribution} is not installed as a distribution, so its extras "
                           "cannot be read", f"pip install -e '.[default]' in the {distribution} checkout")
    by_extra: dict[str, list[str]] = {}
    for requirement in requirements:
        extra, name = _EXTRA_MARKER.search(requirement), _NAME.match(requirement)
        if extra is None or name is None or _normalized(name.group(1)) == _normalized(distribution):
            continue  # core requirements, and extras made of other extras
        by_extra.setdefault(extra.group(1), []).append(name.group(1))
    installed, absent, partial = [], [], []
    for extra, names in by_extra.items():
        missing = [name for name in names if not _installed(name)]
        if not missing:
            installed.append(extra)
        elif len(missing) == len(names):
            absent.append(extra)
        else:
            partial.append(f"{extra} (missing {', '.join(missing)})")
    detail = f"installed: {', '.join(installed) or 'none'}"
    if absent:
        detail += f"; not installed: {', '.join(absent)} (pip install '{distribution}[NAME]' adds one)"
    if partial:
        names = ",".join(entry.split(" ")[0] for entry in partial)
        return DoctorCheck("extras", "warn", f"{detail}; partly installed: {'; '.join(partial)}",
                           f"pip install '{distribution}[{names}]'")
    return DoctorCheck("extras", "ok", detail)


# --- plugins and upstreams ----------------------------------------------------------


def check_plugins(plugins: PluginSet, registry: Registry) -> list[DoctorCheck]:
    checks = []
    for item in plugins.listing():
        name = f"plugin {item['name']}"
        if item["status"] == "loaded":
            if item["registered"]:
                checks.append(DoctorCheck(name, "ok", "loaded: " + ", ".join(item["registered"])))
            else:
                checks.append(DoctorCheck(name, "warn", "loaded but registered nothing (see its log line at start)"))
        elif item["status"] == "disabled":
            checks.append(DoctorCheck(name, "ok", f"disabled ({item['error']})"))
        else:
            checks.append(DoctorCheck(name, "warn", f"skipped: {item['error']}", item.get("install_hint")))
    if not (registry.asr or registry.tts or registry.upstreams):
        checks.append(DoctorCheck("backends", "fail", "no plugin registered anything: the gateway would serve no model",
                                  "pip install -e '.[default]' (see the extras above)"))
    elif not registry.asr:
        checks.append(DoctorCheck("backends", "warn", "no in-process speech-to-text backend is registered",
                                  "install an extra that provides one (see the extras above)"))
    return checks


async def _probe_upstreams(registry: Registry, timeout_s: float) -> list[DoctorCheck]:
    async def probe(upstream, base_url: str) -> DoctorCheck:
        # One check per replica: with several URLs, each is named.
        name = f"upstream {upstream.name}" + (f" ({base_url})" if len(upstream.urls) > 1 else "")
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                cards = await asyncio.wait_for(upstream.probe(session, base_url), timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure means "does not answer"; the detail says which
            os_error = getattr(exc, "os_error", None)  # aiohttp's connection errors carry the socket's
            if isinstance(exc, asyncio.TimeoutError):
                reason = f"no answer within {timeout_s:g} s"
            elif os_error is not None and os_error.strerror:
                reason = os_error.strerror.lower()
            else:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return DoctorCheck(name, "warn", f"does not answer at {base_url} ({reason})",
                               upstream.unreachable_hint)
        if not cards:
            return DoctorCheck(name, "warn", f"answers at {base_url} but offers no model yet",
                               upstream.unreachable_hint)
        return DoctorCheck(name, "ok", f"answers at {base_url}: " + ", ".join(c.id for c in cards))

    replicas = [(entry.backend, url) for entry in registry.upstreams.values() for url in entry.backend.urls]
    return list(await asyncio.gather(*(probe(upstream, url) for upstream, url in replicas)))


# --- directories, disk, memory --------------------------------------------------------


def _directories(config: Config) -> list[tuple[str, Path, str]]:
    wanted = [("upload dir", config.upload_dir, "AISTACK_UPLOAD_DIR")]
    if config.tts_cache_ttl_min > 0:
        wanted.append(("speech cache dir", config.tts_cache_dir, "AISTACK_TTS_CACHE_DIR"))
    if config.obs_access_log:
        wanted.append(("log dir", config.obs_log_dir, "AISTACK_OBS_LOG_DIR"))
    if config.obs_payload:
        wanted.append(("payload dir", config.obs_payload_dir, "AISTACK_OBS_PAYLOAD_DIR"))
    return wanted


def check_writable(label: str, directory: Path, variable: str) -> DoctorCheck:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".aistack-doctor-"):
            pass
    except OSError as exc:
        return DoctorCheck(label, "fail", f"{directory} is not writable ({exc.strerror or exc})",
                           f"make it writable, or set {variable} to a directory that is")
    return DoctorCheck(label, "ok", f"{directory} is writable")


def _existing_ancestor(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def check_disk(directories: Iterable[Path]) -> list[DoctorCheck]:
    checks, seen = [], set()
    for directory in directories:
        existing = _existing_ancestor(directory)
        if existing is None:
            continue
        try:
            device = os.stat(existing).st_dev
            if device in seen:
                continue
            seen.add(device)
            free_mb = shutil.disk_usage(existing).free / (1024 * 1024)
        except OSError:
            continue
        detail = f"{free_mb / 1024:.1f} GB free where {directory} lives"
        if free_mb < DISK_FAIL_BELOW_MB:
            checks.append(DoctorCheck("disk", "fail", detail, "free some space (uploads and the caches need it)"))
        elif free_mb < DISK_WARN_BELOW_MB:
            checks.append(DoctorCheck("disk", "warn", detail, "long uploads and the speech cache may fill it"))
        else:
            checks.append(DoctorCheck("disk", "ok", detail))
    return checks


def check_memory(config: Config) -> DoctorCheck:
    free = free_memory_mb()
    if free is None:
        return DoctorCheck("memory", "warn", "free memory cannot be read on this system")
    detail = f"{free / 1024:.1f} GB available"
    if free < config.min_free_ram_mb:
        return DoctorCheck("memory", "warn", f"{detail}, below AISTACK_MIN_FREE_RAM_MB={config.min_free_ram_mb}: "
                           "idle models will be dropped before every load", "close other programs or lower the setting")
    return DoctorCheck("memory", "ok", detail)


# --- the plugins' own checks ------------------------------------------------------------


def plugin_checks(plugins: PluginSet, config: Config) -> list[DoctorCheck]:
    """Each plugin's ``doctor_checks`` on its own, so one broken check never hides the others."""
    checks: list[DoctorCheck] = []
    for impl in plugins.manager.hook.doctor_checks.get_hookimpls():
        arguments = {"config": config}
        try:
            found = impl.function(**{name: arguments[name] for name in impl.argnames})
            found = list(found or ())
            bad = [item for item in found if not isinstance(item, DoctorCheck)]
            if bad:
                raise TypeError(f"returned {bad[0]!r}, not a DoctorCheck")
        except Exception as exc:  # noqa: BLE001 - reported as a failed check, which is what the user needs
            checks.append(DoctorCheck(f"plugin {impl.plugin_name}", "fail",
                                      f"its doctor check crashed: {type(exc).__name__}: {exc}",
                                      "report it to the plugin's authors"))
            continue
        checks.extend(found)
    return checks


def run_checks(config: Config, plugins: PluginSet) -> list[DoctorCheck]:
    """Every check, in the order they are printed."""
    registry = Registry.from_plugins(plugins, config)
    checks = [check_extras(), *check_plugins(plugins, registry), *plugin_checks(plugins, config)]
    if registry.upstreams:
        checks.extend(asyncio.run(_probe_upstreams(registry, max(UPSTREAM_PROBE_TIMEOUT_S, config.probe_timeout_s))))
    directories = _directories(config)
    checks.extend(check_writable(label, path, variable) for label, path, variable in directories)
    checks.extend(check_disk(path for _, path, _ in directories))
    checks.append(check_memory(config))
    return checks


def report(checks: list[DoctorCheck]) -> tuple[str, int]:
    """The text ``aistack doctor`` prints, and its exit status."""
    width = max((len(check.name) for check in checks), default=0)
    lines = []
    for check in checks:
        lines.append(f"{check.status:<5} {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != "ok":
            lines.append(f"{'':<5} {'':<{width}}  fix: {check.fix}")
    failures = [check for check in checks if check.status == "fail"]
    warnings = [check for check in checks if check.status == "warn"]
    lines.append("")
    if failures:
        lines.append(f"{len(failures)} problem{'s' if len(failures) > 1 else ''} to fix:")
        lines.extend(f"  - {check.name}: {check.detail}" + (f" -> {check.fix}" if check.fix else "")
                     for check in failures)
    else:
        lines.append("All is well" + (f" ({len(warnings)} note{'s' if len(warnings) > 1 else ''} above)."
                                      if warnings else "."))
    return "\n".join(lines) + "\n", 1 if failures else 0
