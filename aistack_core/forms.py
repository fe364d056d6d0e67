"""The one reader of request bodies: JSON objects, urlencoded forms and multipart.

Every route that reads a body declares its fields and calls :func:`read_form`::

    form = await read_form(request, TRANSCRIPTION_FIELDS, uploads=UploadPolicy(dir, limit))
    try:
        ...  form["model"], form["stream"], form.file("file")
    finally:
        form.discard()  # the spooled uploads

Values are coerced with one rule set (bool, number, enum, string, list,
raw JSON); every way a body or a field can be wrong is a 400 envelope naming
the field, a body over its limit a 413.  Uploads stream to temporary files
(never held in memory), and a compressed body counts against the limit as it
is decompressed.  ``Expect: 100-continue`` is answered here, only once the
API key (a middleware, before any route) and the size check have passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import aiohttp
import attrs
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

from .config import FALSE_WORDS as _FALSE, TRUE_WORDS as _TRUE
from .context import config_key
from .errors import Malformed, Network, Overflow
from .observe.capture import tee_request_body
from .observe.record import request_info

READ_CHUNK = 1 << 20
# A text field is a model id, a prompt, a flag: generous, but not an upload in disguise.
MAX_FIELD_BYTES = 64 * 1024
# JSON and urlencoded bodies are read whole (speech input, chat with images).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# gzip of real audio gains a few percent, of speech-y WAV at most a few times;
# a body that inflates more than this is a decompression bomb, not a recording.
MAX_DECOMPRESSION_RATIO = 20
# A compressed body of unknown length may inflate to at most this much.
MAX_INFLATED_UNKNOWN_LENGTH = 64 * 1024 * 1024
# A body that stops arriving for this long ends the request with a 408
# (AISTACK_BODY_IDLE_TIMEOUT_S): a stalled upload must not hold a connection,
# or, on the proxy path, the GPU slot, until the client's TCP gives up.  It
# also ends a chunked body whose framing broke mid-way, which aiohttp's
# parser reports to nobody.
BODY_IDLE_TIMEOUT_S = 30.0
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}$")

KINDS = ("str", "bool", "float", "int", "enum", "list", "json")


@attrs.frozen
class Field:
    """One request field and how to read it.

    ``kind``: ``str``, ``bool``, ``float``, ``int``, ``enum`` (one of
    ``choices``, compared in lower case), ``list`` (of strings: a JSON list,
    or repeated form fields, also spelled ``name[]``) or ``json`` (any JSON
    value, or a form field's text parsed as JSON when it looks like JSON).
    An empty form value counts as absent.
    """

    name: str
    kind: str = "str"
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    aliases: tuple[str, ...] = ()
    strip: bool = True

    def __attrs_post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name}: unknown kind {self.kind!r}")


@attrs.frozen
class UploadPolicy:
    """Where file parts are spooled and how large they may be."""

    directory: Path
    max_bytes: int
    setting: str = "AISTACK_MAX_UPLOAD_MB"
    directory_setting: str = "AISTACK_UPLOAD_DIR"


def upload_policy(config: Any) -> UploadPolicy:
    """The gateway's own upload settings (``AISTACK_UPLOAD_DIR``, ``AISTACK_MAX_UPLOAD_MB``)."""
    return UploadPolicy(config.upload_dir, config.max_upload_mb * 1024 * 1024)


@attrs.frozen
class Upload:
    path: Path
    filename: str | None
    size: int
    content_type: str | None = None


@attrs.frozen
class InlineFile:
    """A file part of a body read whole: only its name and size are kept (the raw body has the bytes)."""

    filename: str
    size: int


@attrs.define
class Form:
    """A read body: typed ``values``, spooled ``uploads``, the ``raw`` bytes when read whole."""

    raw_values: dict[str, Any]  # as sent: JSON values, or form text (repeated fields as lists)
    values: dict[str, Any] = attrs.field(factory=dict)  # typed, for the fields a route declared
    uploads: dict[str, Upload] = attrs.field(factory=dict)
    raw: bytes | None = None
    content_type: str = ""
    sent_names: set[str] = attrs.field(factory=set, repr=False)
    declared: set[str] = attrs.field(factory=set, repr=False)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value

    def sent(self, name: str) -> bool:
        """Whether the client sent ``name`` at all (as opposed to the default)."""
        return name in self.sent_names

    @property
    def extra(self) -> dict[str, Any]:
        """Fields no route declared, as sent."""
        return {name: value for name, value in self.raw_values.items() if name not in self.declared}

    def take(self, fields: Sequence[Field]) -> "Form":
        """Coerce more fields (a route that learns what it serves only after reading some)."""
        _coerce(self, fields)
        return self

    def require_file(self, name: str = "file") -> Upload:
        """The spooled upload ``name``, or the 400 that says how to send it."""
        upload = self.uploads.get(name)
        if upload is None:
            raise Malformed(
                f"No audio: add a {name!r} field with the recording (multipart/form-data).",
                param=name, code="missing_file",
            )
        return upload

    def file(self, name: str) -> Upload | None:
        return self.uploads.get(name)

    def discard(self) -> None:
        """Delete the spooled uploads (call on every exit path)."""
        for upload in self.uploads.values():
            upload.path.unlink(missing_ok=True)
        self.uploads.clear()


# --- Expect: 100-continue -------------------------------------------------------


async def defer_continue(request: web.Request) -> web.Response | None:
    """The routes' ``expect_handler``: say nothing yet.

    aiohttp's default answers ``100 Continue`` before any middleware runs,
    inviting a 500 MB upload that the key check is about to refuse.
    :func:`send_continue` answers once the checks have passed.  Another
    expectation is answered 417 here, in the envelope: aiohttp calls this
    before the middlewares, so the envelope is returned, not raised.
    """
    if request.headers.get(hdrs.EXPECT, "").lower() not in ("", "100-continue"):
        response = Malformed(
            f"Expect: {request.headers[hdrs.EXPECT][:40]!r} is not supported; the only expectation is "
            "100-continue.", status=417, code="unsupported_expectation",
        ).to_response()
        response.force_close()  # the body, if one follows, is not read
        return response
    return None


_CONTINUE_SENT = web.RequestKey("aistack.continue_sent", bool)


# What aiohttp's server decompresses (br and zstd when their libraries are installed; it
# refuses them itself otherwise).  Any other coding would reach us as raw bytes.
DECODED_CONTENT_CODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate", "br", "zstd"})


def refuse_unknown_coding(request: web.BaseRequest) -> None:
    """A 415 for a Content-Encoding the server would hand on undecoded (``compress``, typos)."""
    header = request.headers.get(hdrs.CONTENT_ENCODING)
    if header is None:
        return
    codings = [token.strip().lower() for token in header.split(",") if token.strip()]
    unknown = [coding for coding in codings if coding not in DECODED_CONTENT_CODINGS]
    if unknown:
        raise Malformed(
            f"Content-Encoding {unknown[0][:40]!r} is not supported; send the body uncompressed, or as gzip "
            "or deflate.", status=415, code="unsupported_content_encoding",
            headers={"Accept-Encoding": "gzip, deflate", hdrs.CONNECTION: "close"},
        )


async def send_continue(request: web.Request) -> None:
    """Invite the body now, if the client waits for ``100 Continue`` and nobody sent it yet.

    Every body reader comes here before its first read, so the body's coding is checked here too.
    """
    refuse_unknown_coding(request)
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue" or request.get(_CONTINUE_SENT):
        return
    request[_CONTINUE_SENT] = True
    if request.version >= aiohttp.HttpVersion11 and request.writer is not None:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


# --- reading --------------------------------------------------------------------


def body_idle_timeout(request: web.BaseRequest) -> float:
    config = request.app.get(config_key) if isinstance(request, web.Request) else None
    return config.env_float("AISTACK_BODY_IDLE_TIMEOUT_S", BODY_IDLE_TIMEOUT_S) if config else BODY_IDLE_TIMEOUT_S


async def arriving(request: web.BaseRequest, step: Any) -> Any:
    """Await one read of the body (``step``), at most the body idle timeout."""
    timeout_s = body_idle_timeout(request)
    try:
        return await asyncio.wait_for(step, timeout_s)
    except asyncio.TimeoutError:
        raise broken_body(request, Malformed(
            f"The request body stopped arriving: nothing came for {timeout_s:g} s "
            "(or its chunked framing broke). Send the whole body promptly.",
            status=408, code="body_timeout",
        )) from None


async def bounded_stream(request: web.BaseRequest, chunks: Any):
    """``chunks`` (a StreamReader or an async iterator of bytes) with the idle timeout on each read."""
    iterator = chunks.iter_any().__aiter__() if hasattr(chunks, "iter_any") else chunks.__aiter__()
    while True:
        try:
            chunk = await arriving(request, iterator.__anext__())
        except StopAsyncIteration:
            return
        yield chunk



def _too_large(what: str, limit: int, setting: str | None) -> Overflow:
    hint = f" ({setting})" if setting else ""
    return Overflow(f"{what} is larger than the {_size(limit)} limit{hint}.", code="upload_too_large")


def _size(count: int) -> str:
    return f"{count / (1024 * 1024):g} MB" if count >= 1024 * 1024 else f"{count} bytes"


def is_compressed(request: web.BaseRequest) -> bool:
    """Whether the body came with a Content-Encoding (which aiohttp's server decodes as it is read)."""
    return request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower() not in ("", "identity")


def inflated_limit(request: web.BaseRequest, limit: int) -> int:
    """How many body bytes, as decompressed, a request may deliver."""
    if not is_compressed(request):
        return limit
    if request.content_length is None:
        return min(limit, MAX_INFLATED_UNKNOWN_LENGTH)
    return min(limit, max(request.content_length * MAX_DECOMPRESSION_RATIO, READ_CHUNK))


# How aiohttp's server says a body broke on the way in: a bad chunk, a truncated
# body, a Content-Encoding that does not decode (RequestPayloadError).
_PAYLOAD_ERRORS = (HttpProcessingError, aiohttp.ClientPayloadError, RequestPayloadError)


def broken_body(request: web.BaseRequest, error: Malformed) -> Malformed:
    """``error`` for a body that broke in transit, with the connection marked for closing.

    The rest of such a body cannot be read (aiohttp would fail again draining
    it after the answer and log a traceback), and the connection's framing is
    not to be trusted: the answer ends the connection.
    """
    request.content.feed_eof()
    error.headers[hdrs.CONNECTION] = "close"
    return error


def _bad_body(exc: BaseException, request: web.BaseRequest) -> Malformed:
    if not isinstance(exc, _PAYLOAD_ERRORS):
        return Malformed(f"The request body could not be read ({_short(exc)}).", code="invalid_body")
    if is_compressed(request):
        return broken_body(request, Malformed(
            f"The request body could not be decompressed as {request.headers[hdrs.CONTENT_ENCODING]!r} "
            f"({type(exc).__name__}). Send it uncompressed or correctly encoded.",
            code="invalid_body",
        ))
    return broken_body(request, Malformed(f"The request body could not be read ({_short(exc)}).", code="invalid_body"))


def _check_length(request: web.BaseRequest, limit: int, setting: str | None) -> None:
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(f"The request body ({_size(length)})", limit, setting)


async def read_body(request: web.Request, max_bytes: int = DEFAULT_MAX_BODY_BYTES, *, setting: str | None = None) -> bytes:
    """The whole body, bounded as it arrives (decompressed bytes count)."""
    _check_length(request, max_bytes, setting)
    await send_continue(request)
    limit = inflated_limit(request, max_bytes)
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await arriving(request, request.content.read(READ_CHUNK)):
            size += len(chunk)
            if size > limit:
                raise _too_large("The request body" + (" as decompressed" if is_compressed(request) else ""),
                                 limit, setting)
            chunks.append(chunk)
    except _PAYLOAD_ERRORS + (ValueError,) as exc:
        raise _bad_body(exc, request) from None
    body = b"".join(chunks)
    tee_request_body(request, body)
    request_info(request).bytes_in = size
    return body


async def read_form(
    request: web.Request,
    fields: Sequence[Field],
    *,
    uploads: UploadPolicy | None = None,
    file_fields: Iterable[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    keep_raw: bool = False,
    long_text_fields: Mapping[str, int] | None = None,
) -> Form:
    """Read and coerce the request's fields.

    :param uploads: where multipart file parts go; without it a multipart
        body is read whole (bounded by ``max_body_bytes``) and file parts are
        refused.
    :param file_fields: the names that may carry a file.
    :param keep_raw: keep the body bytes (``form.raw``), for a route that may
        still forward the request untouched; needs a body read whole.
    :param long_text_fields: text fields that may exceed ``MAX_FIELD_BYTES``
        in a streamed multipart body (name -> most bytes per value), such as
        short audio clips sent as data URLs.
    """
    content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
    mime = content_type.split(";")[0].strip().lower()
    file_fields = frozenset(file_fields)
    if mime.startswith("multipart/") and uploads is not None and not keep_raw:
        form = await _read_streamed_multipart(request, uploads, file_fields, long_text_fields or {})
    else:
        raw = await read_body(request, max_body_bytes)
        if mime.startswith("multipart/"):
            form = await asyncio.to_thread(_parse_whole_multipart, raw, content_type)
        elif mime == "application/x-www-form-urlencoded":
            form = _parse_urlencoded(raw)
        else:
            form = await _parse_json(raw)
        form.raw = raw
    form.content_type = content_type
    try:
        _coerce(form, fields)
    except BaseException:
        form.discard()
        raise
    return form


# --- the three body shapes ---------------------------------------------------------------


def _add_raw(values: dict[str, Any], name: str, value: Any) -> None:
    """Repeated form fields (``include[]=a&include[]=b``) collect into a list."""
    if name in values:
        previous = values[name]
        # list + list is a plain list: keep the marker, or a third repeat would nest the first two.
        values[name] = _Repeated([*previous, value]) if isinstance(previous, _Repeated) else _Repeated([previous, value])
    else:
        values[name] = value


class _Repeated(list):
    """A form field sent more than once (a JSON list stays a plain list)."""


async def _parse_json(raw: bytes) -> Form:
    if not raw.strip():
        raise Malformed("The request body is empty: send a JSON object.", code="invalid_body")
    try:
        # Big documents decode off the loop.
        document = json.loads(raw) if len(raw) < 256 * 1024 else await asyncio.to_thread(json.loads, raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, absurd numbers, deep nesting
        raise Malformed(f"The request body is not valid JSON ({_short(exc)}).", code="invalid_json") from None
    if not isinstance(document, dict):
        raise Malformed(f"The request body must be a JSON object, not {type(document).__name__}.", code="invalid_json")
    return Form(raw_values=dict(document))


def _parse_urlencoded(raw: bytes) -> Form:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("The form body is not UTF-8 text.", code="invalid_body") from None
    values: dict[str, Any] = {}
    for name, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
        _add_raw(values, name, value)
    return Form(raw_values=values)


def _parse_whole_multipart(raw: bytes, content_type: str) -> Form:
    """A small multipart body read whole (speech requests): text fields only."""
    import email.parser
    import email.policy

    try:
        header = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    except UnicodeEncodeError:
        raise Malformed("The Content-Type header holds characters that are not Latin-1.", code="invalid_body") from None
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + raw)
        if not message.is_multipart():
            raise Malformed("The multipart body has no parts (check the boundary).", code="invalid_body")
        values: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not name:
                continue
            if part.is_multipart():
                raise Malformed("Nested multipart parts are not accepted.", param=name, code="invalid_body")
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                _add_raw(values, name, InlineFile(part.get_filename(), len(payload)))
                continue
            _add_raw(values, name, payload.decode("utf-8"))
    except Malformed:
        raise
    except (ValueError, LookupError, TypeError, AttributeError) as exc:  # broken headers, charsets, UTF-8
        raise Malformed(f"The multipart/form-data body could not be read ({_short(exc)}).", code="invalid_body") from None
    return Form(raw_values=values)


async def _read_streamed_multipart(
    request: web.Request, policy: UploadPolicy, file_fields: frozenset[str], long_text_fields: Mapping[str, int]
) -> Form:
    limit = policy.max_bytes
    # Text fields may add a little to the file's size.
    _check_length(request, limit + MAX_FIELD_BYTES * 16, policy.setting)
    await send_continue(request)
    inflated = inflated_limit(request, limit + MAX_FIELD_BYTES * 16)
    form = Form(raw_values={})
    received = 0
    try:
        reader = await request.multipart()
        while True:
            part = await arriving(request, reader.next())
            if part is None:
                break
            if isinstance(part, aiohttp.MultipartReader):
                raise Malformed("Nested multipart parts are not accepted: send plain fields and one file.",
                                code="invalid_body")
            name = part.name or ""
            if part.filename is not None or name in file_fields:
                if name not in file_fields:
                    raise Malformed(f"Field {name!r} cannot carry a file.", param=name or None)
                if name in form.uploads:
                    raise Malformed(f"Send exactly one {name!r} field.", param=name)
                upload = await _spool(request, part, policy, min(limit, inflated - received))
                form.uploads[name] = upload
                received += upload.size
                continue
            field_limit = long_text_fields.get(name.removesuffix("[]"), MAX_FIELD_BYTES)
            raw = await arriving(request, part.read(decode=True))
            received += len(raw)
            if len(raw) > field_limit:
                raise Malformed(f"Field {name!r} is too long (at most {field_limit} bytes).", param=name or None)
            if received > inflated:
                raise _too_large("The request body as decompressed", inflated, policy.setting)
            try:
                text = raw.decode(part.get_charset("utf-8"))
            except (UnicodeDecodeError, LookupError):
                raise Malformed(f"Field {name!r} is not UTF-8 text.", param=name or None) from None
            _add_raw(form.raw_values, name, text)
    except BaseException as exc:
        form.discard()
        if isinstance(exc, _PAYLOAD_ERRORS + (ValueError, LookupError, AssertionError, UnicodeDecodeError)):
            # aiohttp's words for a broken multipart body, a bad header line, an inflate failure
            raise _bad_multipart(exc, request) from None
        raise
    request_info(request).bytes_in = received
    return form


def _bad_multipart(exc: BaseException, request: web.BaseRequest) -> Malformed:
    if isinstance(exc, _PAYLOAD_ERRORS):
        return _bad_body(exc, request)
    return Malformed(
        f"The multipart/form-data body could not be read ({_short(exc)}). Send a well-formed form.",
        code="invalid_body",
    )


async def _spool(request: web.Request, part: Any, policy: UploadPolicy, limit: int) -> Upload:
    """Stream one file part to a temporary file in the upload directory."""
    filename = part.filename
    match = _SAFE_SUFFIX.search(filename or "")
    suffix = match.group(0) if match else ""  # only a plain extension reaches the file system
    try:
        handle, name = await asyncio.to_thread(_new_spool_file, policy.directory, suffix)
    except OSError as exc:
        raise _upload_dir_error(policy, exc) from None
    path = Path(name)
    size = 0
    out = os.fdopen(handle, "wb")
    try:
        while chunk := await arriving(request, part.read_chunk(READ_CHUNK)):
            size += len(chunk)
            if size > limit:
                what = "The uploaded file as decompressed" if is_compressed(request) else "The uploaded file"
                raise _too_large(what, limit, policy.setting)
            tee_request_body(request, chunk)  # a no-op unless payload capture is on
            try:
                await asyncio.to_thread(out.write, chunk)
            except OSError as exc:
                raise _upload_dir_error(policy, exc) from None
        try:
            # Closing flushes the last buffered bytes: a full disk may say so only now.
            await asyncio.to_thread(out.close)
        except OSError as exc:
            raise _upload_dir_error(policy, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            out.close()
        path.unlink(missing_ok=True)
        raise
    content_type = part.headers.get(hdrs.CONTENT_TYPE)
    return Upload(path, _printable(filename), size, content_type)


def _new_spool_file(directory: Path, suffix: str) -> tuple[int, str]:
    directory.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix="aistack-upload-", suffix=suffix, dir=directory)


def _upload_dir_error(policy: UploadPolicy, exc: OSError) -> Network:
    return Network(
        f"aistack cannot store the upload in {policy.directory} ({exc.strerror or exc}); the operator should "
        f"free space there or point {policy.directory_setting} at a writable folder.",
        code="upload_dir_unwritable",
    )


def _printable(text: str | None) -> str | None:
    if text is None:
        return None
    return "".join(char for char in text if char.isprintable())[:255]


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".rstrip(": ")
    return text if len(text) <= 200 else text[:197] + "..."


# --- coercion -------------------------------------------------------------------------


def _coerce(form: Form, fields: Sequence[Field]) -> None:
    raw = form.raw_values
    coerced = form.values
    for field in fields:
        names = (field.name, *field.aliases) if field.kind != "list" else (
            field.name, f"{field.name}[]", *field.aliases)
        form.declared.update(names)
        present = [raw[name] for name in names if name in raw]
        if not present:
            coerced[field.name] = field.default
            continue
        if field.kind == "list":
            items: list[Any] = []
            for value in present:
                items.extend(value if isinstance(value, list) else [value])
            value = items
        else:
            value = present[0]
            if isinstance(value, _Repeated):
                raise Malformed(f"Send {field.name!r} once, not {len(value)} times.", param=field.name)
        result = _coerce_one(field, value)
        if result is not None:
            form.sent_names.add(field.name)
        coerced[field.name] = field.default if result is None else result


def _coerce_one(field: Field, value: Any) -> Any:
    """The typed value, or None for "absent" (an empty form value, a JSON null)."""
    name = field.name
    if value is None:
        return None
    if isinstance(value, str) and field.kind != "json":
        if field.strip:
            value = value.strip()
        if value == "" and field.kind != "str":
            return None
        if _has_bad_text(value):
            raise Malformed(f"Field {name!r} holds control characters or invalid Unicode (lone surrogates).", param=name)
    kind = field.kind
    if kind == "str":
        if not isinstance(value, str):
            raise Malformed(f"Field {name!r} must be a string, not {_json_type(value)}.", param=name)
        return value
    if kind == "bool":
        return parse_bool(value, name)
    if kind in ("float", "int"):
        return _number(field, value)
    if kind == "enum":
        if not isinstance(value, str):
            raise Malformed(f"Field {name!r} must be one of {', '.join(field.choices)}.", param=name)
        lowered = value.lower()
        if lowered not in field.choices:
            raise Malformed(
                f"Unsupported {name} {value!r}; use one of {', '.join(field.choices)}.", param=name,
                code="unsupported_value",
            )
        return lowered
    if kind == "list":
        items = []
        for item in value:
            if not isinstance(item, str):
                raise Malformed(f"Field {name!r} must be a list of strings.", param=name)
            item = item.strip()
            if _has_bad_text(item):
                raise Malformed(f"Field {name!r} holds control characters or invalid Unicode (lone surrogates).", param=name)
            if field.choices and item.lower() not in field.choices:
                raise Malformed(
                    f"{name} takes {', '.join(field.choices)}, got {item!r}.", param=name, code="unsupported_value"
                )
            if item:
                items.append(item.lower() if field.choices else item)
        return items
    # json: a form field's text that looks like JSON is parsed, anything else kept as sent
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            raise Malformed(f"Field {name!r} is not valid JSON.", param=name) from None
    return value


def parse_bool(value: Any, name: str) -> bool:
    """The one rule for booleans: JSON true/false, 0/1, or true/false/yes/no/on/off in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise Malformed(f"Field {name!r} must be true or false, got {_shown(value)}.", param=name)


def _number(field: Field, value: Any) -> float | int:
    name = field.name
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Malformed(f"Field {name!r} must be a number, not {_json_type(value)}.", param=name)
    try:
        number = float(value) if field.kind == "float" else int(value)
    except (ValueError, OverflowError):
        raise Malformed(f"Field {name!r} must be {'a number' if field.kind == 'float' else 'a whole number'}, "
                        f"got {_shown(value)}.", param=name) from None
    if isinstance(number, float) and not math.isfinite(number):
        raise Malformed(f"Field {name!r} must be a finite number.", param=name)
    low, high = field.minimum, field.maximum
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"between {low:g} and {high:g}" if low is not None and high is not None else (
            f"at least {low:g}" if low is not None else f"at most {high:g}")
        raise Malformed(f"Field {name!r} must be {bounds}, got {number:g}.", param=name)
    return number


_BAD_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _has_bad_text(text: str) -> bool:
    return _BAD_TEXT.search(text) is not None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
