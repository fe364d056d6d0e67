"""What a plugin says about itself before (and without) being imported.

A plugin module imports its heavy library at the top, so a missing extra
means the module cannot be imported at all, and nothing inside it can be
asked which model ids it would have served.  The manifest is the part that
always imports: a small attrs object in a module with no heavy imports,
named by an entry point in the ``aistack.manifests`` group under the same
name as the plugin's own entry point.  The loader reads it first, so

* a request naming a model of a plugin whose extra is missing still
  answers with the install hint;
* ``aistack plugins`` and ``GET /-/plugins`` show the hint and the settings
  of a plugin that is skipped or disabled;
* a plugin built for another plugin API is skipped before its module (and
  its heavy library) is even imported.

A plugin without a manifest works as before; only those three things are
missing for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import attrs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .config import Config

# The version of the contract between the core and its plugins: the hooks,
# the protocols in ``aistack_core.backends`` and the names in ``__all__``.
# It changes only when a plugin written for the old contract would break.
PLUGIN_API_VERSION = 1

SETTING_KINDS = ("str", "bool", "int", "float", "path")
# What a declared default may be, per kind (None always: "unset").
_DEFAULT_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "bool": (bool,), "int": (int,), "float": (int, float), "path": (str, Path),
}


@attrs.frozen
class PluginSetting:
    """One environment variable a plugin reads, for ``read``, docs and listings.

    ``read(config)`` goes through the matching ``Config.env_<kind>`` helper
    with this ``default``, so the documented default is the one used.
    """

    name: str
    kind: str
    default: Any
    meaning: str

    def __attrs_post_init__(self) -> None:
        if self.kind not in SETTING_KINDS:
            raise ValueError(f"setting {self.name}: kind must be one of {', '.join(SETTING_KINDS)}, not {self.kind!r}")
        if not isinstance(self.name, str) or not self.name.startswith("AISTACK_"):
            raise ValueError(f"setting {self.name!r}: plugin settings are AISTACK_* variables")
        allowed = _DEFAULT_TYPES[self.kind]
        wrong_bool = isinstance(self.default, bool) and self.kind != "bool"
        if self.default is not None and (wrong_bool or not isinstance(self.default, allowed)):
            raise ValueError(f"setting {self.name}: a {self.kind} setting cannot default to {self.default!r}")

    def read(self, config: "Config") -> Any:
        default = self.default
        if self.kind == "path" and isinstance(default, str):
            default = Path(default).expanduser()
        return getattr(config, f"env_{self.kind}")(self.name, default)

    def to_json(self) -> dict[str, Any]:
        default = str(self.default) if isinstance(self.default, Path) else self.default
        return {"name": self.name, "kind": self.kind, "default": default, "meaning": self.meaning}


def _model_table(value: Mapping[str, Any]) -> Mapping[str, tuple[str, ...]]:
    table = {}
    for capability, ids in dict(value).items():
        ids = (ids,) if isinstance(ids, str) else tuple(ids)
        if not isinstance(capability, str) or not all(isinstance(i, str) and i.strip() for i in ids):
            raise ValueError(f"manifest models: {capability!r} must map to non-empty model id strings, got {ids!r}")
        table[capability] = ids
    return table


@attrs.frozen(eq=False)
class PluginManifest:
    """A plugin's light self-description.

    :param name: the plugin's entry-point name (``energy_asr``).
    :param summary: one line for listings.
    :param install_hint: what makes the plugin importable, said as a
        command (``pip install aistack-energy-asr``).
    :param models: capability -> model ids and aliases the plugin can serve
        (``{"asr": ("energy-vad",)}``).  Only ids that a client may name
        before anything is installed belong here; a request for one is
        answered with the install hint while the plugin is not loaded.
    :param settings: the environment variables it reads.
    :param api_version: the plugin API it was written for; the loader skips
        a plugin whose version differs from ``PLUGIN_API_VERSION``.
    """

    name: str
    summary: str = ""
    install_hint: str | None = None
    models: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, converter=_model_table)
    settings: tuple[PluginSetting, ...] = attrs.field(default=(), converter=tuple)
    api_version: int = PLUGIN_API_VERSION

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"manifest name must be the plugin's entry-point name, got {self.name!r}")
        if self.install_hint is not None and not isinstance(self.install_hint, str):
            raise ValueError(f"manifest {self.name}: install_hint must be a string, got {self.install_hint!r}")
        for setting in self.settings:
            if not isinstance(setting, PluginSetting):
                raise ValueError(f"manifest {self.name}: settings must be PluginSetting objects, got {setting!r}")

    def setting(self, name: str) -> PluginSetting:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise KeyError(f"plugin {self.name} declares no setting {name}")

    def serves(self, capability: str, model: str) -> bool:
        wanted = model.strip().lower()
        return any(known.lower() == wanted for known in self.models.get(capability, ()))
