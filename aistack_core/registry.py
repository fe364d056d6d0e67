"""What the plugins registered, and how a request's ``model`` finds its backend."""

from __future__ import annotations

import logging
from typing import Any

import attrs

from .backends import AsrBackend, DiarizationBackend, ModelCard, TtsBackend, Upstream, VadProvider, backend_unavailable
from .config import Config
from .errors import Malformed
from .helpers import normalize_language
from .plugins import PluginSet

log = logging.getLogger("aistack.registry")

AUTO_ALIAS = "auto"
# OpenAI's diarizing transcription model: here the best installed speech-to-text
# backend (as ``auto`` picks it) plus the best installed diarizer.
DIARIZE_ALIAS = "gpt-4o-transcribe-diarize"
# OpenAI-style error code of every "that model is not installed here" answer.
NOT_INSTALLED_CODE = "model_not_installed"
# OpenAI's own TTS ids: served by the configured in-process default, else the upstream.
OPENAI_TTS_IDS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# Registrations keyed by their ``name`` rather than a model card: kind -> (type, what it is called)
NAMED_KINDS = {"upstream": (Upstream, "upstream"), "vad": (VadProvider, "voice activity detector")}
# Names the gateway resolves before looking at the registry, so no backend may take them.
RESERVED_NAMES = {"asr": (AUTO_ALIAS, DIARIZE_ALIAS), "tts": OPENAI_TTS_IDS, "diarization": (DIARIZE_ALIAS,)}
# hook name -> the table its registrations go to
REGISTER_HOOKS = (
    ("register_asr_backends", "asr"),
    ("register_tts_backends", "tts"),
    ("register_upstreams", "upstream"),
    ("register_diarization_backends", "diarization"),
    ("register_vad", "vad"),
)
# OpenAI's newer speech-to-text ids: here they mean ``auto`` (the best local
# backend for the language).
OPENAI_AUTO_ASR_IDS = ("gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-transcribe")
# OpenAI's speech-to-text ids that GET /v1/models lists as routing aliases
# (whisper-1 is claimed by the backend that stands for it).
OPENAI_ASR_IDS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")


@attrs.frozen
class Registered:
    backend: Any
    plugin: str

    @property
    def card(self) -> ModelCard:
        return self.backend.card


def is_auto(model: str | None) -> bool:
    """Whether ``model`` asks for the ``auto`` routing (empty, ``auto`` or an OpenAI id meaning it)."""
    name = (model or "").strip().lower()
    return name in ("", AUTO_ALIAS, *OPENAI_AUTO_ASR_IDS)


class RegistrationError(ValueError):
    """A registration the registry refuses (a clash, a wrong type); rolls back the plugin's batch."""


@attrs.define
class _Batch:
    """What one plugin registers during one hook call; it lands only if all of it is accepted."""

    plugin: str
    capability: str
    entries: list[tuple[str, Registered, tuple[str, ...]]] = attrs.field(factory=list)  # (key, entry, names)
    error: str | None = None
    open: bool = True


