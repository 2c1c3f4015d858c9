"""What `picollm serve` loads and how it names it: studies, runs (one still training, its lock held),
checkpoints and hub ids; unique ids; read-only loading; the command line's one-line errors; and the
text helpers (token pieces, stop sequences)."""

from __future__ import annotations

import fcntl
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import exit_code
from serve_helpers import MODEL_IDS, tiny_study

from picollm.errors import UserError
from picollm.serve.catalog import load_catalog, unique_ids
from picollm.serve.text import PieceDecoder, StopScanner, token_pieces


@pytest.fixture(scope="module")
def study(tmp_path_factory, sample_path):
    return tiny_study(tmp_path_factory, sample_path)


def run_dirs(study: Path) -> dict[str, Path]:
    record = json.loads((study / "study.json").read_text())
    return {info["label"]: study / info["dir"] for info in record["runs"].values()}


# a trainer holding its run's lock (a file in the run directory) until it is killed
HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "w")
fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def test_unique_ids_add_a_short_suffix():
    assert unique_ids(["a", "b", "a", "a", "a-2"]) == ["a", "b", "a-2", "a-3", "a-2-2"]


def test_study_run_checkpoint_and_collisions(study, tmp_path):
    runs = run_dirs(study)
    # a separate run whose directory is named like a study label, and a checkpoint directory of it
    other = tmp_path / "lstm-pico"
    shutil.copytree(runs["lstm-pico"], other)
    catalog = load_catalog([str(study), str(other), str(other / "best"), str(runs["transformer-pico"] / "final")])
    assert list(catalog.models) == [*MODEL_IDS, "lstm-pico-2", "lstm-pico-best",
                                    runs["transformer-pico"].name]
    assert catalog.models["lstm-pico"].study is catalog.studies[0]
    assert catalog.models["lstm-pico-2"].study is None
    assert catalog.models["lstm-pico-2"].info["val_nll"] == catalog.models["lstm-pico"].info["val_nll"]
    assert catalog.models["lstm-pico-best"].source == str(other / "best")
    assert catalog.studies[0].report == study.resolve() / "report" / "index.html"


def test_a_run_still_training_loads_best_without_touching_it(study, tmp_path):
    """No final/ yet, no summary, and another process holds a lock in the run directory: the server
    loads best/, takes and waits for no lock, and writes nothing there."""
    run = tmp_path / "training"
    shutil.copytree(run_dirs(study)["transformer-pico"], run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    lock_path = run / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with open(lock_path) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lock is really held
        before = snapshot(run)
        catalog = load_catalog([str(run)])
        assert list(catalog.models) == ["training"]
        assert catalog.models["training"].source == str(run / "best")
        assert catalog.models["training"].info["val_nll"] is None  # no summary yet
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_unfinished_study_runs_are_skipped_and_named(study, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    summary = run_dirs(copy)["lstm-pico"] / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "interrupted"}))
    lines = []

    class Log:
        def write(self, text):
            lines.append(text)

    catalog = load_catalog([str(copy)], log=Log())
    assert list(catalog.models) == ["transformer-pico"]
    assert catalog.skipped == [f"lstm-pico: not finished ({run_dirs(copy)['lstm-pico']})"]
    assert "[serve] skipped lstm-pico: not finished" in "".join(lines)


def test_bad_sources_are_one_clear_error(study, tmp_path, monkeypatch):
    run = tmp_path / "fresh"
    (run).mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(UserError, match="has no final/ or best/ checkpoint yet"):
        load_catalog([str(run)])
    with pytest.raises(UserError, match="neither a study"):
        load_catalog([str(tmp_path)])
    with pytest.raises(UserError, match="does not exist"):
        load_catalog([str(tmp_path / "missing")])

    import huggingface_hub

    def offline(repo_id, **kwargs):
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="someone/model' is not a local path, and the hub cannot be reached"):
        load_catalog(["someone/model"])


def test_a_hub_id_is_served_under_its_name(study, monkeypatch):
    import huggingface_hub

    final = run_dirs(study)["lstm-pico"] / "final"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(final))
    catalog = load_catalog(["someone/tiny-lstm"])
    assert list(catalog.models) == ["tiny-lstm"] and catalog.models["tiny-lstm"].source == "someone/tiny-lstm"


def test_command_line_errors_are_one_line(study, capsys):
    assert exit_code(["serve", str(study), "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err == "picollm serve: error: --max-tokens must be at least 1, got 0\n"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        assert exit_code(["serve", str(study), "--port", str(taken.getsockname()[1])]) == 2
        err = capsys.readouterr().err
        assert err.startswith("picollm serve: error: cannot listen on 127.0.0.1:") and "--port" in err
        assert err.count("\n") == 1
    finally:
        taken.close()
    assert exit_code(["serve", str(study / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_non_loopback_host_warns(study, capsys, monkeypatch):
    import picollm.serve.server as server

    served = {}
    monkeypatch.setattr(server, "run_server", lambda app, sock, access_log=True: served.update(app=app))
    assert exit_code(["serve", str(study), "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0, reachable from other machines" in err and "--api-key" in err
    assert "app" in served
    assert exit_code(["serve", str(study), "--port", "0"]) == 0
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# text helpers


def test_token_pieces_join_to_the_text_even_inside_characters(study):
    from picollm.checkpoint import load

    tokenizer = load(run_dirs(study)["lstm-pico"]).tokenizer
    text = "Ünïcødé: 日本語 and emoji 🐕‍🦺!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # a 512-token BPE splits these characters into bytes
    pieces = token_pieces(tokenizer, ids)
    assert "".join(pieces) == text and len(pieces) == len(ids)
    assert "" in pieces and all("\ufffd" not in p for p in pieces)
    decoder = PieceDecoder(tokenizer)
    assert "".join(decoder.push(t) for t in ids[:-1]) + decoder.push(ids[-1]) + decoder.flush() == text


def test_stop_scanner_holds_back_what_could_become_a_stop():
    scanner = StopScanner(["The end", "\n\n"])
    assert scanner.feed("Once upon") == (9, False)
    assert scanner.feed(" a time. Th") == (18, False)  # "Th" may start "The end": held back
    assert scanner.feed("e cat") == (25, False)  # it did not
    assert scanner.feed(". The en") == (27, False)
    assert scanner.feed("d, and more") == (27, True)
    assert scanner.text == "Once upon a time. The cat. "
    assert StopScanner([]).feed("abc") == (3, False)
