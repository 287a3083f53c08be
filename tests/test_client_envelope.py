"""Payload encryption on the client: both blob formats round-trip, and any change to the
ciphertext, a wrong key, a cut or a reordering is detected."""

from __future__ import annotations

import io
import random

import pytest

from ehrnode.client import envelope
from ehrnode.client.envelope import CHUNK, StreamOpener
from ehrnode.core import crypto
from ehrnode.core.errors import InvalidEncoding, NotAuthorised

META = b'{"contentType":"application/dicom","resourceType":"Binary"}'
FRAME = CHUNK + 17


def sealed_stream(key: bytes, plaintext: bytes) -> bytes:
    sink = io.BytesIO()
    size, digest, plain = envelope.seal_stream(key, META, io.BytesIO(plaintext), sink)
    blob = sink.getvalue()
    assert (size, digest, plain) == (len(blob), crypto.sha256(blob), len(plaintext))
    return blob


def open_stream(key: bytes, blob: bytes, seed: int = 0) -> tuple[bytes, bytes | None]:
    """Feed ``blob`` in pieces of random sizes, as a network would deliver it."""
    rng = random.Random(seed)
    opener = StreamOpener(key)
    out = []
    at = 0
    while at < len(blob):
        step = rng.choice([1, 7, 17, 4096, CHUNK - 1, CHUNK + 17, 3 * CHUNK])
        out.append(opener.feed(blob[at : at + step]))
        at += step
    out.append(opener.close())
    return b"".join(out), opener.metadata


def test_box_round_trip_and_format_byte() -> None:
    key = crypto.new_data_key()
    blob = envelope.seal_resource(key, b'{"resourceType":"Patient"}')
    assert blob[0] == envelope.FORMAT_BOX
    assert envelope.open_resource(key, blob) == b'{"resourceType":"Patient"}'


def test_box_detects_every_flipped_byte_and_a_wrong_key() -> None:
    key = crypto.new_data_key()
    blob = envelope.seal_resource(key, b"secret observation")
    for i in range(1, len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(NotAuthorised) as caught:
            envelope.open_resource(key, bytes(tampered))
        assert caught.value.code == "cannot_decrypt"
    with pytest.raises(NotAuthorised):
        envelope.open_resource(crypto.new_data_key(), blob)


def test_unknown_format_byte_is_refused() -> None:
    key = crypto.new_data_key()
    blob = envelope.seal_resource(key, b"x")
    with pytest.raises(InvalidEncoding) as caught:
        envelope.open_resource(key, b"\x09" + blob[1:])
    assert caught.value.code == "unknown_format"
    with pytest.raises(InvalidEncoding):
        envelope.blob_format(b"")


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 12345])
def test_stream_round_trip_at_chunk_edges(size: int) -> None:
    key = crypto.new_data_key()
    plaintext = random.Random(size).randbytes(size)
    blob = sealed_stream(key, plaintext)
    assert blob[0] == envelope.FORMAT_STREAM
    for seed in range(3):
        opened, metadata = open_stream(key, blob, seed)
        assert opened == plaintext
        assert metadata == META


def test_stream_is_not_a_box_and_a_box_is_not_a_stream() -> None:
    key = crypto.new_data_key()
    with pytest.raises(InvalidEncoding):
        envelope.open_resource(key, sealed_stream(key, b"abc"))
    with pytest.raises(InvalidEncoding):
        open_stream(key, envelope.seal_resource(key, b"x" * 100))


def test_stream_with_a_wrong_key_fails() -> None:
    blob = sealed_stream(crypto.new_data_key(), b"x" * 1000)
    with pytest.raises(NotAuthorised):
        open_stream(crypto.new_data_key(), blob)


def test_stream_detects_a_flipped_byte_anywhere() -> None:
    key = crypto.new_data_key()
    blob = sealed_stream(key, random.Random(1).randbytes(2 * CHUNK + 100))
    positions = [1, 20, 26, 29, 40, 29 + len(META) + 17 + 5, len(blob) - FRAME - 3, len(blob) - 1]
    for position in positions:
        tampered = bytearray(blob)
        tampered[position] ^= 0x80
        with pytest.raises((NotAuthorised, InvalidEncoding)):
            open_stream(key, bytes(tampered))


def data_frames(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Split a stream blob into its preamble+meta and its data frames."""
    meta_len = int.from_bytes(blob[25:29], "big")
    head_end = 29 + meta_len
    body = blob[head_end:]
    return blob[:head_end], [body[i : i + FRAME] for i in range(0, len(body), FRAME)]


def test_stream_detects_truncation_reordering_and_dropped_frames() -> None:
    key = crypto.new_data_key()
    plaintext = random.Random(2).randbytes(3 * CHUNK + 10)
    head, frames = data_frames(sealed_stream(key, plaintext))
    assert len(frames) == 4

    with pytest.raises(InvalidEncoding) as caught:  # the final frame cut off
        open_stream(key, head + b"".join(frames[:-1]))
    assert caught.value.code == "truncated_ciphertext"
    with pytest.raises(InvalidEncoding):  # cut inside the metadata
        open_stream(key, head[:-3])
    with pytest.raises(NotAuthorised):  # two frames swapped
        open_stream(key, head + frames[1] + frames[0] + frames[2] + frames[3])
    with pytest.raises(NotAuthorised):  # a frame dropped
        open_stream(key, head + frames[0] + frames[2] + frames[3])
    with pytest.raises(NotAuthorised):  # a frame repeated
        open_stream(key, head + frames[0] + frames[0] + frames[1] + frames[2] + frames[3])


def test_stream_refuses_bytes_after_the_final_frame() -> None:
    key = crypto.new_data_key()
    blob = sealed_stream(key, b"abc")
    opener = StreamOpener(key)
    opener.feed(blob)
    assert opener.close() == b"abc"
    with pytest.raises(InvalidEncoding) as caught:
        opener.feed(b"more")
    assert caught.value.code == "trailing_data"
    with pytest.raises(NotAuthorised):  # appended before close: no longer a final frame
        open_stream(key, blob + b"\x00" * 5)


def test_stream_memory_is_bounded_by_a_few_chunks() -> None:
    """The opener never holds more than one frame of undecrypted input."""
    key = crypto.new_data_key()
    blob = sealed_stream(key, bytes(20 * CHUNK))
    opener = StreamOpener(key)
    for at in range(0, len(blob), 3 * CHUNK):
        opener.feed(blob[at : at + 3 * CHUNK])
        assert len(opener._buffer) < FRAME
    opener.close()


def test_stream_reads_a_source_that_returns_short_reads() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = data

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            n = 1000 if size < 0 else min(size, 1000)
            part, self.data = self.data[:n], self.data[n:]
            return part

    key = crypto.new_data_key()
    plaintext = random.Random(3).randbytes(CHUNK * 2 + 5)
    sink = io.BytesIO()
    envelope.seal_stream(key, META, Trickle(plaintext), sink)  # type: ignore[arg-type]
    _head, frames = data_frames(sink.getvalue())
    assert len(frames) == 3  # two full frames and the short final one
    assert open_stream(key, sink.getvalue())[0] == plaintext
