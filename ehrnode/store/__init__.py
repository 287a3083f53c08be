"""Persistence: one LevelDB per node.

Every table's first key byte, and the module that defines its layout:

    A  access log entries        store.access      a  access log heads      store.access
    B  blocks by height          store.chain       C  certificates          store.chain
    H  block id -> height        store.chain       M  chain head            store.chain
    S  state entries             store.chain       T  tx id -> location     store.chain
    O  blob metadata             blobs.store       P  earlier builds' small blobs
    X  erased-blob tombstones    blobs.store       Q  blobs still missing   blobs.replication
    V  consensus signing record  consensus.driver  G  blob segments' ends    blobs.store
    F  block segments' ends      store.blockfiles

Blob bytes and block bytes live outside LevelDB, in files (``blobs.segments``,
``blobs.store``, ``store.blockfiles``).
"""
