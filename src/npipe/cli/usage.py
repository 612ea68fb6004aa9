"""Usage errors of a subcommand are told with that subcommand's usage."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, cast


class SubcommandParser(argparse.ArgumentParser):
    """An ArgumentParser for subcommands that rejects words it does not know itself.

    argparse hands a subcommand's unknown words back to the top-level parser, which then
    prints its own usage ("npipe [-h] ... COMMAND ...") for a mistyped ``npipe http -X``:
    not the usage the user needs. Rejecting them here prints ``npipe http``'s. Nested
    subcommands (``npipe samba setup``) inherit the class, so the innermost one speaks.
    argparse's subparsers action parses a subcommand's words with its public
    ``parse_known_args`` (Python 3.11 here, and 3.13's, which Debian 13 has, reads the
    same); tests/test_cli_habits.py checks every subcommand.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def add_subcommands(
    parser: argparse.ArgumentParser, **kwargs: Any
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """``parser.add_subparsers(**kwargs)`` whose subcommands are SubcommandParsers."""
    sub = parser.add_subparsers(parser_class=SubcommandParser, **kwargs)
    return cast("argparse._SubParsersAction[argparse.ArgumentParser]", sub)


__all__ = ["SubcommandParser", "add_subcommands"]
