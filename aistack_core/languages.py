"""The one table of spoken languages a request may name, and how a name becomes a code.

Clients say ``en``, ``en-US``, ``en_GB``, ``English`` or ``english``; backends
want the ISO 639-1 code (``yue`` for Cantonese, which has none).  Every
route that takes a ``language`` goes through :func:`language_code`, so the
accepted forms are the same everywhere and an unknown value is refused
with one message listing them.
"""

from __future__ import annotations

from .errors import Malformed

# Code -> English name: the languages OpenAI's transcription API lists, which
# cover every in-process backend.
LANGUAGE_NAMES: dict[str, str] = {
    "af": "afrikaans", "am": "amharic", "ar": "arabic", "as": "assamese", "az": "azerbaijani",
    "ba": "bashkir", "be": "belarusian", "bg": "bulgarian", "bn": "bengali", "bo": "tibetan",
    "br": "breton", "bs": "bosnian", "ca": "catalan", "cs": "czech", "cy": "welsh", "da": "danish",
    "de": "german", "el": "greek", "en": "english", "es": "spanish", "et": "estonian", "eu": "basque",
    "fa": "persian", "fi": "finnish", "fo": "faroese", "fr": "french", "gl": "galician", "gu": "gujarati",
    "ha": "hausa", "haw": "hawaiian", "he": "hebrew", "hi": "hindi", "hr": "croatian", "ht": "haitian creole",
    "hu": "hungarian", "hy": "armenian", "id": "indonesian", "is": "icelandic", "it": "italian",
    "ja": "japanese", "jw": "javanese", "ka": "georgian", "kk": "kazakh", "km": "khmer", "kn": "kannada",
    "ko": "korean", "la": "latin", "lb": "luxembourgish", "ln": "lingala", "lo": "lao", "lt": "lithuanian",
    "lv": "latvian", "mg": "malagasy", "mi": "maori", "mk": "macedonian", "ml": "malayalam",
    "mn": "mongolian", "mr": "marathi", "ms": "malay", "mt": "maltese", "my": "burmese", "ne": "nepali",
    "nl": "dutch", "nn": "nynorsk", "no": "norwegian", "oc": "occitan", "pa": "punjabi", "pl": "polish",
    "ps": "pashto", "pt": "portuguese", "ro": "romanian", "ru": "russian", "sa": "sanskrit", "sd": "sindhi",
    "si": "sinhala", "sk": "slovak", "sl": "slovenian", "sn": "shona", "so": "somali", "sq": "albanian",
    "sr": "serbian", "su": "sundanese", "sv": "swedish", "sw": "swahili", "ta": "tamil", "te": "telugu",
    "tg": "tajik", "th": "thai", "tk": "turkmen", "tl": "tagalog", "tr": "turkish", "tt": "tatar",
    "uk": "ukrainian", "ur": "urdu", "uz": "uzbek", "vi": "vietnamese", "yi": "yiddish", "yo": "yoruba",
    "zh": "chinese", "yue": "cantonese",
}

# Other names and codes people use for the same languages.
_OTHER_NAMES: dict[str, str] = {
    "mandarin": "zh", "cmn": "zh", "zh-yue": "yue", "burmese": "my", "myanmar": "my", "castilian": "es",
    "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb", "moldavian": "ro", "moldovan": "ro",
    "panjabi": "pa", "pushto": "ps", "sinhalese": "si", "valencian": "ca", "farsi": "fa", "filipino": "tl",
    "jv": "jw", "nb": "no", "bokmal": "no", "iw": "he",
}

_BY_NAME: dict[str, str] = {
    **{code: code for code in LANGUAGE_NAMES},
    **{name: code for code, name in LANGUAGE_NAMES.items()},
    **_OTHER_NAMES,
}

# Values that mean "detect it": the same as sending no language.
_DETECT = ("auto", "detect")

ACCEPTED_FORMS = (
    "an ISO 639-1 code ('en', 'de', 'zh'), a region form ('en-US', 'pt_BR'), "
    "or an English language name ('english', 'German'); leave it empty to detect the language"
)


def language_code(language: str | None, *, strict: bool = True) -> str | None:
    """The code for ``language``, None for "detect"; :class:`Malformed` for an unknown value.

    With ``strict=False`` an unknown value comes back as its lower-cased
    primary subtag instead (for callers that only rank backends by it).
    """
    if language is None:
        return None
    lowered = " ".join(language.strip().lower().replace("_", "-").split())
    if not lowered or lowered in _DETECT:
        return None
    found = _BY_NAME.get(lowered) or _BY_NAME.get(lowered.split("-")[0])
    if found is not None:
        return found
    if not strict:
        return lowered.split("-")[0] or None
    raise Malformed(
        f"Unknown language {language!r}. Send {ACCEPTED_FORMS}.",
        param="language", code="unsupported_language",
    )
