"""The tiny speaker's manifest: importable with nothing but aistack installed.

Kept apart from the plugin module so the gateway can read it even where the
plugin's own dependencies are missing (here only numpy, but a real backend
would name its heavy library at the top of its module).
"""

from aistack_core import PluginManifest, PluginSetting

PITCH_HZ = PluginSetting(
    "AISTACK_TINY_TTS_PITCH_HZ", "float", None,
    "base pitch of every voice, 60-400 Hz (default: each voice's own: low 110, high 210, robot 140)",
)

MANIFEST = PluginManifest(
    name="tiny_tts",
    summary="A toy speaker: text becomes vowel-like tones and hisses, one syllable at a time",
    install_hint="pip install ./examples/aistack-tiny-tts",
    models={"tts": ("tiny-tts",)},
    settings=(PITCH_HZ,),
    api_version=1,  # the plugin API this was written for; the loader skips it under another
)
