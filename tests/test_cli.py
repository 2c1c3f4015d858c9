"""The dispatcher (picollm.cli): what it keeps beside a verb's own arguments never collides with them."""

from __future__ import annotations

import argparse

import pytest

from picollm import cli


@pytest.mark.parametrize("verb", list(cli.COMMANDS))
def test_no_verb_declares_a_name_the_dispatcher_uses(verb):
    parser = cli.verb_parser(verb)
    dests = {action.dest for action in parser._actions if action.dest != argparse.SUPPRESS}
    assert not dests & {cli.VERB_KEY, *cli.RESERVED}, dests


def test_a_verb_may_name_its_argument_run_or_command(monkeypatch, capsys):
    """`picollm push RUN REPO` once failed on every call: its positional `run` replaced the handler."""
    seen = {}

    def add_arguments(parser):
        parser.add_argument("run")
        parser.add_argument("--command")

    def run(args):
        seen.update(run=args.run, command=args.command)
        return 0

    module = argparse.Namespace(add_arguments=add_arguments, run=run)
    monkeypatch.setitem(cli.COMMANDS, "probe", ("probe_module", "a test verb"))
    real = cli.importlib.import_module
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: module if name == "probe_module" else real(name))
    assert cli.main(["probe", "some/dir", "--command", "x"]) == 0
    assert seen == {"run": "some/dir", "command": "x"}
