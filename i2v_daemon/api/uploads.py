"""A multipart upload streamed to files in `work/.upload-<random>/`, bounded over the whole request.

The body is never held in memory nor spooled to /tmp (which may be another filesystem, or too
small): each file part goes straight to disk beside the jobs it will join, so intake can move
it into `work/<id>/input/` by rename. Whatever goes wrong, `Upload.discard()` leaves nothing.

Every way a body can be wrong is one of the API's errors, answered as JSON by the app's one handler:
400 `malformed` (not a multipart body python-multipart can read), 413 `too_large`, 415
`unsupported_media_type` (not multipart/form-data at all), 422 `invalid_input` (a form, but not the
one the API takes).
"""

from __future__ import annotations

import difflib
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from i2v_daemon.api.context import ApiError

#: Parts the API takes: files, and small text fields (a JSON object of sidecar keys).
FILE_FIELDS = ("image", "sidecar")
TEXT_FIELDS = ("params",)
MAX_TEXT_BYTES = 64 * 1024
MAX_PART_HEADER_BYTES = 8192  # one header line of a part (its name and value)
MAX_BOUNDARY_CHARS = 70  # RFC 2046 §5.1.1
UPLOAD_PREFIX = ".upload-"


class TooLarge(ApiError):
    """The request body is over `api_max_upload_bytes`."""

    def __init__(self, message: str) -> None:
        super().__init__(413, "too_large", message)


class BadForm(ApiError):
    """The form is not what the API takes; the message says what to send instead."""

    def __init__(self, message: str) -> None:
        super().__init__(422, "invalid_input", message)


class Malformed(ApiError):
    """The body is not a multipart body that can be read at all."""

    def __init__(self, message: str) -> None:
        super().__init__(400, "malformed", message)


class WrongType(ApiError):
    """The body is not multipart/form-data."""

    def __init__(self, message: str) -> None:
        super().__init__(415, "unsupported_media_type", message)


@dataclass
class Upload:
    """The parts of one request: files on disk (field -> (path, the client's file name)) and text fields."""

    folder: Path
    files: dict[str, tuple[Path, str]] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        """Remove whatever intake did not move away (everything, when the request was refused)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def safe_file_name(raw: str, part: str) -> str:
    """The base name of a client's file name, refused when it could not be a file the user meant."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name:
        raise BadForm(f"the '{part}' part has no file name; send it as a file, e.g. curl -F {part}=@cat.png")
    if name.startswith(".") or any(not c.isprintable() for c in name) or len(name.encode()) > 200:
        raise BadForm(
            f"'{part}' file name {name[:60]!r} cannot name a job folder: use printable characters, at most "
            "200 bytes, not starting with '.'"
        )
    return name


#: A batch (POST /api/v1/batches): one `manifest` file and any number of `image` files it names.
BATCH_FILE_FIELDS = ("manifest",)
BATCH_REPEATED = ("image",)


async def receive(
    request: Request, work_dir: Path, max_bytes: int, *, files: tuple[str, ...] = FILE_FIELDS,
    texts: tuple[str, ...] = TEXT_FIELDS, repeated: tuple[str, ...] = (),
) -> Upload:
    """Parse a multipart/form-data body into an `Upload`; raises one of the errors above, leaving nothing behind.

    `repeated` fields may come many times: each one lands as `files["NAME/CLIENT NAME"]`.
    """
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise WrongType("send multipart/form-data (with its boundary): an 'image' file, and a 'sidecar' file or "
                        "a 'params' JSON field, e.g. curl -F image=@cat.png -F 'params={\"prompt\": \"...\"}'")
    if len(options[b"boundary"]) > MAX_BOUNDARY_CHARS:
        raise Malformed(f"the multipart boundary is {len(options[b'boundary'])} characters; RFC 2046 allows at most "
                        f"{MAX_BOUNDARY_CHARS} (curl and browsers choose a short one themselves)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:  # refused before a byte is read
        raise TooLarge(_too_large(max_bytes))
    upload = Upload(folder=work_dir / f"{UPLOAD_PREFIX}{secrets.token_hex(12)}")
    upload.folder.mkdir(parents=True)
    try:
        await _parse(request, options[b"boundary"], upload, max_bytes, (files, texts, repeated))
    except BaseException:
        await anyio.to_thread.run_sync(upload.discard)
        raise
    return upload


def _too_large(max_bytes: int) -> str:
    return (
        f"the upload is over the limit of {max_bytes:,} bytes (api_max_upload_bytes); "
        "send a smaller image, or raise the limit in the config"
    )


async def _parse(request: Request, boundary: bytes, upload: Upload, max_bytes: int,
                 allowed: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]) -> None:
    state = _PartState(upload, *allowed)
    parser = MultipartParser(boundary, state.callbacks(), max_header_size=MAX_PART_HEADER_BYTES)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise TooLarge(_too_large(max_bytes))
            parser.write(chunk)
            await state.flush()
        parser.finalize()
        await state.flush()
    except FormParserError as err:  # python-multipart could not read it: the body is not what it says
        raise Malformed(_unreadable(err, received)) from None
    finally:
        state.close()
    if not state.ended:
        raise Malformed("the multipart body ended before its closing boundary; send the whole form")


