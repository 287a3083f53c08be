"""The ``ehrnode`` command's entry point: process set-up that must come before the node's
modules are imported (``ehrnode.process.reexec_with_huge_pages`` and
``no_default_ca_certificates``), then ``ehrnode.cli``."""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        from ehrnode.process import (  # noqa: PLC0415 - before the node
            no_default_ca_certificates,
            reexec_with_huge_pages,
        )

        reexec_with_huge_pages()
        with no_default_ca_certificates():
            import aiohttp  # noqa: F401, PLC0415 - its TLS contexts, built at import, unused
    from ehrnode.cli import main as cli_main  # noqa: PLC0415 - after the exec, if any

    return cli_main()
