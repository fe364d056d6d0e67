"""The hooks an aistack plugin may implement.

Plugins write ``from aistack_core import hookimpl`` and decorate functions
named after the specs below.  Every ``register_*`` hook receives a
``register`` callback instead of returning a list, so the core can check
each registration as it happens and remember which plugin made it.

Implementations run in pluggy's call order (``tryfirst`` ones first,
``trylast`` ones last, the rest last-registered first; entry points are
registered so that those run in name order).  Where two plugins claim the
same model id, the one called first keeps it.  A plugin's registrations
are all or nothing: if one is refused or its hook raises, everything it
registered is withdrawn and the plugin is listed as skipped with the reason.
The full guide is docs/plugins.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .backends import AsrBackend, DiarizationBackend, DoctorCheck, TtsBackend, Upstream, VadProvider
    from .config import Config

PROJECT = "aistack"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_asr_backends(register: "Callable[[AsrBackend], None]", config: "Config") -> None:
    """Register in-process speech-to-text backends.

    :param register: call once per backend with an object satisfying
        :class:`aistack_core.backends.AsrBackend`.  Registering an id or alias
        that another plugin already holds raises ``ValueError`` naming both
        (and skips this plugin).
    :param config: the server's settings; read plugin-specific variables
        with ``config.env_str`` / ``env_bool`` / ``env_int`` / ``env_float``
        / ``env_path`` (or a manifest's ``PluginSetting.read``).

    Import the backend's heavy library at the top of the plugin module: a
    module that fails to import is recorded as skipped and never called.
    Do not load weights here; ``AsrBackend.load`` is called on first use.
    """


@hookspec
def register_tts_backends(register: "Callable[[TtsBackend], None]", config: "Config") -> None:
    """Register in-process text-to-speech backends.

    :param register: call once per backend with an object satisfying
        :class:`aistack_core.backends.TtsBackend`.
    :param config: the server's settings.

    Requests whose ``model`` names one of these backends (or one of
    OpenAI's ``tts-1`` ids, mapped to the configured default) are served
    in-process; all other ``/v1/audio/*`` traffic goes to the TTS upstream.
    """


@hookspec
def register_upstreams(register: "Callable[[Upstream], None]", config: "Config") -> None:
    """Register HTTP upstreams the gateway proxies to.

    :param register: call once per :class:`aistack_core.backends.Upstream`.
    :param config: the server's settings.

    An upstream's models appear in ``/v1/models`` only while its ``probe``
    (``probe(session, base_url)``, called for each of its URLs) answers
    within the probe deadline.  Several upstreams may share a capability:
    a request's ``model`` then picks the one whose probe lists it.
    """


@hookspec
def list_devices(config: "Config") -> "list[str]":
    """Name the GPUs this plugin's library can see, for ``AISTACK_DEVICES=auto``.

    :param config: the server's settings.
    :return: device names such as ``["cuda:0", "cuda:1"]`` (an empty list
        when the library sees none).  The core uses the union of every
        plugin's answer; with none at all it runs on one ``cpu`` device.

    Called once while the app is built.  Ask the library for a count only
    (no model load, no memory allocation); a hook that raises is logged and
    ignored.
    """


@hookspec(firstresult=True)
def device_free_memory_mb(device: str) -> "float | None":
    """Say how much memory is free on a GPU, for eviction before a load.

    :param device: a device name from ``AISTACK_DEVICES`` (``"cuda:1"``);
        never a CPU device, whose free memory the core reads itself.
    :return: free megabytes on that device, or None when this plugin's
        library cannot tell.

    Stops at first non-None result.  Called from a worker thread before an
    in-process model loads onto ``device``; it may block briefly.
    """


@hookspec
def doctor_checks(config: "Config") -> "list[DoctorCheck]":
    """Check what this plugin needs, for ``aistack doctor``.

    :param config: the server's settings.
    :return: a list of :class:`aistack_core.DoctorCheck`, each ``ok``,
        ``warn`` (the server works, but the user should know: no GPU visible
        to the backend's library, so it runs on the CPU) or ``fail`` (this
        backend cannot serve as set up: its weights are missing), with a
        ``fix`` the user can act on for anything not ``ok``.

    Keep it quick and read-only: look at files and ask the library what it
    sees; never load a model or download anything.  Reachability of the
    upstreams a plugin registers is checked by the core through their
    ``probe``.  A check that raises is reported as a ``fail`` naming the
    plugin.
    """


@hookspec
def register_diarization_backends(register: "Callable[[DiarizationBackend], None]", config: "Config") -> None:
    """Register in-process speaker diarization backends (who spoke when).

    :param register: call once per backend with an object satisfying
        :class:`aistack_core.backends.DiarizationBackend`.  Registering an id
        or alias that another plugin already holds raises ``ValueError``.
    :param config: the server's settings; read plugin-specific variables
        from ``config.env``.

    Any installed speech-to-text backend supplies the words: the core
    assigns them to the turns this backend finds, for
    ``response_format=diarized_json`` and ``/v1/audio/diarization``.  As for
    ASR backends, load no weights here; ``load`` is called on first use.
    """


@hookspec
def register_vad(register: "Callable[[VadProvider], None]", config: "Config") -> None:
    """Register voice activity detectors for live transcription's server-side turn detection.

    :param register: call once per :class:`aistack_core.backends.VadProvider`.
        Registering a ``name`` another plugin already holds raises
        ``ValueError`` naming both.
    :param config: the server's settings.

    A realtime session with ``turn_detection: {"type": "server_vad"}`` uses
    the first registered detector (in pluggy's call order); with none, the
    core falls back to a plain loudness gate.  Detectors run on the CPU in
    worker threads and never take the GPU slot; do not load weights here,
    load them on the first ``open_stream``.
    """
