"""Every verb as a user runs it, over bad inputs and its happy path (issue 12): the command-level matrix.

Each row of `ROWS` is one command line. A row that fails (`code` 2, the default) must give exit code 2,
exactly one line on stderr (`picollm VERB: error: ...`, no traceback) naming what `names` lists, nothing
on stdout, recommend only flags the verb has, and leave every file as it was: the shared run, the shared
prepared-data cache and the row's own directory (hashed before and after). A happy row (`code=0`) must
exit 0 and print what `names` lists; the shared run and cache stay unchanged there too.

Adding a row is one line. The command line is split like a shell's and its placeholders filled in:

    {run}      a finished tiny run (the session's `reference_run`): read only, never changed
    {copy}     a copy of it, made for the row, which its `world` may damage first
    {data}     the TinyStories sample            {cache}   the session's prepared-data cache
    {tmp}      the row's own empty directory     {file}    an existing file in it
    {ro}       a read-only directory in it       {config}  a tiny training config writing to {tmp}/out
    {stories}  a few made-up stories             {badutf8} a text file with an invalid UTF-8 byte
    {jsonl}    JSON lines without a 'text' field {badyaml} a YAML file with a syntax error on line 2
    {study}    a one-run study of the tiny run   {studydir} that study, run once for the module

`world` names a function of WORLDS that prepares the row's directory before the command runs. `sub=True`
runs the command in a real subprocess (`python -m picollm`) instead of `picollm.cli.main` in process.

The matrix is built from `picollm.cli.COMMANDS`: a verb without a happy row and an error row fails
`test_every_verb_has_rows`, so a verb added later must bring its rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from helpers import TINY_MODEL, run_config

import picollm.serve.server
from picollm import cli, runlock
from picollm.config import SECTIONS, DataConfig, TrainConfig
from picollm.models.registry import families

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    verb: str
    args: str  # after the verb, with {placeholders}
    names: tuple[str, ...] = ()  # what the error line (or a happy row's output) must contain
    code: int = 2
    world: str | None = None  # a key of WORLDS
    sub: bool = False  # through a real `python -m picollm` process

    @property
    def id(self) -> str:
        return f"{self.verb}: {self.args}" + (f" [{self.world}]" if self.world else "")


def bad(verb: str, args: str, *names: str, **kw) -> Row:
    return Row(verb, args, names, **kw)


def ok(verb: str, args: str, *names: str, **kw) -> Row:
    return Row(verb, args, names, code=0, **kw)


# The cases: (1) push, (2) the lock, (3) the recipe, (4) study overrides written as `--key value`,
# (5) damaged cache keeping sizes, (6) unwritable or occupied outputs, (7) study --jobs, (8) dry run and
# devices; and the weaker ones (flags a verb lacks, advice that cannot be followed, --grid, batch larger
# than the data, damaged final/, config.json checksum, YAML line and column, "None bytes").
ROWS = [
    # --- prepare ------------------------------------------------------------------------------------------
    ok("prepare", "--data {data} --num-stories 300 --split 0.8,0.1,0.1 --tokenizer bpe:512 --num-proc 1 "
                  "--cache-dir {cache} --json", '"cached": true'),
    ok("prepare", "--data {data} --num-stories 300 --split 0.8,0.1,0.1 --tokenizer bpe:512 --num-proc 1 "
                  "--cache-dir {tmp}/cache", "rebuilding", "train.bin does not match the sha256",
       world="damaged_cache"),
    bad("prepare", "--data {stories} --cache-dir {ro}", "{ro}/prepared", "read-only", "--cache-dir"),
    bad("prepare", "--data {stories} --cache-dir {file}", "{file} is a file, not a directory", "--cache-dir"),
    bad("prepare", "--data {tmp}/missing.txt --cache-dir {tmp}/cache", "{tmp}/missing.txt does not exist",
        "--data PATH"),
    bad("prepare", "--data {stories} --split 0.5,0.5 --cache-dir {tmp}/cache", "--split", "0.5,0.5"),
    bad("prepare", "--data {stories} --tokenizer bpe:x --cache-dir {tmp}/cache", "bpe:x"),
    bad("prepare", "--data {stories} --num-stories 0 --cache-dir {tmp}/cache", "data.num_stories"),
    bad("prepare", "--data {stories} --num-stories 99 --cache-dir {tmp}/cache", "--num-stories 99"),
    bad("prepare", "--data {stories} --encoding-errors ignore", "--encoding-errors", "ignore"),
    bad("prepare", "--data {badutf8} --cache-dir {tmp}/cache", "{badutf8}", "invalid UTF-8",
        "--encoding-errors replace"),
    bad("prepare", "--data {jsonl} --cache-dir {tmp}/cache", "no field 'text'", "--text-field NAME"),
    bad("prepare", "--data {stories} --format docx --cache-dir {tmp}/cache", "docx"),
    bad("prepare", "--data {stories} --num-proc 0 --cache-dir {tmp}/cache", "data.num_proc"),
    # --- models -------------------------------------------------------------------------------------------
    ok("models", "--family kgram --vocab-size 512", "kgram-pico"),
    bad("models", "--params 3M", "--params needs --family"),
    bad("models", "--family mamba", "mamba"),
    bad("models", "--vocab-size many", "--vocab-size", "many"),
    bad("models", "--set k", "--set", "KEY=VALUE"),
    bad("models", "--family kgram --params lots", "lots"),
    # --- train --------------------------------------------------------------------------------------------
    ok("train", "--config {config} --no-progress", "run directory: {tmp}/out"),
    ok("train", "--config {config} --dry-run", "flops_per_token", "est_seconds"),
    ok("train", "--config {config} --dry-run --model.d_model 16384 --model.n_heads 128 --model.n_layers 48",
       "num_parameters: 154", "not_measured: a step needs about"),
    bad("train", "--config {config} --dry-run --model.context_length 100000000", "model.context_length 100,000,000",
        "too few for one window"),
    bad("train", "--config {config} --model.d_model 16384 --model.n_heads 128 --model.n_layers 48",
        "154,636", "weights, gradients and adamw state alone"),
    bad("train", "--config {config} --train.batch_size 100000", "train.batch_size 100000", "windows"),
    bad("train", "--config {config} --out {file}", "{file} is a file, not a directory"),
    bad("train", "--config {config} --out {ro}/run", "{ro}/run cannot be written", "read-only"),
    bad("train", "--config {config} --data.cache_dir {ro}", "{ro}/prepared", "--data.cache_dir"),
    bad("train", "--resume {copy} --train.lr 1e-3", "train.lr 0.003 -> 0.001", "--allow-recipe-change",
        world="interrupted"),
    bad("train", "--config {copy}/config.yaml --out {copy} --train.max_steps 20", "train.max_steps 12 -> 20",
        "finished under another recipe", world="finished"),
    bad("train", "--resume {copy} --train.lr 1e-3", "train.lr 'auto' -> 0.001", "--allow-recipe-change",
        world="tuned"),
    bad("train", "--resume {copy} --model.d_model 64", "model.d_model 32 -> 64", "another model",
        world="interrupted"),
    bad("train", "--resume {copy} --from-step 7", "no checkpoint at step 7", "steps 10, 12", world="finished"),
    bad("train", "--config {config} --from-step 7", "--from-step N goes with --resume"),
    bad("train", "--resume {copy} --fresh --from-step 10", "--fresh"),
    bad("train", "--resume {copy}", "optimizer.safetensors", "picollm train --resume {copy} --from-step 10",
        world="damaged_latest"),
    bad("train", "--resume {copy}", "{copy} is being trained by another process", f"pid {os.getpid()}",
        world="locked"),
    bad("train", "--config {copy}/config.yaml --out {copy} --fresh", "being trained by another process",
        world="locked"),
    bad("train", "--resume {copy}", "format 99", "newer picollm", world="newer_run_format"),
    bad("train", "--config {config} --train.lr -1", "train.lr", "-1"),
    bad("train", "--config {config} --train.lrr 1", "train.lrr"),
    bad("train", "--config {config} --train.batch_size", "--train.batch_size", "needs a value"),
    bad("train", "--config {config} --model.family mamba", "mamba"),
    bad("train", "--preset mamba-pico", "mamba"),
    bad("train", "--config {tmp}/missing.yaml", "{tmp}/missing.yaml does not exist"),
    bad("train", "--config {badyaml}", "{badyaml}", "line 2, column"),
    bad("train", "", "say what to train"),
    bad("train", "--resume {tmp}/nothing", "{tmp}/nothing", "config.yaml is missing"),
    bad("train", "--resume {copy} --dry-run", "--dry-run", world="finished"),
    bad("train", "--config {config} --device tpu", "tpu"),
    # --no-tune: never an lr sweep; one run has no fixed rate to put in place of auto, so auto is refused
    ok("train", "--config {config} --no-tune --dry-run", "est_seconds"),
    bad("train", "--config {config} --train.lr auto --no-tune", "--no-tune and --train.lr auto contradict",
        "--train.lr 3e-3"),
    bad("train", "--config {tmp}/auto.yaml --no-tune --dry-run", "train.lr auto in {tmp}/auto.yaml", "--no-tune",
        world="auto_config"),
    bad("train", "--resume {copy} --no-tune", "train.lr auto in {copy}/config.yaml", "--train.lr 3e-3",
        world="sweeping"),
    # --- eval ---------------------------------------------------------------------------------------------
    ok("eval", "{run} --split val --max-windows 2 --device cpu", "nll", "ppl", "bpb"),
    bad("eval", "{tmp}/missing", "{tmp}/missing does not exist"),
    bad("eval", "{tmp}/final", "checkpoint without its run directory", "pass --data PATH", world="loose_final"),
    bad("eval", "{run} --data {badutf8}", "invalid UTF-8", "--encoding-errors replace"),
    bad("eval", "{run} --data {jsonl}", "no field 'text'", "--text-field NAME"),
    bad("eval", "{run} --batch-size 0", "--batch-size", "0"),
    bad("eval", "{run} --device tpu", "tpu"),
    bad("eval", "{run} --diversity --strategies bogus", "bogus"),
    bad("eval", "{copy}", "{copy}/final is damaged", "load {copy}/best instead",
        "picollm train --resume {copy} --from-step 12", world="damaged_final"),
    # --- generate -----------------------------------------------------------------------------------------
    ok("generate", "{run} --prompt Once --max-new-tokens 3 --device cpu", "Once"),
    bad("generate", "{run} --strategy top-p --top-p 2", "top-p", "2"),
    bad("generate", "{copy} --prompt Once", "{copy}/final/config.json", "config_sha256", world="edited_heads"),
    bad("generate", "{copy} --prompt Once", "{copy}/final is damaged", world="damaged_final"),
    bad("generate", "{tmp}/missing --prompt Once", "{tmp}/missing does not exist"),
    bad("generate", "{run} --stream --num-samples 2", "--stream"),
    bad("generate", "{run} --device tpu", "tpu"),
    bad("generate", "{run} --strategy beam", "--strategy", "beam"),
    # --- study --------------------------------------------------------------------------------------------
    ok("study", "{study} --out {tmp}/study --jobs 1 --no-progress --no-report", "1 of 1 runs are finished already",
       world="study_copy"),
    ok("study", "{study} --dry-run --jobs 1 --out {tmp}/study", "1 distinct runs"),
    ok("study", "{study} --dry-run --jobs 1 --out {tmp}/study --train.lr auto --no-tune", "no lr tuning (--no-tune)",
       "fixed rate: at 0.0003: tf-1"),
    bad("study", "--dry-run --jobs 0", "--jobs must be at least 1, got 0"),
    bad("study", "--dry-run --jobs -2", "--jobs must be at least 1, got -2"),
    bad("study", "{study} --dry-run --grid model.nokey=1,2", "--grid model.nokey", "model.n_layers"),
    bad("study", "--dry-run --train.device cpu --grid model.nokey=1", "--grid model.nokey", "model.k"),
    bad("study", "--dry-run --only size --data {data} --data.cache_dir {file}", "prepared-data cache",
        "{file} is a file", sub=True),
    bad("study", "{study} --out {file}", "--out {file} is a file, not a directory"),
    bad("study", "{study} --out {ro}/study", "--out {ro}/study cannot be written"),
    bad("study", "{tmp}/missing.yaml", "{tmp}/missing.yaml does not exist"),
    bad("study", "{badyaml}", "line 2, column"),
    bad("study", "{study} --dry-run --only nothing", "nothing"),
    # --- report -------------------------------------------------------------------------------------------
    ok("report", "{studydir} --out {tmp}/report", "{tmp}/report/index.html"),
    bad("report", "{tmp}/nothing", "{tmp}/nothing"),
    bad("report", "{studydir} --out {file}", "--out {file} is a file, not a directory"),
    bad("report", "{studydir} --out {ro}/report", "--out {ro}/report cannot be written"),
    # --- compare ------------------------------------------------------------------------------------------
    ok("compare", "{run} --out {tmp}/compare", "{tmp}/compare/index.html"),
    bad("compare", "{run} --out {file}", "--out {file} is a file, not a directory"),
    bad("compare", "{run} --out {ro}/compare", "--out {ro}/compare cannot be written", "read-only"),
    bad("compare", "{tmp}/nothing --out {tmp}/compare", "{tmp}/nothing is not a run directory"),
    # --- bench --------------------------------------------------------------------------------------------
    ok("bench", "--tiny --skip train,eval,generate,kgram,prepare,gpu --json {tmp}/b.json", "wrote {tmp}/b.json"),
    bad("bench", "--skip bogus", "bogus", "--skip"),
    bad("bench", "--tiny --json {tmp}", "--json {tmp} is a directory"),
    bad("bench", "--tiny --markdown {ro}/bench.md", "--markdown {ro}/bench.md cannot be written"),
    bad("bench", "--batch-size 0", "--batch-size must be at least 1"),
    bad("bench", "--families mamba", "mamba"),
    # --- push ---------------------------------------------------------------------------------------------
    ok("push", "{run} someone/pico", "https://huggingface.co/someone/pico"),
    bad("push", "{tmp}/missing someone/pico", "{tmp}/missing does not exist", sub=True),
    bad("push", "{copy} someone/pico", "{copy}/final is damaged", world="damaged_final"),
    bad("push", "{run} someone/down", "could not upload to the hub repo 'someone/down'", "connection refused"),
    bad("push", "{run}", "repo_id"),
    # --- export -------------------------------------------------------------------------------------------
    ok("export", "{run} --out {tmp}/exported", "{tmp}/exported"),
    bad("export", "{tmp}/missing --out {tmp}/exported", "{tmp}/missing does not exist"),
    bad("export", "{copy} --out {tmp}/exported", "{copy}/final is damaged", world="damaged_final"),
    bad("export", "{run} --out {file}", "{file}"),
    bad("export", "{run} --out {tmp}", "{tmp}", "--force"),
    bad("export", "{run} --out {tmp}/exported --dtype fp8", "--dtype", "fp8"),
    # --- serve (the server itself is replaced by FakeServer: the row checks all that comes before it) --------
    ok("serve", "{run} --port 0", "[serve] 1 models", "playground http://127.0.0.1:"),
    bad("serve", "{run} --port 70000", "--port must be in [0, 65535], got 70000"),
    bad("serve", "{tmp}/missing", "{tmp}/missing does not exist"),
    bad("serve", "{run} --workers 0", "--workers must be at least 1"),
    bad("serve", "{copy}", "{copy}/final is damaged", world="damaged_final"),
]


# --- the worlds: what a row's directory holds before its command runs -----------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _interrupted(w: World) -> None:
    """Killed after its step-10 checkpoint: no final/, no summary, no step-12 checkpoint."""
    (w.copy / "summary.json").unlink()
    shutil.rmtree(w.copy / "final")
    shutil.rmtree(w.copy / "checkpoints" / "step-00000012")


def _tuned(w: World) -> None:
    """Interrupted, and trained at the rate an lr sweep chose (`train.lr: auto`): config.yaml records it."""
    _interrupted(w)
    path = w.copy / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data["train"]["lr_found"] = {"chosen": data["train"]["lr"], "losses": [], "wall_time_s": 1.0}
    path.write_text(yaml.safe_dump(data))


def _sweeping(w: World) -> None:
    """Stopped during its lr sweep (`train.lr: auto`): config.yaml says auto, no checkpoint or summary yet."""
    _interrupted(w)
    shutil.rmtree(w.copy / "checkpoints")
    path = w.copy / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data["train"]["lr"] = "auto"
    path.write_text(yaml.safe_dump(data))


def _auto_config(w: World) -> None:
    """The row's tiny config with `train.lr: auto`, as {tmp}/auto.yaml."""
    data = yaml.safe_load(Path(w.values["config"]).read_text())
    data["train"]["lr"] = "auto"
    (w.tmp / "auto.yaml").write_text(yaml.safe_dump(data))


