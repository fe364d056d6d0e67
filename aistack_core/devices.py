"""The devices inferences run on: which there are, and which an upstream uses.

``AISTACK_DEVICES`` names them:

- ``auto`` (the default): every GPU a loaded plugin's library can see (the
  ``list_devices`` hook), else one ``cpu`` device;
- an explicit list, ``cuda:0,cuda:1`` (``cuda`` alone means ``cuda:0``);
- ``cpu*N``: N CPU devices ``cpu:0`` … ``cpu:N-1``, each model instance
  using its share of the cores (``Device.cpu_threads``).

Each device gets one slot (:mod:`aistack_core.slot`) and its own resident
models (:mod:`aistack_core.model_cache`).  The core never asks a GPU library
itself: plugins answer the ``list_devices`` and ``device_free_memory_mb``
hooks.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Iterable, Sequence

import attrs

log = logging.getLogger("aistack.devices")

CPU = "cpu"
CUDA = "cuda"
KINDS = (CPU, CUDA)
# More CPU slots than this is a typo, not a machine.
MAX_CPU_SLOTS = 256

_CPU_SLOTS = re.compile(r"cpu\s*\*\s*(\d+)")
_NAMED = re.compile(r"(cpu|cuda)(?::(\d+))?")


@attrs.frozen
class Device:
    """One place a model can be loaded and run: what a backend's ``load(device)`` receives.

    ``name`` is what the gateway reports ("cuda:1", "cpu", "cpu:0"); ``kind``
    is ``cpu`` or ``cuda`` and ``index`` the GPU number (0 for CPU devices).
    ``cpu_threads`` is the number of cores this device's models should use
    (0: the library's own default, all cores).
    """

    name: str
    kind: str
    index: int = 0
    cpu_threads: int = 0

    def __str__(self) -> str:
        return self.name

    @property
    def qualified_name(self) -> str:
        """``kind:index`` for a GPU, ``cpu`` for any CPU device: the form GPU libraries' device arguments take."""
        return f"{CUDA}:{self.index}" if self.kind == CUDA else CPU

    @property
    def uses_system_memory(self) -> bool:
        """True for CPU devices: their models share the machine's RAM."""
        return self.kind == CPU


def shares_system_memory(device_name: str) -> bool:
    """Whether the models on ``device_name`` live in system RAM (CPU devices)."""
    return device_name == CPU or device_name.startswith(CPU + ":")


def _cpu_devices(count: int, cores: int) -> list[Device]:
    if count < 1 or count > MAX_CPU_SLOTS:
        raise ValueError(f"cpu*N needs N between 1 and {MAX_CPU_SLOTS}, got {count}")
    share = max(1, cores // count)
    return [Device(f"{CPU}:{i}", CPU, i, share) for i in range(count)]


def parse_devices(value: str, *, cores: int | None = None) -> list[Device] | None:
    """Parse ``AISTACK_DEVICES``; None for ``auto`` (decided once plugins are loaded).

    Raises ``ValueError`` naming what is accepted for anything else.
    """
    text = (value or "").strip().lower()
    if text in ("", "auto"):
        return None
    cores = cores or os.cpu_count() or 1
    devices: list[Device] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        slots = _CPU_SLOTS.fullmatch(part)
        named = _NAMED.fullmatch(part)
        if slots is not None:
            devices.extend(_cpu_devices(int(slots.group(1)), cores))
        elif named is not None and named.group(1) == CUDA:
            index = int(named.group(2) or 0)
            devices.append(Device(f"{CUDA}:{index}", CUDA, index))
        elif named is not None and named.group(2) is None:
            devices.append(Device(CPU, CPU))
        else:
            raise ValueError(
                f"unknown device {part!r}: use auto, a list such as cuda:0,cuda:1, cpu, or cpu*N"
            )
    names = [device.name for device in devices]
    if not devices:
        raise ValueError("no device named: use auto, a list such as cuda:0,cuda:1, cpu, or cpu*N")
    if len(set(names)) != len(names):
        raise ValueError(f"a device is named twice in {value!r}")
    if CPU in names and any(name.startswith(CPU + ":") for name in names):
        raise ValueError("use either cpu or cpu*N, not both")
    return devices


def auto_devices(seen_by_plugins: Iterable[Iterable[str]]) -> list[Device]:
    """The GPUs any plugin's library reported (``list_devices``), else one CPU device."""
    indexes: set[int] = set()
    for names in seen_by_plugins:
        for name in names or ():
            named = _NAMED.fullmatch(str(name).strip().lower())
            if named is None or named.group(1) != CUDA:
                log.warning("a plugin reported device %r, which aistack does not drive; ignored", name)
                continue
            indexes.add(int(named.group(2) or 0))
    if not indexes:
        return [Device(CPU, CPU)]
    return [Device(f"{CUDA}:{i}", CUDA, i) for i in sorted(indexes)]


# --- which devices an upstream's engine uses ---------------------------------------


def parse_device_names(value: str | None) -> tuple[str, ...] | None:
    """An upstream's device setting: None when unset (the default applies), () for ``none``."""
    if value is None or not value.strip():
        return None
    text = value.strip().lower()
    if text == "none":
        return ()
    if text == "all":
        return ("all",)
    names = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        named = _NAMED.fullmatch(part)
        slots = _CPU_SLOTS.fullmatch(part)
        if named is None and slots is None:
            raise ValueError(f"unknown device {part!r}: use none, all, or names such as cuda:0,cuda:1")
        if slots is not None:
            names.extend(f"{CPU}:{i}" for i in range(int(slots.group(1))))
        elif named.group(1) == CUDA:
            names.append(f"{CUDA}:{int(named.group(2) or 0)}")
        else:
            names.append(part)
    return tuple(dict.fromkeys(names))


def upstream_devices(
    name: str, declared: Sequence[str] | None, uses_local_gpu: bool, devices: Sequence[Device]
) -> tuple[str, ...]:
    """The devices an upstream's work occupies.

    ``declared`` None: every device when the upstream runs on this machine
    (``uses_local_gpu``: the GPUs, or the CPU slots of a machine without
    one), none when it is elsewhere.  ``("all",)``: every device.  Names not
    among ``devices`` are a configuration mistake and raise ``ValueError``.
    """
    known = [device.name for device in devices]
    if declared is None:
        return tuple(known) if uses_local_gpu else ()
    if tuple(declared) == ("all",):
        return tuple(known)
    unknown = [device for device in declared if device not in known]
    if unknown:
        raise ValueError(
            f"upstream {name!r} declares device(s) {', '.join(unknown)}, but aistack runs on "
            f"{', '.join(known)} (AISTACK_DEVICES)"
        )
    return tuple(declared)


# --- asking the plugins ---------------------------------------------------------------


def configured_devices(config: Any, manager: Any) -> list[Device]:
    """``AISTACK_DEVICES`` as set, or for ``auto`` what the plugins' ``list_devices`` report.

    Each plugin is asked alone, so one whose library fails is logged and
    the others still count.
    """
    if config.devices:  # None (auto) or, programmatically, an empty list: ask the plugins
        return list(config.devices)
    answers = []
    for implementation in manager.hook.list_devices.get_hookimpls():
        try:
            answers.append(implementation.function(config=config))
        except Exception:  # noqa: BLE001 - a plugin's library may fail in any way
            log.warning("plugin %s could not list its devices", implementation.plugin_name, exc_info=True)
    return auto_devices(answers)


def free_memory_reader(manager: Any) -> Callable[[str], float | None]:
    """A function giving a GPU's free MB through the ``device_free_memory_mb`` hook (None: unknown)."""

    def read(device: str) -> float | None:
        try:
            free = manager.hook.device_free_memory_mb(device=device)
        except Exception:  # noqa: BLE001 - a plugin's library may fail in any way
            log.warning("reading the free memory of %s failed", device, exc_info=True)
            return None
        return None if free is None else float(free)

    return read