def _unreadable(err: FormParserError, received: int) -> str:
    what = str(err).split(" at ")[0] if str(err) else type(err).__name__
    if "header size" in what:
        what = f"a part's header line is over {MAX_PART_HEADER_BYTES // 1024} KiB"
    elif "header count" in what:
        what = "a part has too many header lines"
    return (f"the multipart body cannot be read ({what}, within its first {received:,} bytes); send a "
            "well-formed multipart/form-data body, as curl -F or a browser's FormData does")


def _write_all(writes: list[tuple[IO[bytes], bytes]]) -> None:
    for fh, data in writes:
        fh.write(data)


class _PartState:
    """python-multipart's callbacks: where the current part's bytes go."""

    def __init__(self, upload: Upload, files: tuple[str, ...] = FILE_FIELDS, texts: tuple[str, ...] = TEXT_FIELDS,
                 repeated: tuple[str, ...] = ()) -> None:
        self.upload = upload
        self.file_fields, self.text_fields, self.repeated = files, texts, repeated
        self.pending: list[tuple[IO[bytes], bytes]] = []  # written off the event loop, chunk by chunk
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._file: IO[bytes] | None = None
        self._text: bytearray | None = None
        self._name = ""
        self._open: list[IO[bytes]] = []

    def callbacks(self) -> Any:
        cbs: dict[str, Callable[..., None]] = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._add("_header_name", d[s:e]),
            "on_header_value": lambda d, s, e: self._add("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": self._finished,
        }
        return cbs

    def _add(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)  # a line is at most MAX_PART_HEADER_BYTES: the parser's check

    def _begin(self) -> None:
        self._disposition, self._file, self._text = b"", None, None

    def _header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, opts = parse_options_header(self._disposition)
        name = _decode(opts.get(b"name", b""), "a part's name")
        self._name = name
        known = self.file_fields + self.text_fields + self.repeated
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" — did you mean '{near[0]}'?" if near else ""
            raise BadForm(f"unknown form field {name!r}{hint} (send {', '.join(repr(k) for k in known)})")
        if name in self.repeated:
            if b"filename" not in opts:
                raise BadForm(f"'{name}' must be a file part, e.g. curl -F {name}=@cat.png")
            client_name = safe_file_name(_decode(opts[b"filename"], f"the '{name}' file name"), name)
            key = f"{name}/{client_name}"
            if key in self.upload.files:
                raise BadForm(f"two '{name}' files are both called {client_name!r}; give each its own name")
            path = self.upload.folder / f"{name}-{len(self.upload.files)}"
            self._file = path.open("xb")
            self._open.append(self._file)
            self.upload.files[key] = (path, client_name)
            return
        if name in self.upload.files or name in self.upload.fields:
            raise BadForm(f"the form has more than one {name!r} part; send one")
        if name in self.text_fields:
            if b"filename" in opts:
                raise BadForm(f"'{name}' is a text field holding a JSON object, not a file; send it with -F '{name}=…'")
            self._text = bytearray()
            return
        if b"filename" not in opts:
            raise BadForm(f"'{name}' must be a file part, e.g. curl -F {name}=@cat.png")
        client_name = safe_file_name(_decode(opts[b"filename"], f"the '{name}' file name"), name)
        path = self.upload.folder / name
        self._file = path.open("xb")
        self._open.append(self._file)
        self.upload.files[name] = (path, client_name)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self.pending.append((self._file, bytes(data[start:end])))
        elif self._text is not None:
            self._text.extend(data[start:end])
            if len(self._text) > MAX_TEXT_BYTES:
                limit = MAX_TEXT_BYTES // 1024
                raise BadForm(f"the '{self._name}' field is over {limit} KiB; a few keys need far less")

    def _end(self) -> None:
        if self._text is not None:
            self.upload.fields[self._name] = _decode(bytes(self._text), f"the '{self._name}' field")
        self._file = self._text = None

    def _finished(self) -> None:
        self.ended = True

    async def flush(self) -> None:
        if self.pending:
            writes, self.pending = self.pending, []
            await anyio.to_thread.run_sync(_write_all, writes)

    def close(self) -> None:
        self.pending = []  # unwritten only when parsing failed: the folder is discarded anyway
        for fh in self._open:
            fh.close()


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadForm(f"{what} is not UTF-8; send UTF-8 text") from None
