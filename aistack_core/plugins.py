"""Finding, loading and listing plugins.

Each entry point in the ``aistack`` group is loaded on its own.  Whatever
goes wrong while importing one (ImportError, a crash in module code, a bad
hook name, a plugin built for another plugin API) marks that plugin
``skipped`` with the error and the server carries on: one broken backend
never takes the gateway down.

Before a plugin's module is imported, its manifest (same name, group
``aistack.manifests``; see :mod:`aistack_core.manifest`) is read, so what
the plugin would serve, how to install it and which settings it reads are
known even when the module cannot be imported.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any, Iterable

import attrs
import pluggy

from . import hookspecs
from .manifest import PLUGIN_API_VERSION, PluginManifest

log = logging.getLogger("aistack.plugins")

ENTRY_POINT_GROUP = "aistack"
MANIFEST_GROUP = "aistack.manifests"
# What a plugin module (or plugin object) sets to say which plugin API it targets.
API_ATTRIBUTE = "AISTACK_PLUGIN_API"
# Where a plugin module (or object) may also hold its manifest, for when it has no
# manifest entry point (or is registered in memory, as tests do).
MANIFEST_ATTRIBUTE = "AISTACK_MANIFEST"


@attrs.define
class PluginRecord:
    """What ``aistack plugins`` and ``GET /-/plugins`` show for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    status: str  # "loaded" | "skipped" | "disabled"
    error: str | None = None
    registered: list[str] = attrs.field(factory=list)
    manifest: PluginManifest | None = None

    @property
    def install_hint(self) -> str | None:
        return self.manifest.install_hint if self.manifest is not None else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "registered": list(self.registered),
            "install_hint": self.install_hint,
            "settings": [setting.to_json() for setting in self.manifest.settings] if self.manifest else [],
        }


@attrs.define
class PluginSet:
    manager: pluggy.PluginManager
    records: dict[str, PluginRecord] = attrs.field(factory=dict)

    def record_for(self, plugin_name: str) -> PluginRecord:
        record = self.records.get(plugin_name)
        if record is None:
            record = self.records[plugin_name] = PluginRecord(plugin_name, None, None, "loaded")
        return record

    def register(self, plugin: object, name: str, manifest: PluginManifest | None = None) -> None:
        """Register an in-memory plugin (tests, embedders) and record it.

        Raises ``ValueError`` when the plugin or its manifest targets another
        plugin API: the caller is code, and should hear about it at once.
        """
        if manifest is None:
            carried = getattr(plugin, MANIFEST_ATTRIBUTE, None)
            # Registered under another name (an embedder's choice), it is not that plugin's record.
            if isinstance(carried, PluginManifest) and carried.name == name:
                manifest = carried
        problem = api_mismatch(name, manifest, plugin)
        if problem is not None:
            raise ValueError(problem)
        self.manager.register(plugin, name=name)
        self.record_for(name).manifest = manifest

    def skip(self, name: str, error: str) -> None:
        """Mark a plugin skipped and take it out of the manager: nothing of it runs from now on."""
        record = self.record_for(name)
        record.status = "skipped"
        record.error = error
        if self.manager.has_plugin(name):
            self.manager.unregister(name=name)
        log.warning("plugin %s skipped: %s", name, error)

    def manifests(self) -> list[PluginManifest]:
        return [record.manifest for record in self.records.values() if record.manifest is not None]

    def listing(self) -> list[dict]:
        return [record.to_json() for record in sorted(self.records.values(), key=lambda r: r.name)]


def make_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def api_mismatch(name: str, manifest: PluginManifest | None, module: object | None = None) -> str | None:
    """Why plugin ``name`` cannot be used with this core's plugin API, or None.

    A plugin that declares no version is taken to target version 1, the
    contract every plugin written before the declaration existed was built on.
    """
    declared = {}
    if manifest is not None:
        declared["its manifest"] = manifest.api_version
    if module is not None and hasattr(module, API_ATTRIBUTE):
        declared[API_ATTRIBUTE] = getattr(module, API_ATTRIBUTE)
    for where, version in declared.items():
        if not isinstance(version, int) or isinstance(version, bool):
            return f"{where} declares plugin API {version!r}, which is not a version number"
        if version != PLUGIN_API_VERSION:
            direction = "a newer" if version > PLUGIN_API_VERSION else "an older"
            return (
                f"built for aistack plugin API {version} ({where}), but this aistack speaks plugin API "
                f"{PLUGIN_API_VERSION}; install a release of the plugin made for {direction} aistack's "
                f"API {PLUGIN_API_VERSION}, or an aistack that speaks API {version}"
            )
    return None


