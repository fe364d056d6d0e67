"""Small rules every backend needs the same way: language hints and out-of-memory errors.

They live here once so that the core and each plugin agree (a language hint
``en-US`` means the same to the ``auto`` alias as to the backend it picks).
"""

from __future__ import annotations

from typing import Mapping


def normalize_language(language: str | None, synonyms: Mapping[str, str] | None = None) -> str | None:
    """A client's language hint as a lower-case primary code, or None for "detect".

    ``"en-US"`` and ``"en_us"`` become ``"en"``; empty, blank and ``"auto"``
    become None.  ``synonyms`` maps what clients also send to a backend's own
    codes (``{"cantonese": "yue", "zh-yue": "yue", "jp": "ja"}``); it is
    consulted for the whole hint first, then for its primary part.
    """
    if language is None:
        return None
    hint = language.strip().lower().replace("_", "-")
    if not hint or hint == "auto":
        return None
    if synonyms and hint in synonyms:
        return synonyms[hint]
    primary = hint.split("-")[0]
    if not primary:
        return None
    return synonyms.get(primary, primary) if synonyms else primary


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says a device or the host ran out of memory.

    Recognises Python's ``MemoryError``, any exception class named
    ``OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` and the like, found
    by name so the core imports no framework), and the "out of memory"
    message CUDA, CTranslate2 and ONNX Runtime put into RuntimeErrors.
    A backend answers such a failure with ``Overflow`` (the input is too
    big for this machine), not with a 500.
    """
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    return "out of memory" in str(exc).lower()
