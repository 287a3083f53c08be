"""Payload encryption: the byte formats of a record's ciphertext blob.

Every blob starts with one format byte, so a reader knows how to open it::

    0x01  box     nonce(24) || XSalsa20-Poly1305 ciphertext+MAC      (crypto.seal)
                  one FHIR resource as canonical JSON; small, opened in one piece
    0x02  stream  header(24) || meta_len(4, big-endian) || meta frame || data frames
                  libsodium secretstream (XChaCha20-Poly1305) for large attachments:
                  - meta frame: the attachment's FHIR Binary resource (JSON, without
                    data), pushed with associated data 0x02 || meta_len, tag MESSAGE
                  - data frames: each CHUNK plaintext bytes, tag MESSAGE, so
                    CHUNK + 17 bytes of ciphertext; then exactly one last frame of fewer
                    than CHUNK bytes (possibly none) with tag FINAL.

Both formats use the record's 32-byte data key (wrapped per reader on chain). Because the
last frame is always shorter than a full one, a reader knows where frames end without
lengths on the wire; secretstream's tags and counters catch reordered, dropped, repeated
or truncated frames. Nothing here is hand-rolled: only libsodium's constructions are
composed. Pure: no I/O except the file objects a caller passes to ``seal_stream``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from typing import BinaryIO

import nacl.bindings as sodium
import nacl.exceptions

from ehrnode.core import crypto
from ehrnode.core.errors import InvalidEncoding, NotAuthorised

FORMAT_BOX = 0x01
FORMAT_STREAM = 0x02
CHUNK = 64 * 1024
MAX_META_BYTES = 64 * 1024

_HEADER = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
_ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
_FRAME = CHUNK + _ABYTES
_TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_PREAMBLE = 1 + _HEADER + 4


def blob_format(blob_start: bytes) -> int:
    """The format of a blob from its first byte; InvalidEncoding for an unknown one."""
    if not blob_start or blob_start[0] not in (FORMAT_BOX, FORMAT_STREAM):
        shown = f"0x{blob_start[0]:02x}" if blob_start else "nothing"
        raise InvalidEncoding(
            f"unknown ciphertext format {shown}; this client reads 0x01 and 0x02",
            code="unknown_format",
        )
    return blob_start[0]


# --- format 0x01: one resource -------------------------------------------------------------


def seal_resource(data_key: bytes, plaintext: bytes) -> bytes:
    return bytes([FORMAT_BOX]) + crypto.seal(data_key, plaintext)


def open_resource(data_key: bytes, blob: bytes) -> bytes:
    if blob_format(blob[:1]) != FORMAT_BOX:
        raise InvalidEncoding("this blob is a streamed attachment, not a resource")
    try:
        return crypto.open_sealed(data_key, blob[1:])
    except NotAuthorised as err:
        raise NotAuthorised(
            "the ciphertext does not open with this record's data key: it was altered or the "
            "key is not this record's",
            code="cannot_decrypt",
        ) from err


# --- format 0x02: streamed attachments -----------------------------------------------------


class StreamSealer:
    """Encrypts an attachment frame by frame: ``start()``, ``push()`` per full CHUNK,
    then ``finish()`` with the remainder (shorter than CHUNK)."""

    def __init__(self, data_key: bytes, metadata: bytes) -> None:
        if len(metadata) > MAX_META_BYTES:
            raise InvalidEncoding(f"attachment metadata exceeds {MAX_META_BYTES} bytes")
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._key = data_key
        self._metadata = metadata
        self._started = False
        self._finished = False

    def start(self) -> bytes:
        assert not self._started, "start() once"
        self._started = True
        header = sodium.crypto_secretstream_xchacha20poly1305_init_push(self._state, self._key)
        frame_len = struct.pack(">I", len(self._metadata) + _ABYTES)
        ad = bytes([FORMAT_STREAM]) + frame_len
        meta = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, self._metadata, ad, _TAG_MESSAGE
        )
        return bytes([FORMAT_STREAM]) + header + frame_len + meta

    def push(self, chunk: bytes) -> bytes:
        assert self._started and not self._finished
        if len(chunk) != CHUNK:
            raise ValueError(f"push() takes exactly {CHUNK} bytes; give the rest to finish()")
        return bytes(
            sodium.crypto_secretstream_xchacha20poly1305_push(
                self._state, chunk, None, _TAG_MESSAGE
            )
        )

    def finish(self, last: bytes) -> bytes:
        assert self._started and not self._finished
        if len(last) >= CHUNK:
            raise ValueError(f"finish() takes fewer than {CHUNK} bytes")
        self._finished = True
        return bytes(
            sodium.crypto_secretstream_xchacha20poly1305_push(self._state, last, None, _TAG_FINAL)
        )


def _read_full(source: BinaryIO, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end (a pipe may return short reads)."""
    parts: list[bytes] = []
    missing = size
    while missing:
        part = source.read(missing)
        if not part:
            break
        parts.append(part)
        missing -= len(part)
    return b"".join(parts)


