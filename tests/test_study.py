"""A tiny study end to end: real data preparation, training, evaluation, generation and the report
(seconds: a 300-token BPE vocabulary, a 16-token context and a dozen steps per run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_report import check_report

from picollm.cli import main
from picollm.study.results import load_results

TINY_STUDY = """
title: tiny study
default_budget: tiny
base:
  data: {num_stories: 120, split: [0.8, 0.1, 0.1], tokenizer: "bpe:300", num_proc: 1}
  model: {context_length: 16}
  train: {batch_size: 4, max_steps: 12, eval_interval: 3, eval_batches: 2, ckpt_interval: 6, log_interval: 3,
          lr: 3.0e-3, sample_tokens: 4, threads: 1}
budgets:
  tiny: {description: the test's own budget}
  tuned:
    description: lr auto and two seeds
    tune: true
    seeds: 2
    set: {train.lr_grid: [0.001, 0.01], train.max_steps: 8}
  tinier:
    description: even fewer steps
    set: {train.max_steps: 6}
    rules:
      - where: {family: lstm}
        set: {train.max_steps: 3}
    eval: {prompts: 2}
eval: {prompts: 3, prompt_tokens: 4, max_new_tokens: 8}
groups:
  size:
    title: sizes
    runs:
      - {name: "lstm-{size}", preset: "lstm-{size}", grid: {size: [pico]}}
      - {name: "kgram-{size}-{input}", preset: "kgram-{size}", grid: {size: [pico], model.input: [onehot, scaled]}}
      - {name: "transformer-{size}", preset: "transformer-{size}", grid: {size: [pico]}}
  kgram:
    runs:
      - {name: "kgram-pico-k{k}-{input}", preset: kgram-pico, grid: {model.k: [1, 3], model.input: [onehot, scaled]}}
  best:
    select: {groups: [size, kgram], where: {size: pico}, per: family}
  decoding:
    select: {groups: [size, kgram], where: {size: pico}, per: family}
    show: [prompt_samples, diversity]
  equal:
    show: [curves, params, results, diversity, samples]
    runs:
      - {name: lstm-matched, set: {model.family: lstm}, match: {target: 40000}, tags: {size: matched}}
      - {name: transformer-matched, set: {model.family: transformer}, match: {target: 40000}, tags: {size: matched}}
"""


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_STUDY, encoding="utf-8")
    return path


def _study(tiny_study: Path, out: Path, sample_path: Path, cache_dir: Path, *extra: str) -> int:
    # the override as two words: its value must not be taken for the optional STUDY.yaml
    return main(["study", "--data", str(sample_path), "--out", str(out), "--no-progress",
                 "--data.cache_dir", str(cache_dir), str(tiny_study), "--jobs", "1", *extra])


@pytest.mark.slow
def test_tiny_study_end_to_end(tiny_study, tmp_path, sample_path, cache_dir, capsys):
    out = tmp_path / "study"
    assert _study(tiny_study, out, sample_path, cache_dir) == 0
    err = capsys.readouterr().err
    # 8 distinct runs: kgram-pico-{onehot,scaled} (size) are kgram-pico-k3-* (kgram)
    record = json.loads((out / "study.json").read_text())
    assert len(record["runs"]) == 8
    assert err.count("[study] start") == 8 and err.count("[study] done") == 8
    for info in record["runs"].values():
        run = out / info["dir"]
        assert json.loads((run / "summary.json").read_text())["status"] == "finished"
        ev = json.loads((run / "eval.json").read_text())
        assert set(ev["diversity"]) == set(ev["samples"]) == {"greedy", "top-p 0.9", "top-p 1.0"}
        assert len(ev["samples"]["greedy"]) == 3 and len(ev["prompts"]) == 3
        assert ev["study_prompt"]["prompt"] == "Once upon a time, there was a very intelligent"
    # equal parameter counts through the solver
    results = load_results(out)
    equal = results.group("equal").entries
    assert [e.label for e in equal] == ["lstm-matched", "transformer-matched"]
    for e in equal:
        assert abs(e.get("params").mean - 40_000) / 40_000 <= 0.02
    # the report: every table, plot and sample present, images load, numbers finite
    index = out / "report" / "index.html"
    sections = check_report(index, ["size", "kgram", "best", "equal"])
    assert len(sections["group-equal"]["images"]) == 2  # curves + parameters
    dec = sections["group-decoding"]
    assert dec["images"] and [len(t) for t in dec["tables"]] == [10, 4]  # 3 models x 3 strategies; 3 models
    findings = sections["findings"]["tables"][0]
    assert len(findings) == 17 and all(r[1].split(" (")[0] in ("agrees", "disagrees", "within noise", "not checked",
                                                                "inconclusive") for r in findings[1:])
    # 12 steps of a 300-token vocabulary: most runs have not beaten the bigram of the real data yet
    record = json.loads((out / "study.json").read_text())
    baseline = next(iter(record["baselines"].values()))
    assert baseline["models"]["unigram"]["val"]["nll"] > baseline["models"][baseline["bigram"]]["val"]["nll"]
    assert any("did not train" in r[1] for r in findings[1:])

    # again: everything is reused, nothing trains
    assert _study(tiny_study, out, sample_path, cache_dir) == 0
    err = capsys.readouterr().err
    assert "8 of 8 runs are finished already" in err and "[study] start" not in err

    # an interrupted run resumes from its checkpoint; a lost eval.json is regenerated
    lstm = out / record["runs"][next(k for k, v in record["runs"].items() if v["label"] == "lstm-pico")]["dir"]
    (lstm / "summary.json").unlink()
    for name in ("final", "best"):
        import shutil

        shutil.rmtree(lstm / name)
    kgram = next(out / v["dir"] for v in record["runs"].values() if v["label"] == "kgram-pico-k1-scaled")
    (kgram / "eval.json").unlink()
    assert _study(tiny_study, out, sample_path, cache_dir) == 0
    err = capsys.readouterr().err
    assert "6 of 8 runs are finished already" in err and err.count("[study] done") == 2
    assert json.loads((lstm / "summary.json").read_text())["steps"] == 12
    assert (kgram / "eval.json").is_file()


def test_budget_seeds_only_and_dry_run(tiny_study, tmp_path, sample_path, cache_dir, capsys):
    out = tmp_path / "study"
    code = _study(tiny_study, out, sample_path, cache_dir, "--budget", "tinier", "--only", "best", "--seeds", "2",
                  "--dry-run")
    assert code == 0
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith(("lstm", "kgram", "transformer"))]
    # --only best brings size and kgram: 6 configurations x 2 seeds
    assert len(lines) == 12
    assert not (out / "study.json").exists()  # a dry run writes nothing
    lstm = [ln for ln in lines if ln.startswith("lstm-pico")]
    assert all(" 192 " in ln for ln in lstm)  # tinier: 3 steps of 4 x 16 tokens for the LSTM
    assert "distinct runs" in captured.out


def test_no_tune_plans_no_sweep_for_a_study_file_that_asks_for_lr_auto(tiny_study, tmp_path, sample_path,
                                                                        cache_dir, capsys):
    """`train.lr: auto` in the study file is tuned, even by a budget that does not tune, unless --no-tune:
    then no sweep is planned and the run trains at the rate the layers below the auto give (base: 3e-3)."""
    asks = tmp_path / "asks.yaml"
    asks.write_text(TINY_STUDY.replace("preset: kgram-pico, grid:", "preset: kgram-pico, set: {train.lr: auto}, grid:"),
                    encoding="utf-8")
    args = ("--only", "kgram-pico-k1-onehot", "--seeds", "1", "--dry-run")
    assert _study(asks, tmp_path / "a", sample_path, cache_dir, *args) == 0
    captured = capsys.readouterr()
    assert "lr sweeps for 1 models" in captured.err and "4 lr sweep runs (1 models x 4 rates" in captured.out
    run = next(ln for ln in captured.out.splitlines() if ln.startswith("kgram-pico-k1-onehot "))
    assert run.split()[3] == "auto"
    assert sum(ln.startswith("kgram-pico-k1-onehot lr ") for ln in captured.out.splitlines()) == 4
    # --no-tune: no sweep run, the numeric rate in the run's config and in the table, and a line saying so
    assert _study(asks, tmp_path / "b", sample_path, cache_dir, *args, "--no-tune") == 0
    captured = capsys.readouterr()
    assert "no lr tuning (--no-tune)" in captured.err
    assert "--no-tune: no lr sweep; the runs set to train.lr auto train at a fixed rate: at 0.003: " \
           "kgram-pico-k1-onehot" in captured.err
    jobs = [ln for ln in captured.out.splitlines() if ln.startswith("kgram-pico-k1-onehot")]
    assert len(jobs) == 1 and jobs[0].split()[3] == "0.003"
    assert "lr sweep runs" not in captured.out and "1 distinct runs" in captured.out


@pytest.mark.slow
def test_jobs_train_runs_in_parallel_processes_with_the_same_results(tiny_study, tmp_path, sample_path, cache_dir,
                                                                      capsys):
    args = ("--budget", "tinier", "--only", "size", "--no-report")
    assert _study(tiny_study, tmp_path / "one", sample_path, cache_dir, *args) == 0
    assert _study(tiny_study, tmp_path / "two", sample_path, cache_dir, *args, "--jobs", "2") == 0
    err = capsys.readouterr().err
    assert err.count("[study] done") == 8
    one = sorted((tmp_path / "one" / "runs").iterdir())
    two = sorted((tmp_path / "two" / "runs").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 4
    for a, b in zip(one, two, strict=True):
        sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
        assert sa["test"]["nll"] == pytest.approx(sb["test"]["nll"], abs=1e-6)
        ea, eb = (json.loads((p / "eval.json").read_text()) for p in (a, b))
        assert ea["samples"] == eb["samples"]


@pytest.mark.slow
def test_tuned_budget_sweeps_once_per_model_and_its_seeds_train_at_the_chosen_rate(tiny_study, tmp_path, sample_path,
                                                                                     cache_dir, capsys):
    out = tmp_path / "study"
    args = ("--budget", "tuned", "--only", "lstm-pico,kgram-pico-k1-onehot", "--no-report")
    # the dry run lists both seeds of each model and the sweep runs, each with an estimate
    assert _study(tiny_study, out, sample_path, cache_dir, *args, "--dry-run") == 0
    lines = capsys.readouterr().out.splitlines()
    seeds = [ln.split()[1] for ln in lines if ln.startswith(("lstm-pico ", "kgram-pico-k1-onehot ")) and " size" in ln
             or ln.startswith("kgram-pico-k1-onehot ") and " kgram " in ln]
    assert sorted(seeds) == ["0", "0", "1", "1"]
    sweep_rows = [ln for ln in lines if " lr sweep " in ln and "distinct runs" not in ln]
    assert len(sweep_rows) == 4 and all(ln.endswith("to train") and ln.split()[-3].endswith("s")
                                        for ln in sweep_rows)
    assert "4 lr sweep runs (2 models x 2 rates" in lines[-1]

    assert _study(tiny_study, out, sample_path, cache_dir, *args, "--jobs", "2") == 0
    capsys.readouterr()
    record = json.loads((out / "study.json").read_text())
    assert len(record["runs"]) == 4 and len(record["sweeps"]) == 2
    for key, sweep in record["sweeps"].items():
        runs = [record["runs"][rid] for rid in sweep["runs"]]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["sweep"] == key for r in runs)
        summaries = [json.loads((out / r["dir"] / "summary.json").read_text()) for r in runs]
        found = summaries[0]["lr_sweep"]
        rates = sorted(float(p.name[3:]) for p in (out / sweep["dir"] / f"f{found['length']:g}").iterdir())
        assert rates[:2] == [0.001, 0.01] or rates[1:] == [0.001, 0.01]  # + one beyond an edge
        chosen = found["chosen"]
        losses = {lr: loss for lr, loss in found["losses"]}
        assert chosen == min(losses, key=losses.get) and sorted(losses) == rates
        # the lengths tried: a quarter, then twice as long while no rate trained
        assert [r["length"] for r in found["rounds"]] == [0.25, 0.5, 1.0][:len(found["rounds"])]
        assert found["trained"] or found["length"] == 1.0
        assert [s["lr"] for s in summaries] == [chosen, chosen]  # both seeds at the rate of the one sweep
        config = yaml.safe_load((out / runs[1]["dir"] / "config.yaml").read_text())
        assert config["train"]["lr"] == chosen and config["train"]["seed"] == 1
    # again: nothing trains, no sweep runs
    assert _study(tiny_study, out, sample_path, cache_dir, *args, "--jobs", "2") == 0
    err = capsys.readouterr().err
    assert "4 of 4 runs are finished already" in err and "[study] start" not in err
    # the dry run counts the grid's rates and, apart, those run beyond it (an edge's next rate, a longer sweep)
    done = sum(1 for sweep in record["sweeps"].values() for p in (out / sweep["dir"]).glob("f*/lr-*")
               if (p / "lr_point.json").is_file())
    assert _study(tiny_study, out, sample_path, cache_dir, *args, "--dry-run") == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert f"{done} lr sweep runs (2 models x 2 rates of the grid" in last
    assert (f"and {done - 4} beyond it already run" in last) == (done > 4)
    # --no-tune: the budget's fixed rate, no sweep
    assert _study(tiny_study, out, sample_path, cache_dir, *args, "--no-tune", "--seeds", "1") == 0
    err = capsys.readouterr().err
    assert "no lr tuning" in err and "start 1/2 lr sweep" not in err and err.count("[study] done") == 2
    record = json.loads((out / "study.json").read_text())
    assert not record["sweeps"] and not record["tune"]
    assert {json.loads((out / r["dir"] / "summary.json").read_text())["lr"] for r in record["runs"].values()} \
        == {3e-3}
