"""Every console script's every flag says what it does (``--help`` is an operator's first stop)."""

from __future__ import annotations

import argparse

import pytest

from devtools import triton_local
from swc_service import config
from visloc_client import cli as client_cli
from visloc_export import cli as export_cli

PARSERS = {
    "swc-service": config.build_parser,
    "visloc": client_cli.build_parser,
    "visloc-export": export_cli.build_parser,
    "visloc-triton": triton_local.build_parser,
}


def options(parser: argparse.ArgumentParser, where: str = ""):
    """(command path, option strings, help) of every option, subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, f"{where} {name}".strip())
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield where, action.option_strings, action.help


def test_the_walk_sees_subcommands_and_a_missing_help():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    sub.add_parser("run").add_argument("--fast")
    assert list(options(p)) == [("run", ["--fast"], None)]


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_has_help_text(script):
    found = list(options(PARSERS[script]()))
    assert found
    missing = [f"{script} {where} {'/'.join(flags)}".replace("  ", " ") for where, flags, text in found
               if text is argparse.SUPPRESS or not (text or "").strip()]  # fmt: skip
    assert missing == []
