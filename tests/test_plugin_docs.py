"""docs/plugins.md keeps up with the code (datasette's meta-tests, adapted).

Every hook spec is documented with its signature and has a test named
``test_hook_<name>``; every name plugins may import is documented; the
examples on the page run.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import attrs
import pytest

import aistack_core
import aistack_core.testing
from aistack_core import hookspecs

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "docs" / "plugins.md").read_text()


def hook_specs() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(function)
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, f"{hookspecs.PROJECT}_spec")
    }


def test_hooks_are_found():
    assert set(hook_specs()) >= {"register_asr_backends", "register_tts_backends", "register_upstreams"}


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_every_hook_is_documented_with_its_signature(name):
    parameters = ", ".join(hook_specs()[name].parameters)
    assert f"### {name}({parameters})" in DOCS, f"docs/plugins.md needs a '### {name}({parameters})' section"


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_every_hook_has_a_test(name):
    pattern = re.compile(rf"^(async )?def test_hook_{name}\b", re.MULTILINE)
    holders = [path.name for path in (ROOT / "tests").rglob("test_*.py") if pattern.search(path.read_text())]
    assert holders, f"no test named test_hook_{name} under tests/"


def documented(name: str) -> bool:
    if re.search(rf"^#+ {re.escape(name)}\b", DOCS, re.MULTILINE):
        return True
    return f"`{name}`" in DOCS or f"`{name}(" in DOCS or f"`{name}." in DOCS or f"`{name} " in DOCS


@pytest.mark.parametrize("name", sorted(aistack_core.__all__))
def test_every_public_name_is_documented(name):
    assert hasattr(aistack_core, name), f"{name} is in __all__ but not importable"
    assert documented(name), f"aistack_core.{name} is not documented in docs/plugins.md"


@pytest.mark.parametrize("name", sorted(aistack_core.testing.__all__))
def test_every_testing_helper_is_documented(name):
    assert documented(name), f"aistack_core.testing.{name} is not documented in docs/plugins.md"


@pytest.mark.parametrize("value_type", [aistack_core.ModelCard, aistack_core.Upstream, aistack_core.PluginManifest,
                                        aistack_core.Segment, aistack_core.TranscriptionOptions,
                                        aistack_core.SpeechOptions, aistack_core.DoctorCheck,
                                        aistack_core.SpeakerTurn, aistack_core.DiarizationOptions])
def test_every_field_of_the_value_types_is_documented(value_type):
    missing = [field.name for field in attrs.fields(value_type) if not re.search(rf"\b{field.name}\b", DOCS)]
    assert not missing, f"{value_type.__name__} fields missing from docs/plugins.md: {missing}"


def test_every_protocol_member_is_documented():
    for protocol in (aistack_core.AsrBackend, aistack_core.TtsBackend, aistack_core.DiarizationBackend):
        members = [name for name in [*protocol.__annotations__, *vars(protocol)] if not name.startswith("_")]
        assert members
        missing = [name for name in members if f"{name}" not in DOCS]
        assert not missing, f"{protocol.__name__}: {missing}"


def test_every_typed_error_has_a_row():
    for name in ("Malformed", "Overflow", "Cancelled", "Network", "BadGateway", "GatewayTimeout", "Unknown"):
        error = getattr(aistack_core, name)
        assert re.search(rf"\| `{name}` \| {error.status} `{error.kind}` \|", DOCS), name


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOCS, re.DOTALL)


async def test_the_examples_on_the_page_run(tmp_path, monkeypatch):
    blocks = code_blocks("python")
    plugin = next(block for block in blocks if block.startswith("# my_asr.py"))
    manifest = next(block for block in blocks if block.startswith("# my_asr_manifest.py"))
    test = next(block for block in blocks if "async def test_claps" in block)
    (tmp_path / "my_asr.py").write_text(plugin)
    (tmp_path / "my_asr_manifest.py").write_text(manifest)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_asr", "my_asr_manifest"):
        sys.modules.pop(name, None)
    described = importlib.import_module("my_asr_manifest").MANIFEST
    assert isinstance(described, aistack_core.PluginManifest) and described.setting("AISTACK_CLAPS_THRESHOLD").default == 0.2
    # The testing example, run as written: the clap counter answers over HTTP.
    namespace: dict = {}
    exec(compile(test, "docs/plugins.md", "exec"), namespace)
    await namespace["test_claps"](tmp_path)

    from aistack_core.testing import serve, tone_wav, upload

    async with serve(plugins=[importlib.import_module("my_asr")]) as client:
        wav = tone_wav(tmp_path / "clap.wav", seconds=0.3, silence_s=0.5)
        response = await client.post("/v1/audio/transcriptions",
                                     data=upload(wav, model="clap-counter", response_format="verbose_json"))
        assert response.status == 200, await response.text()
        segments = (await response.json())["segments"]
        assert segments and {s["text"] for s in segments} == {"[clap]"}
        assert 0.4 <= segments[0]["start"] <= 0.6
