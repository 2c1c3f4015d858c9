"""Small helpers shared by the CLI tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

from picollm.cli import main


def exit_code(argv: list[str]) -> int:
    """`picollm.cli.main`'s return code, or the code of argparse's SystemExit (a bad flag value)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)