@attrs.define
class Registry:
    asr: dict[str, Registered] = attrs.field(factory=dict)
    tts: dict[str, Registered] = attrs.field(factory=dict)
    upstreams: dict[str, Registered] = attrs.field(factory=dict)
    diarization: dict[str, Registered] = attrs.field(factory=dict)
    vad: dict[str, Registered] = attrs.field(factory=dict)  # voice activity detectors, by name
    _names: dict[tuple[str, str], str] = attrs.field(factory=dict)  # (capability, lowercase id/alias) -> id
    tts_default: str | None = None
    plugins: PluginSet | None = None

    # --- building -------------------------------------------------------------

    @classmethod
    def from_plugins(cls, plugins: PluginSet, config: Config) -> "Registry":
        """Call every ``register_*`` hook implementation, in pluggy's call order.

        pluggy calls implementations last-registered first, with ``tryfirst``
        ones before and ``trylast`` ones after the rest; ``get_hookimpls()``
        lists them in the reverse of that, so we walk it backwards.  Each
        implementation is called on its own so its registrations can be
        checked and attributed.  A plugin whose hook raises or registers
        something refused is skipped as a whole: what it registered in this
        and earlier hooks is withdrawn, and its later hooks are not called.
        """
        registry = cls(plugins=plugins)
        for record in plugins.records.values():
            record.registered = []
        for hook_name, capability in REGISTER_HOOKS:
            caller = getattr(plugins.manager.hook, hook_name)
            for impl in reversed(caller.get_hookimpls()):
                if not plugins.manager.has_plugin(impl.plugin_name):
                    continue  # skipped by an earlier hook of this loop
                registry._call_one(plugins, impl, capability, config)
        registry.tts_default = registry._pick_tts_default(config)
        return registry

    def _call_one(self, plugins: PluginSet, impl, capability: str, config: Config) -> None:
        batch = _Batch(impl.plugin_name, capability)
        if impl.hookwrapper or impl.wrapper:
            batch.error = f"{impl.function.__name__}: hook wrappers are not supported on register_* hooks"
        else:
            arguments = {"register": lambda obj: self._stage(batch, obj), "config": config}
            try:
                impl.function(**{name: arguments[name] for name in impl.argnames})
            except Exception as exc:  # noqa: BLE001 - one plugin's bug must not stop the others
                if batch.error is None:
                    batch.error = f"{impl.function.__name__} failed: {type(exc).__name__}: {exc}"
            finally:
                batch.open = False
        if batch.error is not None:
            self._withdraw(batch.plugin)
            plugins.skip(batch.plugin, batch.error)
            return
        self._commit(batch)

    def _table(self, capability: str) -> dict[str, Registered]:
        """The in-process table of ``capability``; anything else (``upstream``, ``llm``) is an upstream."""
        tables = {"asr": self.asr, "tts": self.tts, "diarization": self.diarization, "vad": self.vad}
        return tables.get(capability, self.upstreams)

    def _stage(self, batch: _Batch, obj: Any) -> None:
        """The ``register`` callback: check one registration and hold it in the batch."""
        try:
            if not batch.open:
                raise RegistrationError(
                    f"plugin {batch.plugin!r} called register after its hook returned; register inside the hook"
                )
            try:
                batch.entries.append(self._check(batch, obj))
            except RegistrationError:
                raise
            except Exception as exc:  # noqa: BLE001 - a malformed object (card without an id, ...) is refused too
                raise RegistrationError(
                    f"plugin {batch.plugin!r} registered {obj!r}, which cannot be used: {type(exc).__name__}: {exc}"
                ) from exc
        except RegistrationError as exc:
            if batch.error is None:  # the first refusal is the reason, even if the plugin swallows it
                batch.error = str(exc)
            raise

    def _check(self, batch: _Batch, obj: Any) -> tuple[str, Registered, tuple[str, ...]]:
        capability, plugin = batch.capability, batch.plugin
        if capability in NAMED_KINDS:
            kind, what = NAMED_KINDS[capability]
            if not isinstance(obj, kind):
                raise RegistrationError(f"plugin {plugin!r} registered {obj!r}, which is not a {kind.__name__}")
            key, names = obj.name, (obj.name.lower(),)
            taken = {name.lower(): entry.plugin for name, entry in self._table(capability).items()}
        else:
            protocol = {"asr": AsrBackend, "tts": TtsBackend, "diarization": DiarizationBackend}[capability]
            if not isinstance(obj, protocol):
                raise RegistrationError(f"plugin {plugin!r} registered {obj!r}, which is not a {protocol.__name__}")
            key, what = obj.card.id, f"{capability} model id"
            given = (obj.card.id, *obj.card.aliases)
            if not all(isinstance(name, str) and name.strip() == name and name for name in given):
                raise RegistrationError(
                    f"plugin {plugin!r} registered {what}s {given!r}: each must be a non-empty string "
                    f"without surrounding spaces"
                )
            names = tuple(dict.fromkeys(name.lower() for name in given))
            reserved = sorted(set(names) & set(RESERVED_NAMES.get(capability, ())))
            if reserved:
                raise RegistrationError(
                    f"plugin {plugin!r} registered {what} {reserved[0]!r}, which the gateway itself answers "
                    f"(it would never reach the plugin)"
                )
            table = self._table(capability)
            taken = {name: table[model_id].plugin for (cap, name), model_id in self._names.items() if cap == capability}
        for _, _, staged in batch.entries:
            taken.update(dict.fromkeys(staged, plugin))
        for name in names:
            if name in taken:
                raise RegistrationError(
                    f"{what} {name!r} from plugin {plugin!r} is already registered by plugin {taken[name]!r}"
                )
        return key, Registered(obj, plugin), names

    def _commit(self, batch: _Batch) -> None:
        table = self._table(batch.capability)
        record = self.plugins.record_for(batch.plugin) if self.plugins is not None else None
        for key, entry, names in batch.entries:
            table[key] = entry
            if batch.capability not in NAMED_KINDS:
                for name in names:
                    self._names[(batch.capability, name)] = key
            if record is not None:
                record.registered.append(f"{batch.capability}:{key}")

    def _withdraw(self, plugin: str) -> None:
        """Remove everything ``plugin`` registered in earlier hooks."""
        for capability in ("asr", "tts", "diarization", *NAMED_KINDS):
            table = self._table(capability)
            for key in [key for key, entry in table.items() if entry.plugin == plugin]:
                del table[key]
        self._names = {
            (capability, name): model_id
            for (capability, name), model_id in self._names.items()
            if model_id in self._table(capability)
        }
        if self.plugins is not None and plugin in self.plugins.records:
            self.plugins.records[plugin].registered = []

    def vad_provider(self) -> VadProvider | None:
        """The detector server-side turn detection uses: the first registered, else None."""
        for entry in self.vad.values():
            return entry.backend
        return None

    def _pick_tts_default(self, config: Config) -> str | None:
        if config.tts_default:
            found = self._names.get(("tts", config.tts_default.lower()))
            if found:
                return found
            log.warning("AISTACK_TTS_DEFAULT=%s names no installed TTS model", config.tts_default)
        if not self.tts:
            return None
        return min(self.tts.values(), key=lambda r: (r.card.auto_priority, r.card.id)).card.id

    # --- resolving --------------------------------------------------------------

    def _not_installed(self, capability: str, model: str) -> Malformed | None:
        """An actionable 400 for an id a plugin's manifest claims, when nothing serves it here.

        Permanent until the operator acts, so a client must not retry it.
        """
        if self.plugins is None:
            return None
        for record in sorted(self.plugins.records.values(), key=lambda r: r.name):
            manifest = record.manifest
            if manifest is None or not manifest.serves(capability, model):
                continue
            if record.status == "loaded":
                return Malformed(
                    f"Model {model!r} is not available locally: its plugin {record.name} is loaded but has "
                    f"no copy of this model. Use one listed by GET /v1/models, or allow downloads with "
                    f"AISTACK_ALLOW_DOWNLOADS=on.",
                    code=NOT_INSTALLED_CODE, param="model",
                )
            if record.status == "disabled":
                return Malformed(
                    f"Model {model!r} is served by plugin {record.name}, which is disabled on this server "
                    f"(not in AISTACK_LOAD_PLUGINS).",
                    code=NOT_INSTALLED_CODE, param="model",
                )
            hint = f" Install it with: {manifest.install_hint}" if manifest.install_hint else ""
            return Malformed(
                f"Model {model!r} needs the {record.name} plugin, which is not installed "
                f"(plugin {record.name} is {record.status}: {record.error}).{hint}",
                code=NOT_INSTALLED_CODE, param="model",
            )
        return None

    def _install_hints(self, capability: str) -> list[str]:
        if self.plugins is None:
            return []
        return [m.install_hint for m in self.plugins.manifests() if m.install_hint and m.models.get(capability)]

    def _available(self, capability: str) -> str:
        ids = sorted(self._table(capability))
        if capability == "asr" and ids:
            ids.insert(0, AUTO_ALIAS)
        return ", ".join(ids) or "none installed"

    def find(self, capability: str, model: str) -> Registered | None:
        model_id = self._names.get((capability, model.lower()))
        if model_id is None:
            return None
        return self._table(capability)[model_id]

    def find_any(self, model: str) -> Registered | None:
        """The in-process entry of any capability that ``model`` names (for "wrong capability" errors)."""
        for capability in ("asr", "tts"):
            found = self.find(capability, model)
            if found is not None:
                return found
        return None

    def resolve_asr(self, model: str | None, language: str | None) -> Registered:
        model = (model or "").strip()
        if (is_auto(model) or model.lower() == DIARIZE_ALIAS) and self.find("asr", model) is None:
            return self.pick_auto(language)
        found = self.find("asr", model)
        if found is not None:
            return found
        missing = self._not_installed("asr", model)
        if missing is not None:
            raise missing
        raise Malformed(
            f"Unknown speech-to-text model {model!r}. Available: {self._available('asr')}.",
            param="model", code="model_not_found",
        )

    def pick_auto(self, language: str | None) -> Registered:
        """The ``auto`` alias: the preferred backend for the language, else the best that can do it."""
        if not self.asr:
            hints = self._install_hints("asr")
            how = f"Install one with: {' or '.join(hints)}" if hints else "Install a plugin that registers one"
            raise Malformed(f"No speech-to-text backend is installed. {how}.", code=NOT_INSTALLED_CODE, param="model")
        lang = normalize_language(language)
        ranked = sorted(self.asr.values(), key=lambda r: (r.card.auto_priority, r.card.id))
        # Skip backends that cannot serve now; if none can, the best one's own error explains why.
        pool = [r for r in ranked if backend_unavailable(r.backend) is None] or ranked[:1]
        if lang:
            preferred = [r for r in pool if lang in r.card.auto_languages]
            if preferred:
                return preferred[0]
            capable = [r for r in pool if r.card.languages is None or lang in r.card.languages]
            if capable:
                return capable[0]
        return pool[0]

    def serving(self, capability: str) -> list[Registered]:
        """In-process backends that can serve now (blocking file checks: call from a thread)."""
        table = self._table(capability)
        return [entry for entry in table.values() if backend_unavailable(entry.backend) is None]

    def auto_card(self, pool: list[Registered]) -> dict | None:
        if not pool:
            return None
        return {
            "id": AUTO_ALIAS,
            "object": "model",
            "created": 0,
            "owned_by": "aistack",
            "capabilities": ["asr"],
            "supports_streaming": all(r.card.supports_streaming for r in pool),
            "is_routing_alias": True,
        }

    def resolve_diarization(self, model: str | None = None) -> Registered:
        """The diarizer ``model`` names, or the best installed one (blocking file checks: call from a thread)."""
        name = (model or "").strip()
        if name and name.lower() != DIARIZE_ALIAS:
            found = self.find("diarization", name)
            if found is None:
                missing = self._not_installed("diarization", name)
                if missing is not None:
                    raise missing
                raise Malformed(
                    f"Unknown diarization model {name!r}. Available: {self._available('diarization')}.",
                    param="diarization_model", code="model_not_found",
                )
            return found
        if not self.diarization:
            hints = self._install_hints("diarization")
            how = f"Install one with: {' or '.join(hints)}" if hints else "Install a plugin that registers one"
            raise Malformed(
                f"Speaker diarization needs a diarization backend, and none is installed. {how}.",
                param="response_format", code="diarization_not_installed",
            )
        ranked = sorted(self.diarization.values(), key=lambda r: (r.card.auto_priority, r.card.id))
        pool = [r for r in ranked if backend_unavailable(r.backend) is None] or ranked[:1]
        return pool[0]

    def diarize_alias_card(self, asr_pool: list[Registered], diarizer_pool: list[Registered]) -> dict | None:
        """The ``gpt-4o-transcribe-diarize`` entry of /v1/models, while both halves can serve."""
        if not asr_pool or not diarizer_pool:
            return None
        return {
            "id": DIARIZE_ALIAS,
            "object": "model",
            "created": 0,
            "owned_by": "aistack",
            "capabilities": ["asr", "diarization"],
            "supports_streaming": True,
            "is_routing_alias": True,
        }

    def resolve_tts(self, model: str | None) -> Registered | None:
        """The in-process TTS backend for ``model``, or None when the upstream should serve it."""
        name = (model or "").strip()
        if name.lower() in OPENAI_TTS_IDS:
            return self.tts.get(self.tts_default) if self.tts_default else None
        return self.find("tts", name) if name else None

    def upstream_for(self, capability: str) -> Registered | None:
        """The first upstream of ``capability`` (the one that serves when model ids do not choose)."""
        entries = self.upstreams_for(capability)
        return entries[0] if entries else None

    def upstreams_for(self, capability: str) -> list[Registered]:
        """Every upstream of ``capability``, in pluggy's order (upstreams.py routes a model among them)."""
        return [entry for entry in self.upstreams.values() if entry.backend.capability == capability]