def seal_stream(
    data_key: bytes, metadata: bytes, source: BinaryIO, sink: BinaryIO
) -> tuple[int, bytes, int]:
    """Encrypt ``source`` into ``sink`` in format 0x02, hashing the ciphertext on the way.

    Returns (ciphertext size, its sha256, plaintext size). Memory stays at a few CHUNKs.
    """
    sealer = StreamSealer(data_key, metadata)
    digest = hashlib.sha256()
    size = 0
    plain = 0

    def emit(data: bytes) -> None:
        nonlocal size
        digest.update(data)
        sink.write(data)
        size += len(data)

    emit(sealer.start())
    while True:
        chunk = _read_full(source, CHUNK)
        plain += len(chunk)
        if len(chunk) < CHUNK:
            emit(sealer.finish(chunk))
            return size, digest.digest(), plain
        emit(sealer.push(chunk))


def seal_chunks(
    data_key: bytes, metadata: bytes, source: BinaryIO, batch: int = 16
) -> Iterator[bytes]:
    """Format 0x02 ciphertext of ``source``, in pieces of up to ``batch`` frames (for an
    upload that streams as it encrypts). Memory stays at a few pieces."""
    sealer = StreamSealer(data_key, metadata)
    yield sealer.start()
    while True:
        frames = []
        for _ in range(batch):
            chunk = _read_full(source, CHUNK)
            if len(chunk) < CHUNK:
                frames.append(sealer.finish(chunk))
                yield b"".join(frames)
                return
            frames.append(sealer.push(chunk))
        yield b"".join(frames)


class StreamOpener:
    """Decrypts a format 0x02 blob fed in pieces of any size (sans-I/O).

    ``feed`` returns the plaintext it could open so far; ``metadata`` is set once the
    meta frame is open; ``close`` raises unless the final frame arrived and nothing
    followed it.
    """

    def __init__(self, data_key: bytes) -> None:
        self._key = data_key
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._buffer = bytearray()
        self._meta_len: int | None = None
        self.metadata: bytes | None = None
        self.finished = False

    def _pull(self, frame: bytes, ad: bytes | None) -> tuple[bytes, int]:
        try:
            message, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(self._state, frame, ad)
        except (nacl.exceptions.CryptoError, ValueError, RuntimeError) as err:
            raise NotAuthorised(
                "an attachment frame does not open with this record's data key: it was "
                "altered, reordered or the key is not this record's",
                code="cannot_decrypt",
            ) from err
        return bytes(message), int(tag)

    def _open_preamble(self) -> None:
        blob_format(bytes(self._buffer[:1]))
        if self._buffer[0] != FORMAT_STREAM:
            raise InvalidEncoding("this blob is a resource, not a streamed attachment")
        header = bytes(self._buffer[1 : 1 + _HEADER])
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, self._key)
        except (nacl.exceptions.CryptoError, ValueError) as err:
            raise NotAuthorised(
                "cannot start decrypting this attachment", code="cannot_decrypt"
            ) from err
        (meta_len,) = struct.unpack(">I", self._buffer[1 + _HEADER : _PREAMBLE])
        if not _ABYTES <= meta_len <= MAX_META_BYTES + _ABYTES:
            raise InvalidEncoding("attachment metadata frame has an impossible length")
        self._meta_len = meta_len

    def feed(self, data: bytes) -> bytes:
        if self.finished:
            if data:
                raise InvalidEncoding(
                    "bytes follow the final frame of the attachment", code="trailing_data"
                )
            return b""
        self._buffer.extend(data)
        out: list[bytes] = []
        if self._meta_len is None:
            if len(self._buffer) < _PREAMBLE:
                return b""
            self._open_preamble()
        assert self._meta_len is not None
        if self.metadata is None:
            end = _PREAMBLE + self._meta_len
            if len(self._buffer) < end:
                return b""
            ad = bytes(self._buffer[:1]) + bytes(self._buffer[1 + _HEADER : _PREAMBLE])
            message, tag = self._pull(bytes(self._buffer[_PREAMBLE:end]), ad)
            if tag != _TAG_MESSAGE:
                raise InvalidEncoding("attachment metadata frame has the wrong tag")
            self.metadata = message
            del self._buffer[:end]
        # A full frame is never the last one (the writer's last frame is shorter).
        while len(self._buffer) >= _FRAME:
            message, tag = self._pull(bytes(self._buffer[:_FRAME]), None)
            if tag != _TAG_MESSAGE:
                raise InvalidEncoding("a full attachment frame carries the final tag")
            out.append(message)
            del self._buffer[:_FRAME]
        return b"".join(out)

    def close(self) -> bytes:
        """Open the final frame; raise if the attachment was cut short."""
        if self.finished:
            return b""
        if self.metadata is None or len(self._buffer) < _ABYTES:
            raise InvalidEncoding(
                "the attachment ends before its final frame (truncated)",
                code="truncated_ciphertext",
            )
        message, tag = self._pull(bytes(self._buffer), None)
        if tag != _TAG_FINAL:
            raise InvalidEncoding(
                "the attachment ends before its final frame (truncated)",
                code="truncated_ciphertext",
            )
        self._buffer.clear()
        self.finished = True
        return message