def _damaged_latest(w: World) -> None:
    (w.copy / "summary.json").unlink()
    shutil.rmtree(w.copy / "final")
    _flip(w.copy / "checkpoints" / "step-00000012" / "optimizer.safetensors")


def _edited_heads(w: World) -> None:
    path = w.copy / "final" / "config.json"
    config = json.loads(path.read_text())
    config["model"]["n_heads"] = 1
    path.write_text(json.dumps(config, indent=2))


def _newer_run_format(w: World) -> None:
    path = w.copy / "environment.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "picollm_run_format": 99}))


def _damaged_cache(w: World) -> None:
    shutil.copytree(w.cache, w.tmp / "cache")
    _flip(next((w.tmp / "cache" / "prepared").glob("*/train.bin")))


WORLDS: dict[str, Callable[[World], None]] = {
    "finished": lambda w: None,
    "interrupted": _interrupted,
    "tuned": _tuned,
    "sweeping": _sweeping,
    "auto_config": _auto_config,
    "damaged_latest": _damaged_latest,
    "damaged_final": lambda w: (w.copy / "final" / "config.json").unlink(),
    "edited_heads": _edited_heads,
    "newer_run_format": _newer_run_format,
    "locked": _interrupted,  # and another process holds its lock while the command runs (`World.holding`)
    "damaged_cache": _damaged_cache,
    "loose_final": lambda w: shutil.copytree(w.run / "final", w.tmp / "final"),  # a checkpoint outside its run
    "study_copy": lambda w: shutil.copytree(w.studydir, w.tmp / "study"),
}