def _entry_points(group: str) -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for entry_point in importlib.metadata.entry_points(group=group):
        found.setdefault(entry_point.name, entry_point)  # the same entry point seen twice on sys.path
    return found


def _checked_manifest(manifest: object, where: str, name: str) -> PluginManifest:
    if not isinstance(manifest, PluginManifest):
        raise TypeError(f"{where} is a {type(manifest).__name__}, not an aistack_core.PluginManifest")
    if manifest.name != name:
        raise ValueError(f"{where} describes plugin {manifest.name!r}, not {name!r}")
    return manifest


def _load_manifest(entry_point: importlib.metadata.EntryPoint, name: str) -> PluginManifest:
    return _checked_manifest(entry_point.load(), entry_point.value, name)


def _manifest_of(plugin: object, name: str) -> PluginManifest | None:
    """The manifest a plugin module or object carries as ``AISTACK_MANIFEST``, if any."""
    if not hasattr(plugin, MANIFEST_ATTRIBUTE):
        return None
    return _checked_manifest(getattr(plugin, MANIFEST_ATTRIBUTE), MANIFEST_ATTRIBUTE, name)


def load_plugins(load_entrypoints: bool = True, allow: Iterable[str] | None = None) -> PluginSet:
    """Build a plugin manager and load entry points one at a time.

    :param load_entrypoints: False gives an empty manager (tests register
        their own plugin objects).
    :param allow: entry-point names to load; ``None`` loads all, an empty
        collection loads none.  The others are listed as ``disabled``.

    Modules are imported in name order and registered in the reverse order:
    pluggy calls the last registered first, so plugins without ``tryfirst``
    or ``trylast`` run in name order.
    """
    plugins = PluginSet(make_plugin_manager())
    if not load_entrypoints:
        return plugins
    allowed = None if allow is None else set(allow)
    manifests = _entry_points(MANIFEST_GROUP)
    imported: list[tuple[str, object]] = []
    for name, entry_point in sorted(_entry_points(ENTRY_POINT_GROUP).items()):
        dist = getattr(entry_point, "dist", None)
        record = plugins.records[name] = PluginRecord(
            name=name,
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
            status="loaded",
        )
        disabled = allowed is not None and name not in allowed
        try:
            if name in manifests:
                record.manifest = _load_manifest(manifests[name], name)
        except BaseException as exc:  # noqa: BLE001 - isolation is the point
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            problem = f"its manifest could not be read: {_describe(exc)}"
            if not disabled:
                plugins.skip(name, problem)
                continue
            log.info("plugin %s (disabled): %s", name, problem)  # the operator turned it off; it stays "disabled"
        if disabled:
            record.status = "disabled"
            record.error = "not in AISTACK_LOAD_PLUGINS"
            continue
        # Checked before the import, so a plugin for another API never runs its module code.
        problem = api_mismatch(name, record.manifest)
        if problem is not None:
            plugins.skip(name, problem)
            continue
        try:
            module = entry_point.load()
        except BaseException as exc:  # noqa: BLE001 - isolation is the point
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            plugins.skip(name, _describe(exc))
            continue
        try:
            record.manifest = record.manifest or _manifest_of(module, name)
        except Exception as exc:  # noqa: BLE001
            plugins.skip(name, f"its manifest could not be read: {_describe(exc)}")
            continue
        problem = api_mismatch(name, record.manifest, module)
        if problem is not None:
            plugins.skip(name, problem)
            continue
        imported.append((name, module))
    for name, module in reversed(imported):
        try:
            plugins.manager.register(module, name=name)
            # A hookimpl with a typo'd name would otherwise silently never run.
            plugins.manager.check_pending()
        except Exception as exc:  # noqa: BLE001
            plugins.skip(name, _describe(exc))
    return plugins
