"""ehrnode: a peer-to-peer daemon for sharing encrypted health records under patient consent."""

from ehrnode import compiled as _compiled

_compiled.activate()  # the mypyc build of the transaction path, when it matches the sources
