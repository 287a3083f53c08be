"""Where the state keeps what: every key prefix and the layout of its values. Values are
canonical msgpack, except where the table says raw bytes. The rules (``core.state`` and
``core.records``) are the only writers.

Index entries (marked *) are each a function of other entries: a record's blob claim,
its place in its patient's list or among its root's versions, a patient's grant ids. They
are kept by the same rules, in the same batches, but left out of the state hash
(``in_state_hash``): the entries they are derived from are in it, and ``ehrnode check``
derives them again to compare. Leaving them out spares a record two of its four
state-hash terms.

    key                                    value
    b"vals", b"vfrom"…, b"vvote"…,         validator sets, set-change votes and evidence:
    b"vpend", b"evid"…                     see core.authority
    b"acct" + key(32)                      {"role", "nonce", "since", "name"?, "by"?, "nrec",
                                            "last"? (a patient's latest record write height)}
    b"rec"  + record id(32)                {"patient", "author", "blob", "size", "type",
                                            "height", "root"?, "ver", "erased", "amends"?,
                                            "erased_at"?, on a root only: "head"?, "nver",
                                            "seq" (its place in the patient's list);
                                            from a ``records`` transaction: "tx", "item"}
                                            no "root" on a first version, no "head" until
                                            an amendment: each would be the entry's own id
                                            (``records.root_of``, ``records.head_of``)
  * b"prec" + patient(32) + seq(8, BE)     raw root record id: the patient's records, in order
  * b"ver"  + root id(32) + seq(8, BE)     raw id of version seq + 1 of a record, from seq 1
                                            (the root is version 1 and has no entry)
    b"key"  + record id(32) + reader(32)   raw: the data key a grant wrapped for that reader
                                            (wins over the writer's, which is in the
                                            record's transaction: see ``wrapped_key``)
    b"grant"+ grant id(32)                 {"patient", "grantee", "scope", "height",
                                            "types"?, "expires"?, "records"?, "revoked"?}
  * b"pgr"  + patient(32) + grant id(32)   raw b"": the patient's grants
    b"std"  + patient(32)                  [[grantee, grant id, types | nil, expires | nil]...]
                                            the standing grants in force (not revoked)
  * b"blob" + blob hash(32)                raw record id: the one record a ciphertext belongs to
    b"lgr"  + record id(32) + grantee(32)  [grant id, ...]: the listed grants not revoked that
                                            name that record for that grantee, in order
"""

from __future__ import annotations

from ehrnode.core import authority

K_VALS: bytes = authority.K_VALS
P_ACCT = b"acct"
P_REC = b"rec"
P_PREC = b"prec"
P_VER = b"ver"
P_KEY = b"key"
P_GRANT = b"grant"
P_PGR = b"pgr"
P_STD = b"std"
P_LGR = b"lgr"
P_BLOB = b"blob"

# Index entries: functions of the other entries (see above), outside the state hash.
INDEX_PREFIXES = (P_PREC, P_VER, P_PGR, P_BLOB)


def in_state_hash(key: bytes) -> bool:
    return not key.startswith(INDEX_PREFIXES)
