"""Which blob claims may exist: a Bloom filter over the committed ``b"blob"`` state keys.

Every record's rules ask the state whether its ciphertext already belongs to another
record (``core.records``), and the answer is almost always no: one LevelDB miss per record
at every node that executes or admits it, three quarters of a validator's state reads
under load. The filter answers most of those misses from memory. It never turns a claim
into a miss: every claim committed before the node started is added by a scan of the
database (``StateView.fill_claims``, a chunk at a time, in the background), every claim
committed since is added before its batch is written (``Chain``), and until the scan has
finished the filter answers nothing. A key it holds, or one it cannot rule out, is read
from LevelDB as before: an erased record's claim, or a false positive, costs what every
claim cost without the filter.

Three bits a key in a fixed 4 MiB, all three in one 64-byte block so that a lookup
touches one cache line: about one false positive in 1,500 lookups with a million claims,
one in 70 with three million; past that the filter answers less often, never wrongly.
The bits come from Python's ``hash`` of the key, keyed afresh in every process, so no one
can choose blobs that fill the same bits on every node.

Compiled with the transaction path (``ehrnode.compiled``): a record's commit adds its claim
and its execution looks it up, about 1 us each as Python.
"""

from __future__ import annotations

from ehrnode.core.layout import P_BLOB

BYTES = 4 * 1024 * 1024
_BLOCKS = BYTES // 64  # a key's three bits lie in one 64-byte block: one cache miss a lookup


def _places(key: bytes) -> tuple[int, int, int, int]:
    """The key's block (its first byte's offset) and three bits in it (0-511)."""
    h = hash(key)
    return (h & (_BLOCKS - 1)) << 6, (h >> 32) & 511, (h >> 41) & 511, (h >> 50) & 511


class ClaimFilter:
    def __init__(self) -> None:
        self._bits = bytearray(BYTES)
        self.ready = False  # the scan of the claims committed before the start is done
        self.count = 0  # keys added (a claim committed during the scan may count twice)

    def add(self, key: bytes) -> None:
        bits = self._bits
        block, a, b, c = _places(key)
        bits[block + (a >> 3)] |= 1 << (a & 7)
        bits[block + (b >> 3)] |= 1 << (b & 7)
        bits[block + (c >> 3)] |= 1 << (c & 7)
        self.count += 1

    def rules_out(self, key: bytes) -> bool:
        """True only for a state key that is a blob claim never added, once the filter is
        filled: what ``StateView.get`` answers without LevelDB."""
        return self.ready and key.startswith(P_BLOB) and not self.may_hold(key)

    def may_hold(self, key: bytes) -> bool:
        """False only for a key never added."""
        bits = self._bits
        block, a, b, c = _places(key)
        return bool(
            bits[block + (a >> 3)] & (1 << (a & 7))
            and bits[block + (b >> 3)] & (1 << (b & 7))
            and bits[block + (c >> 3)] & (1 << (c & 7))
        )
