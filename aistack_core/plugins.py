"""Finding, loading and listing plugins.

Each entry point in the ``aistack`` group is loaded on its own.  Whatever
goes wrong while importing one (ImportError, a crash in module code, a bad
hook name) marks that plugin ``skipped`` with the error and the server
carries on: one broken backend never takes the gateway down.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Iterable

import attrs
import pluggy

from . import hookspecs

log = logging.getLogger("aistack.plugins")

ENTRY_POINT_GROUP = "aistack"


@attrs.define
class PluginRecord:
    """What ``aistack plugins`` and ``GET /-/plugins`` show for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    status: str  # "loaded" | "skipped" | "disabled"
    error: str | None = None
    registered: list[str] = attrs.field(factory=list)

    def to_json(self) -> dict:
        return attrs.asdict(self)


@attrs.define
class PluginSet:
    manager: pluggy.PluginManager
    records: dict[str, PluginRecord] = attrs.field(factory=dict)

    def record_for(self, plugin_name: str) -> PluginRecord:
        record = self.records.get(plugin_name)
        if record is None:
            record = self.records[plugin_name] = PluginRecord(plugin_name, None, None, "loaded")
        return record

    def register(self, plugin: object, name: str) -> None:
        """Register an in-memory plugin (tests, embedders) and record it."""
        self.manager.register(plugin, name=name)
        self.record_for(name)

    def unregister(self, name: str) -> None:
        self.manager.unregister(name=name)
        self.records.pop(name, None)

    def listing(self) -> list[dict]:
        return [record.to_json() for record in sorted(self.records.values(), key=lambda r: r.name)]


def make_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def load_plugins(load_entrypoints: bool = True, allow: Iterable[str] | None = None) -> PluginSet:
    """Build a plugin manager and load entry points one at a time.

    :param load_entrypoints: False gives an empty manager (tests register
        their own plugin objects).
    :param allow: entry-point names to load; ``None`` loads all, an empty
        collection loads none.  The others are listed as ``disabled``.
    """
    plugins = PluginSet(make_plugin_manager())
    if not load_entrypoints:
        return plugins
    allowed = None if allow is None else set(allow)
    for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        if entry_point.name in plugins.records:
            continue  # the same entry point seen twice on sys.path
        dist = getattr(entry_point, "dist", None)
        record = PluginRecord(
            name=entry_point.name,
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
            status="loaded",
        )
        plugins.records[entry_point.name] = record
        if allowed is not None and entry_point.name not in allowed:
            record.status = "disabled"
            record.error = "not in AISTACK_LOAD_PLUGINS"
            continue
        try:
            module = entry_point.load()
        except BaseException as exc:  # noqa: BLE001 - isolation is the point
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            _skip(record, exc)
            continue
        try:
            plugins.manager.register(module, name=entry_point.name)
            # A hookimpl with a typo'd name would otherwise silently never run.
            plugins.manager.check_pending()
        except Exception as exc:  # noqa: BLE001
            if plugins.manager.has_plugin(entry_point.name):
                plugins.manager.unregister(name=entry_point.name)
            _skip(record, exc)
    return plugins


def _skip(record: PluginRecord, exc: BaseException) -> None:
    record.status = "skipped"
    record.error = _describe(exc)
    log.warning("plugin %s skipped: %s", record.name, record.error)
