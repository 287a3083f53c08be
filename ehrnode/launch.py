"""The ``ehrnode`` command's entry point: process set-up that must come before the node's
modules are imported (``ehrnode.process.reexec_with_huge_pages``), then ``ehrnode.cli``."""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        from ehrnode.process import reexec_with_huge_pages  # noqa: PLC0415 - before the node

        reexec_with_huge_pages()
    from ehrnode.cli import main as cli_main  # noqa: PLC0415 - after the exec, if any

    return cli_main()