STORIES = [
    "Mia found a blue shell on the beach. She gave it to her little brother, and he smiled all day.",
    "The old dog liked the sun. Every morning he lay on the warm step and watched the birds.",
    "Ben built a tall tower of blocks. It fell down, so he built it again, taller than before.",
]


@dataclass
class World:
    tmp: Path
    run: Path
    cache: Path
    studydir: Path
    copy: Path
    values: dict[str, str]

    @contextlib.contextmanager
    def holding(self, row: Row) -> Iterator[None]:
        """Another holder of {copy}'s lock while the row runs (a second open file: flock refuses it)."""
        if row.world != "locked":
            yield
            return
        with runlock.hold(self.copy) as lock:
            lock.announce()
            yield


def make_world(row: Row, tmp: Path, reference_run: Path, cache: Path, studydir: Path, data_section: dict,
               sample_path: Path, read_only) -> World:
    (tmp / "file.txt").write_text("x\n")
    stories = tmp / "stories.txt"
    stories.write_text("".join(s + "\n<|endoftext|>\n" for s in STORIES), encoding="utf-8")
    (tmp / "bad.txt").write_bytes(b"Once upon a time.\n\xff\xfe broken\n")
    (tmp / "stories.jsonl").write_text("".join(json.dumps({"story": s}) + "\n" for s in STORIES))
    (tmp / "bad.yaml").write_text("train: 1\n  lr: 2\n")
    config = run_config(data_section, tmp / "out", model=dict(TINY_MODEL), max_steps=2, eval_interval=0,
                        ckpt_interval=0)
    (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    study = {
        "title": "matrix", "default_budget": "tiny",
        "base": {"data": {k: v for k, v in data_section.items()}, "model": dict(TINY_MODEL),
                 "train": {"batch_size": 4, "max_steps": 2, "eval_interval": 2, "eval_batches": 1, "ckpt_interval": 0,
                           "sample_tokens": 2, "threads": 1}},
        "budgets": {"tiny": {"description": "two steps"}},
        "eval": {"prompts": 2, "prompt_tokens": 4, "max_new_tokens": 4},
        "groups": {"size": {"runs": [{"name": "tf-{n_layers}", "set": {"model.family": "transformer"},
                                      "grid": {"model.n_layers": [1]}}]}},
    }
    (tmp / "study.yaml").write_text(yaml.safe_dump(study))
    copy = tmp / "copy"
    values = {"run": str(reference_run), "copy": str(copy), "data": str(sample_path), "cache": str(cache),
              "tmp": str(tmp), "file": str(tmp / "file.txt"), "stories": str(stories), "badutf8": str(tmp / "bad.txt"),
              "jsonl": str(tmp / "stories.jsonl"), "badyaml": str(tmp / "bad.yaml"), "config": str(tmp / "run.yaml"),
              "study": str(tmp / "study.yaml"), "studydir": str(studydir), "ro": str(tmp / "ro")}
    w = World(tmp, reference_run, cache, studydir, copy, values)
    if "{ro}" in row.args:
        read_only(tmp / "ro")
    if "{copy}" in row.args:
        shutil.copytree(reference_run, copy)
    if row.world is not None:
        WORLDS[row.world](w)
    return w


def fill(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def tree_hash(*roots: Path) -> dict[str, str]:
    """sha256 of every file below `roots` (their names included): what a failed command must not change."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# --- the fake hub --------------------------------------------------------------------------------------


class FakeHub:
    """huggingface_hub.HfApi, as `picollm.hub.upload` uses it: uploads land in a local folder."""

    uploads: dict[str, list[str]] = {}

    def create_repo(self, repo_id: str, exist_ok: bool = False, private: bool = False) -> None:
        if repo_id == "someone/down":
            raise OSError("connection refused")

    def upload_folder(self, folder_path: str, repo_id: str, commit_message: str) -> None:
        FakeHub.uploads[repo_id] = sorted(os.listdir(folder_path))


class FakeServer:
    """picollm.serve.server.run_server: the app is built and its socket bound, then nothing is served."""

    apps: list = []

    @staticmethod
    def run_server(app, sock, access_log: bool = True) -> None:
        FakeServer.apps.append(app)


# --- running a row --------------------------------------------------------------------------------------


def run_row(row: Row, argv: list[str], capsys) -> tuple[int, str, str]:
    if row.sub:
        proc = subprocess.run([sys.executable, "-m", "picollm", *argv], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
        return proc.returncode, proc.stdout, proc.stderr
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err


FLAG = re.compile(r"(?<![\w.-])--[A-Za-z][\w-]*(?:\.[A-Za-z_]+)*")
QUOTED = re.compile(r"`picollm (\w+)([^`]*)`")
CONFIG_FIELDS = {"data": set(DataConfig.__dataclass_fields__), "train": set(TrainConfig.__dataclass_fields__),
                 "model": {f for fam in families() for f in fam.config_cls.__dataclass_fields__} | {"family"}}


def flags_a_verb_lacks(verb: str, text: str) -> list[str]:
    """The --flags recommended in `text` that the verb they are meant for does not have: flags inside a
    quoted `picollm VERB ...` command are checked against that VERB, the others against `verb`; other
    quoted text (another process's command line) recommends nothing."""
    missing = []
    pieces = [(m.group(1), m.group(2)) for m in QUOTED.finditer(text)] + [(verb, re.sub(r"`[^`]*`", "", text))]
    for which, piece in pieces:
        parser = cli.verb_parser(which)
        options = {flag for action in parser._actions for flag in action.option_strings}
        takes_overrides = bool(parser.get_default("accepts_overrides"))
        for flag in FLAG.findall(piece):
            section, _, key = flag[2:].partition(".")
            if flag in options or (takes_overrides and section in SECTIONS and key in CONFIG_FIELDS[section]):
                continue
            missing.append(f"picollm {which} {flag}")
    return missing


@pytest.fixture(scope="module")
def studydir(tmp_path_factory, data_section, reference_run) -> Path:
    """The one-run study of the matrix, trained once (through the CLI) for the rows that read a study."""
    root = tmp_path_factory.mktemp("matrix-study")
    world = make_world(Row("study", ""), root, reference_run, Path(data_section["cache_dir"]), root / "study",
                       data_section, Path(data_section["data"]), None)
    assert cli.main(["study", world.values["study"], "--out", str(root / "study"), "--jobs", "1", "--no-progress",
                     "--no-report"]) == 0
    return root / "study"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_row(row, tmp_path, reference_run, data_section, sample_path, studydir, read_only, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(picollm.serve.server, "run_server", FakeServer.run_server)
    cache = Path(data_section["cache_dir"])
    w = make_world(row, tmp_path, reference_run, cache, studydir, data_section, sample_path, read_only)
    argv = [row.verb, *(fill(a, w.values) for a in shlex.split(row.args))]
    names = [fill(n, w.values) for n in row.names]
    shared = (reference_run, cache, studydir)
    before_shared, before_own = tree_hash(*shared), tree_hash(tmp_path)
    with w.holding(row):
        code, out, err = run_row(row, argv, capsys)
    assert tree_hash(*shared) == before_shared, "the command changed the shared run, cache or study"
    if row.code == 0:
        assert code == 0, err
        assert "Traceback" not in err, err
        for name in names:
            assert name in out + err, (name, out, err)
        if row.verb == "push":
            # what `picollm export` writes: transformers and picollm.load both read it
            assert {"README.md", "config.json", "model.safetensors", "modeling_picollm.py", "configuration_picollm.py",
                    "tokenizer.json", "tokenizer_config.json"} <= set(FakeHub.uploads["someone/pico"])
        return
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"picollm {row.verb}: error: "), err
    assert out == "", out
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert not flags_a_verb_lacks(row.verb, lines[0]), (flags_a_verb_lacks(row.verb, lines[0]), lines[0])
    assert tree_hash(tmp_path) == before_own, "a refused command changed a file"


def test_every_verb_has_rows():
    """Verbs added later (export, serve) must bring their rows: a happy path and at least one error."""
    for verb in cli.COMMANDS:
        kinds = {row.code for row in ROWS if row.verb == verb}
        assert kinds >= {0, 2}, f"picollm {verb} has no {'happy' if 0 not in kinds else 'error'} row in ROWS"
    assert {row.verb for row in ROWS} <= set(cli.COMMANDS)
    assert len(ROWS) >= 60 and sum(row.sub for row in ROWS) >= 2


def test_the_flag_check_catches_a_flag_the_verb_lacks():
    assert flags_a_verb_lacks("eval", "pass --encoding-errors replace") == []
    assert flags_a_verb_lacks("generate", "pass --encoding-errors replace") == ["picollm generate --encoding-errors"]
    assert flags_a_verb_lacks("eval", "run `picollm train --resume R --from-step 4`") == []
    assert flags_a_verb_lacks("eval", "run `picollm train --resume R --from-steps 4`") == \
        ["picollm train --from-steps"]
    assert flags_a_verb_lacks("train", "set --data.encoding_errors replace") == []
    assert flags_a_verb_lacks("train", "set --data.encoding_error replace") == ["picollm train --data.encoding_error"]
    assert flags_a_verb_lacks("prepare", "set --data.encoding_errors replace") == \
        ["picollm prepare --data.encoding_errors"]
