"""Small rules every backend needs the same way: language hints and out-of-memory errors.

They live here once so that the core and each plugin agree (a language hint
``en-US`` means the same to the ``auto`` alias as to the backend it picks).
"""

from __future__ import annotations

from typing import Any, Mapping

from .backends import DoctorCheck
from .languages import language_code


def normalize_language(
    language: str | None, synonyms: Mapping[str, str] | None = None, *, strict: bool = False
) -> str | None:
    """A client's language hint as a lower-case primary code, or None for "detect".

    ``"en-US"``, ``"en_us"`` and ``"English"`` become ``"en"``; empty, blank
    and ``"auto"`` become None (the table is :mod:`aistack_core.languages`).
    ``synonyms`` maps what clients also send to a backend's own codes
    (``{"cantonese": "yue", "zh-yue": "yue", "jp": "ja"}``); it is consulted
    for the whole hint first, then for its primary part.  ``strict`` refuses
    an unknown value with a 400 listing the accepted forms; otherwise it
    passes through as its primary subtag.
    """
    if language is None:
        return None
    hint = language.strip().lower().replace("_", "-")
    if synonyms:
        if hint in synonyms:
            return synonyms[hint]
        primary = hint.split("-")[0]
        if primary in synonyms:
            return synonyms[primary]
    return language_code(language, strict=strict)


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


# --- torch GPUs: the same three answers for every torch-based plugin ------------------
# The plugin passes its own ``torch`` module: the core never imports a framework.


def torch_gpus(torch: Any) -> list[str]:
    """The CUDA devices ``torch`` can run on, as ``cuda:N`` (for ``AISTACK_DEVICES=auto``)."""
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def torch_free_memory_mb(torch: Any, device: str) -> float | None:
    """A GPU's free memory as its driver reports it (every engine's use counted); None off CUDA."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free_bytes, _total = torch.cuda.mem_get_info(torch.device(device))
    return free_bytes / (1024 * 1024)


def torch_gpu_check(torch: Any, backend: str) -> DoctorCheck:
    """``aistack doctor``'s line on whether ``torch`` sees a GPU for ``backend``."""
    name = f"torch GPU ({backend.lower()})"
    if torch.cuda.is_available():
        return DoctorCheck(name, "ok", f"torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return DoctorCheck(
        name, "warn", f"torch sees no CUDA GPU: {backend} runs on the CPU (much slower)",
        "install a CUDA build of torch (https://pytorch.org/get-started/locally/) and the NVIDIA driver",
    )
