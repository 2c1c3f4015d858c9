"""The `picollm` command line: one tool, one verb per job.

Each verb lives in `picollm/commands/<verb>.py` with two functions:
`add_arguments(parser)` declares its flags and `run(args) -> int` does the work (heavy imports
inside `run`, so `--help` stays fast). A `UserError` raised anywhere becomes one line on stderr and
exit code 2; any other exception is a bug and keeps its traceback (exit code 1).

A library error names a setting by its dotted config flag (`--data.encoding_errors replace`), which
`picollm train` and `study` accept as they are; a verb with its own flag of that name (`prepare
--encoding-errors`, `eval --text-field`) is told its own (`in_verb_terms`), so an error only ever
recommends flags the verb has.

The dispatcher keeps nothing of its own in the parsed arguments that a verb could name: the verb is
stored under `VERB_KEY` (a name with a space, which no flag or positional argument produces) and its
`run` is looked up from `COMMANDS`, so a verb may call an argument `run` or `command`. It adds
`args.overrides` (the flags argparse did not know, for verbs that set `accepts_overrides`); a verb
must not declare either name itself (tests/test_cli.py checks every verb).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from picollm._version import __version__
from picollm.errors import UserError

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("picollm.commands.prepare", "tokenize, split and cache a dataset"),
    "models": ("picollm.commands.models", "list model presets or solve for a parameter count"),
    "train": ("picollm.commands.train", "train a model from a config, preset and overrides"),
    "eval": ("picollm.commands.eval", "NLL, perplexity, bits per byte and diversity of a model"),
    "generate": ("picollm.commands.generate", "continue a prompt with a trained model"),
    "study": ("picollm.commands.study", "run the whole comparison study and write its report"),
    "report": ("picollm.commands.report", "rebuild a study's report from its run logs"),
    "compare": ("picollm.commands.compare", "tables and plots comparing any runs"),
    "bench": ("picollm.commands.bench", "measure training, evaluation and generation speed"),
    "export": ("picollm.commands.export", "write a directory Hugging Face transformers loads"),
    "push": ("picollm.commands.push", "export a model and upload it to the Hugging Face hub"),
    "serve": ("picollm.commands.serve", "a local playground page and an OpenAI-compatible API over models"),
}


VERB_KEY = "picollm verb"  # where the parsed arguments hold the verb
RESERVED = ("overrides", "accepts_overrides")  # what the dispatcher sets (or reads) beside a verb's own


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not usage + error) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (`\\n`, `\\x85`, `\\udcff`):
    an error message quoting a user's key or value still prints as one line, and always encodes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="picollm", description="Train, evaluate and compare small language models.")
    parser.add_argument("--version", action="version", version=f"picollm {__version__}")
    verbs = parser.add_subparsers(dest=VERB_KEY, metavar="VERB", parser_class=_Parser)
    parser.verbs = {}
    for verb, (module_name, help_text) in COMMANDS.items():
        sub = parser.verbs[verb] = verbs.add_parser(verb, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


DOTTED_FLAG = re.compile(r"--(?:data|model|train)\.([A-Za-z_]+)")


def in_verb_terms(message: str, parser: argparse.ArgumentParser) -> str:
    """`message` with each dotted config flag (`--data.text_field`) replaced by the verb's own flag of the
    same name (`--text-field`) where it has one; quoted commands (`picollm ...`) are left as they are."""
    options = {flag for action in parser._actions for flag in action.option_strings}

    def own(match: re.Match) -> str:
        flag = "--" + match.group(1).replace("_", "-")
        return flag if flag in options else match.group(0)

    parts = message.split("`")
    return "`".join(DOTTED_FLAG.sub(own, part) if i % 2 == 0 else part for i, part in enumerate(parts))


def verb_parser(verb: str) -> argparse.ArgumentParser:
    """The parser of one verb alone, as `picollm VERB` parses its flags."""
    module_name, help_text = COMMANDS[verb]
    parser = _Parser(prog=f"picollm {verb}", description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def _join_overrides(argv: list[str]) -> list[str]:
    """`--train.lr 1e-3` as `--train.lr=1e-3`: argparse would otherwise hand the value of an override to
    a verb's optional positional argument (`picollm study --data.cache_dir /scratch`)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        if flag.startswith("--") and "=" not in flag and "." in flag and i + 1 < len(argv) \
                and not argv[i + 1].startswith("--"):
            out.append(f"{flag}={argv[i + 1]}")
            i += 2
            continue
        out.append(flag)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # verbs that take dotted config overrides (--train.lr 1e-3) receive the flags argparse does not know
    args, extra = parser.parse_known_args(_join_overrides(list(sys.argv[1:] if argv is None else argv)))
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    verb = getattr(args, VERB_KEY)
    if verb is None:
        parser.print_help()
        return 2
    run = importlib.import_module(COMMANDS[verb][0]).run
    try:
        return int(run(args) or 0)
    except UserError as exc:
        print(f"picollm {verb}: error: {one_line(in_verb_terms(str(exc), parser.verbs[verb]))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"picollm {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
