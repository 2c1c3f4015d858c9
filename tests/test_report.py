"""The report and the findings, from made-up run logs (no training): the built-in study's plan with a
fake data preparation, and run directories written by the test with chosen numbers."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from picollm.study import plan as study_plan
from picollm.study.findings import AGREES, DISAGREES, NOISE, check_claims
from picollm.study.report import build_study_report
from picollm.study.results import load_results
from picollm.study.spec import load_study

VOCAB = 4096


# ---------------------------------------------------------------------------------------------
# made-up logs


def _fake_prepare(data_cfg, progress):  # noqa: ARG001 - the signature of plan._prepare
    tokenizer = SimpleNamespace(vocab_size=VOCAB, name="bpe:4096", eot_id=VOCAB - 1)
    return SimpleNamespace(tokenizer=tokenizer, num_tokens=lambda split: 465_000 if split == "train" else 25_000,
                           directory=Path("/cache/prepared/fake-data"))


def _split(nll: float, bpb: float) -> dict[str, float]:
    return {"nll": nll, "ppl": math.exp(nll), "bpb": bpb, "tokens": 25_000}


# made-up baselines of the fake data: a run above (5.0 + 6.0) / 2 = 5.5 nats did not train
FAKE_BASELINES = {"fake-data": {
    "format": 1, "vocab_size": VOCAB, "bigram": "bigram_interpolated", "data": "fake-data",
    "models": {"unigram": {"name": "unigram", "val": _split(6.0, 2.2), "test": _split(6.02, 2.21)},
               "bigram_add_k": {"name": "bigram (add-0.01)", "val": _split(5.1, 1.9), "test": _split(5.12, 1.91)},
               "bigram_interpolated": {"name": "bigram (interpolated, λ = 0.850)", "val": _split(5.0, 1.85),
                                       "test": _split(5.02, 1.86)}}}}


def original_numbers(run: study_plan.StudyRun) -> dict[str, Any]:
    """Numbers for which every claim of the original study holds."""
    t, m = run.tags, run.config["model"]
    family, size = t["family"], t.get("size")
    sizes = {"pico": 0, "tiny": 1, "small": 2, "base": 3, "matched": 1}
    s = sizes.get(size, 0)
    rate = (0.3, 0.5, 0.8, 1.0)[s]
    noise = 0.0
    if family == "lstm":
        loss = (4.0, 3.7, 3.4, 3.2)[s]
    elif family == "transformer":
        loss = (4.2, 3.9, 3.6, 3.3)[s]
        if m.get("norm", "pre") != "pre" or m.get("pos", "absolute") != "absolute":
            loss += 0.02 + 0.005 * ("post" == m.get("norm")) + 0.01 * (m.get("pos") == "nope")
    else:
        k, onehot = m.get("k", 3), m.get("input") == "onehot"
        if size == "pico":
            loss = {1: 4.9, 3: 4.5, 5: 4.3}[k]
            if not onehot:
                loss += {1: 0.05, 3: 0.2, 5: 0.3}[k]
        else:
            loss = (4.5, 4.3, 4.2, 4.1)[s] + (0 if onehot else (0.2, 0.15, 0.05, 0.02)[s])
        noise = 0.04 if onehot else 0.004
    diversity = {"lstm": 0.50, "transformer": 0.55, "kgram": 0.70}[family]
    if family == "transformer":
        diversity += {"absolute": 0.05, "rope": 0.0, "nope": -0.05}[m.get("pos", "absolute")]
    return {"loss": loss, "rate": rate, "noise": noise, "diversity": diversity}


def kgram_wins(run: study_plan.StudyRun) -> dict[str, Any]:
    """As the original, but every k-gram MLP is far better than the other families."""
    numbers = original_numbers(run)
    if run.tags["family"] == "kgram":
        numbers["loss"] -= 1.5
        numbers["diversity"] = 0.30
    return numbers


def write_fake_run(run: study_plan.StudyRun, numbers: dict[str, Any], evals: int = 12,
                   strategies: tuple[str, ...] = ("greedy", "top-p 0.9", "top-p 1.0")) -> None:
    d = run.directory
    d.mkdir(parents=True, exist_ok=True)
    seed = run.config["train"]["seed"]
    loss = numbers["loss"] + 0.002 * seed
    (d / "config.yaml").write_text(yaml.safe_dump(run.config), encoding="utf-8")
    rows = []
    for i in range(1, evals + 1):
        tokens = 20_000 * i
        val = loss + (math.log(VOCAB) - loss) * math.exp(-numbers["rate"] * i) + numbers["noise"] * (-1) ** i
        rows.append({"kind": "train", "step": 20 * i, "tokens": tokens, "epoch": tokens / 465_000, "lr": 1e-3,
                     "train_loss": val + 0.01, "train_ppl": math.exp(val), "grad_norm": 1.0,
                     "tokens_per_s": 10_000.0, "elapsed": 2.0 * i})
        rows.append({"kind": "eval", "step": 20 * i, "tokens": tokens, "epoch": tokens / 465_000,
                     "val_loss": val, "val_ppl": math.exp(val), "val_bpb": val / math.log(2) / 4,
                     "elapsed": 2.0 * i, "sample": "Once upon a time"})
    for fraction, i in ((0.25, evals // 4), (0.5, evals // 2)):  # the full-split points during training
        val = loss + (math.log(VOCAB) - loss) * math.exp(-numbers["rate"] * i) + numbers.get("early", 0.0)
        rows.append({"kind": "eval_full", "step": 20 * i, "tokens": 20_000 * i, "fraction": fraction,
                     "val_loss": val, "val_bpb": val / math.log(2) / 4})
    rows.sort(key=lambda r: r["step"])
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    final = loss + (math.log(VOCAB) - loss) * math.exp(-numbers["rate"] * evals) + numbers["noise"] * (-1) ** evals

    def split(nll: float) -> dict[str, float]:
        return {"nll": nll, "ppl": math.exp(nll), "bpb": nll / math.log(2) / 4.1, "tokens": 25_000,
                "bytes": 102_500}

    summary = {"status": "finished", "family": run.tags["family"], "num_parameters": 300_000 + 1000 * len(d.name),
               "num_parameters_non_embedding": 40_000, "tokens_seen": 20_000 * evals, "steps": 20 * evals,
               "epochs": 20_000 * evals / 465_000, "wall_time_s": 2.0 * evals, "tokens_per_s": 10_000.0,
               "peak_memory_mb": 300.0, "unigram_entropy": 6.0, "best_val_loss": min(r["val_loss"] for r in rows
                                                                                       if r["kind"] == "eval"),
               "train": split(final - 0.02), "val": split(final), "test": split(final + 0.01),
               "tokenizer": "bpe:4096", "vocab_size": VOCAB, "context_length": 64, "lr": 5e-3}
    if run.config["train"]["lr"] == "auto":  # the sweep that chose the rate (its seeds share it)
        summary["lr"] = numbers.get("lr", 3e-3)
        summary["lr_sweep"] = {"dir": run.config["train"]["lr_sweep_dir"], "grid": [1e-3, 3e-3, 1e-2, 3e-2],
                               "fraction": 0.25, "seed": 0, "steps": 100, "wall_time_s": 8.0,
                               "chosen": summary["lr"], "at_edge": summary["lr"] == 3e-2,
                               "losses": [[1e-3, loss + 0.2], [3e-3, loss + 0.1], [1e-2, loss + 0.15],
                                          [3e-2, None if numbers.get("diverges") else loss + 0.3]]}
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    base = numbers["diversity"]
    per_strategy = {"greedy": (base - 0.3, 0.40), "top-p 0.9": (base, 0.10), "top-p 1.0": (base + 0.1, 0.05)}
    diversity, samples = {}, {}
    for name in strategies:
        score, repetition = per_strategy[name]
        diversity[name] = {**{f"word_distinct_{n}": min(1.0, score + 0.04 * (n - 3)) for n in range(1, 6)},
                           "repetition_4": repetition, "texts": 10, "words": 200, "mean_words": 20.0}
        if name == "greedy" and numbers.get("short_greedy"):  # every continuation under 4 words
            diversity[name].update({"word_distinct_4": None, "word_distinct_5": None, "repetition_4": None})
        samples[name] = [f"{name} story {i} of {run.label}: the cat sat." for i in range(10)]
    record = {"settings": {}, "prompts": [f"Once upon a time {i}" for i in range(10)], "diversity": diversity,
              "samples": samples,
              "study_prompt": {"prompt": "Once upon a time, there was a very intelligent",
                               "samples": {n: [f" dog named {n}."] for n in strategies}}}
    (d / "eval.json").write_text(json.dumps(record), encoding="utf-8")


def make_fake_study(root: Path, numbers, seeds: int = 1, monkeypatch=None, **plan_args) -> Path:
    monkeypatch.setattr(study_plan, "_prepare", _fake_prepare)
    plan = study_plan.plan_study(load_study(), root, budget="quick", seeds=seeds, progress=False, **plan_args)
    plan.baselines = FAKE_BASELINES
    study_plan.write_study_json(plan)
    for run in plan.runs.values():
        write_fake_run(run, numbers(run))
    return root


# ---------------------------------------------------------------------------------------------
# reading the rendered page


class _Page(HTMLParser):
    """Sections (by id) with their images and tables (rows of cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, list]] = {}
        self.current: str | None = None
        self.cell: list[str] | None = None
        self.row: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.current = a["id"]
            self.sections[self.current] = {"images": [], "tables": []}
        elif self.current and tag == "img":
            self.sections[self.current]["images"].append(a["src"])
        elif self.current and tag == "table":
            self.sections[self.current]["tables"].append([])
        elif self.current and tag == "tr":
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None and self.current:
            self.sections[self.current]["tables"][-1].append(self.row)
            self.row = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def read_page(index: Path) -> dict[str, dict[str, list]]:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page.sections


NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?[KM]?( ± [\d,]+(\.\d+)?[KM]?)?$")


def check_report(index: Path, groups: list[str], decoding: str = "decoding") -> dict[str, dict[str, list]]:
    """Every group has its plot, tables and samples; every image loads; every number is finite."""
    import matplotlib.image

    sections = read_page(index)
    text = index.read_text(encoding="utf-8")
    assert "nan" not in re.findall(r"\bnan\b|\binf\b", text.lower())
    for name in groups:
        sec = sections[f"group-{name}"]
        assert sec["images"], f"group {name} has no plot"
        assert len(sec["tables"]) >= 2, f"group {name} lacks tables"
        for table in sec["tables"]:
            assert len(table) >= 2, f"group {name} has an empty table"
            for row in table[1:]:
                if row[0].endswith("(baseline)"):  # the unigram and bigram rows: losses only
                    assert all(row[table[0].index(c)] != "—" for c in ("val NLL", "test NLL", "val bpb"))
                    continue
                assert all(cell and cell != "—" for cell in row), f"group {name}: empty cell in {row}"
    for sec in sections.values():
        for src in sec["images"]:
            assert src.startswith("data:image/png;base64,")
            image = matplotlib.image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
            assert image.shape[0] > 100 and image.shape[1] > 100
        for table in sec["tables"]:
            for row in table[1:]:
                for cell in row:
                    if NUMBER.match(cell):
                        value = float(cell.split(" ± ")[0].replace(",", "").rstrip("KM"))
                        assert math.isfinite(value)
    md = index.with_name("report.md").read_text(encoding="utf-8")
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert pngs and all((index.parent / p).is_file() for p in pngs)
    return sections


def verdicts(results) -> dict[str, str]:
    return {f.claim: f.verdict for f in check_claims(results)}


# ---------------------------------------------------------------------------------------------
# tests


def test_original_numbers_agree_with_every_claim(tmp_path, monkeypatch):
    study = make_fake_study(tmp_path / "study", original_numbers, monkeypatch=monkeypatch)
    found = verdicts(load_results(study))
    assert len(found) == 16
    assert all(v == AGREES for v in found.values()), {c: v for c, v in found.items() if v != AGREES}


def test_kgram_winning_changes_the_findings(tmp_path, monkeypatch):
    study = make_fake_study(tmp_path / "study", kgram_wins, monkeypatch=monkeypatch)
    results = load_results(study)
    best = {e.family: e for e in results.group("best").entries}
    assert best["kgram"].get("test_nll").mean < best["lstm"].get("test_nll").mean
    found = verdicts(results)
    order = next(c for c in found if c.startswith("Among the pico models the LSTM"))
    assert found[order] == DISAGREES
    richest = next(c for c in found if "most diverse text" in c)
    assert found[richest] == DISAGREES
    # what does not involve other families is unchanged
    assert found["Raising K (1 → 3 → 5) lowers validation loss."] == AGREES
    assert found["Greedy decoding repeats phrases most."] == AGREES
    # and the report says so
    index = build_study_report(study)
    rows = read_page(index)["findings"]["tables"][0]
    assert [r[1] for r in rows if r[0] == order] == [DISAGREES]


def test_report_from_logs_has_every_section(tmp_path, monkeypatch):
    study = make_fake_study(tmp_path / "study", original_numbers, monkeypatch=monkeypatch)
    index = build_study_report(study)
    assert index == study / "report" / "index.html"
    sections = check_report(index, ["size", "kgram", "transformer", "best", "equal"])
    # the decoding group: a diversity figure, the diversity table and the study prompt's continuations
    dec = sections["group-decoding"]
    assert dec["images"] and len(dec["tables"]) == 2
    prompt_rows = dec["tables"][1]
    assert prompt_rows[0] == ["model", "greedy", "top-p 0.9", "top-p 1.0"]
    assert {r[0].split(" [")[0] for r in prompt_rows[1:]} == {"lstm-pico", "transformer-pico", "kgram-pico-k5-onehot"}
    # the budget section states what quick changed
    budget_rows = sections["budget"]["tables"][0]
    changed = {r[0]: (r[1], r[2]) for r in budget_rows[1:] if r[3] == "all runs"}
    assert changed["data.tokenizer"] == ("gpt2", "bpe:4096")
    assert changed["model.context_length"] == ("256", "64")
    assert changed["data.split"] == ("0.98/0.01/0.01", "0.9/0.05/0.05")
    assert changed["train.max_tokens"] == ("—", "409,600")
    assert changed["data.num_stories"] == ("1,000,000", "2,317")
    # identical runs are shared: transformer-pico (size) is transformer-pico-pre-absolute (transformer)
    record = json.loads((study / "study.json").read_text())
    dirs = {e["label"]: e["runs"] for g in record["groups"] for e in g["entries"]}
    assert dirs["transformer-pico"] == dirs["transformer-pico-pre-absolute"]
    assert dirs["kgram-pico-onehot"] == dirs["kgram-pico-k3-onehot"]


def test_a_no_tune_report_says_which_fixed_rate_the_runs_trained_at(tmp_path, monkeypatch):
    # --train.lr auto --no-tune: every run asked for auto, none was tuned, all trained at quick's 5e-3
    study = make_fake_study(tmp_path / "study", original_numbers, monkeypatch=monkeypatch,
                            overrides={"train.lr": "auto"}, tune=False)
    index = build_study_report(study)
    sections = read_page(index)
    md = (study / "report" / "report.md").read_text()
    assert "learning-rates" not in sections and "chosen per model by an lr sweep" not in md
    lr_row = next(r for r in sections["budget"]["tables"][0][1:] if r[0] == "train.lr")
    assert lr_row == ["train.lr", "0.0003", "0.005", "all runs (--no-tune: no lr sweep)"]
    assert ("Learning rate: not tuned (--no-tune): no lr sweep ran, and every run trained at a fixed peak rate "
            "(0.005; the lr column") in md
    assert "under --no-tune they trained at the fixed rate instead: 0.005 for lstm-pico, lstm-tiny, " in md
    rates = {r[0]: r[1] for r in _table(sections, "group-size")[1:] if not r[0].endswith("(baseline)")}
    assert len(rates) == 12 and set(rates.values()) == {"0.005"}  # the results tables' lr column


def test_seeds_give_mean_and_std_and_noise_verdicts(tmp_path, monkeypatch):
    def close_calls(run):
        numbers = original_numbers(run)
        # pre-norm + absolute barely better than the rest: 0.001 nats, less than the seeds' spread
        if run.tags["family"] == "transformer" and run.tags.get("size") == "pico":
            numbers["loss"] = 4.2 + (0.001 if run.config["model"].get("pos", "absolute") != "absolute"
                                     or run.config["model"].get("norm", "pre") != "pre" else 0.0)
            numbers["loss"] += 0.05 * run.config["train"]["seed"] * (1 if run.config["model"].get("pos") == "rope"
                                                                     else -1)
        return numbers

    study = make_fake_study(tmp_path / "study", close_calls, seeds=2, monkeypatch=monkeypatch)
    results = load_results(study)
    entry = results.group("size").entries[0]
    assert len(entry.runs) == 2 and entry.get("test_nll").std is not None
    found = verdicts(results)
    assert found["Pre-norm with absolute positions gives the lowest perplexity."] == NOISE
    index = build_study_report(study)
    rows = read_page(index)["group-size"]["tables"][0]
    assert " ± " in rows[1][rows[0].index("test NLL")]


def test_one_seed_uses_the_tolerance(tmp_path, monkeypatch):
    def tiny_gap(run):
        numbers = original_numbers(run)
        if run.tags["family"] == "kgram" and run.tags.get("size") in ("pico", "tiny") and \
                run.config["model"].get("k", 3) == 3:
            numbers["loss"] = 4.5 + (0.004 if run.config["model"]["input"] == "scaled" else 0.0)
            numbers["noise"] = 0.0
        return numbers

    study = make_fake_study(tmp_path / "study", tiny_gap, monkeypatch=monkeypatch)
    found = verdicts(load_results(study))
    assert found["One-hot inputs give lower test perplexity than scaled embeddings."] == NOISE


def test_report_command_rebuilds_from_logs_and_compare_takes_any_runs(tmp_path, monkeypatch):
    from picollm.cli import main

    study = make_fake_study(tmp_path / "study", original_numbers, monkeypatch=monkeypatch)
    assert main(["report", str(study), "--out", str(tmp_path / "rebuilt")]) == 0
    assert (tmp_path / "rebuilt" / "index.html").is_file() and (tmp_path / "rebuilt" / "report.md").is_file()
    runs = sorted(p for p in (study / "runs").iterdir() if p.name.startswith(("lstm-", "transformer-pico-")))
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    sections = read_page(tmp_path / "cmp" / "index.html")
    group = sections["group-compare"]
    assert group["images"] and len(group["tables"][0]) == len(runs) + 1
    assert "findings" not in sections


def test_report_of_a_missing_study_is_a_user_error(tmp_path):
    from picollm.cli import main

    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.parametrize("missing", ["summary.json", "eval.json"])
def test_unfinished_runs_are_reported_not_crashed_on(tmp_path, monkeypatch, missing):
    study = make_fake_study(tmp_path / "study", original_numbers, monkeypatch=monkeypatch)
    victim = next((study / "runs").glob("lstm-tiny-*"))
    (victim / missing).unlink()
    index = build_study_report(study)
    text = index.read_text(encoding="utf-8")
    assert "lstm-tiny" in text
    if missing == "summary.json":
        assert "1 of 1 runs not finished" in text


def _table(sections: dict, section: str, index: int = 0) -> list[list[str]]:
    return sections[section]["tables"][index]


def _finding(sections: dict, claim_start: str) -> list[str]:
    return next(r for r in _table(sections, "findings") if r[0].startswith(claim_start))


@pytest.mark.slow
def test_a_run_that_did_not_train_makes_its_checks_inconclusive(tmp_path, monkeypatch):
    def lstm_pico_stuck(run):
        numbers = original_numbers(run)
        if run.tags["family"] == "lstm" and run.tags.get("size") == "pico":
            numbers["loss"] = 5.8  # above (unigram 6.0 + bigram 5.0) / 2 = 5.5 on validation NLL
        return numbers

    study = make_fake_study(tmp_path / "study", lstm_pico_stuck, monkeypatch=monkeypatch)
    results = load_results(study)
    found = {f.claim: f for f in check_claims(results)}
    larger = found["Larger LSTMs converge quicker and reach lower test perplexity."]
    assert larger.verdict == "inconclusive" and larger.shown == "inconclusive (lstm-pico did not train)"
    # tiny vs small still compares two runs that trained: their checks keep their verdicts
    assert [c.verdict for c in larger.checks] == ["inconclusive", "inconclusive", AGREES, AGREES]
    order = next(f for c, f in found.items() if c.startswith("Among the pico models the LSTM"))
    assert order.verdict == "inconclusive"
    assert found["Raising K (1 → 3 → 5) lowers validation loss."].verdict == AGREES  # no LSTM in it
    sections = read_page(build_study_report(study))
    row = _finding(sections, "Larger LSTMs")
    assert row[1] == "inconclusive (lstm-pico did not train)"
    # 5: sizes of the LSTM, the pico order and three claims about the best picos' text (lstm-pico among them)
    assert "5 inconclusive (a run did not train)" in (study / "report" / "report.md").read_text()
    greedy = found["Greedy decoding repeats phrases most."]
    assert {c.verdict for c in greedy.checks if c.text.startswith("lstm-pico")} == {"inconclusive"}
    assert {c.verdict for c in greedy.checks if not c.text.startswith("lstm-pico")} == {AGREES}
    size = _table(sections, "group-size")
    assert [r[0] for r in size if r[0].startswith("lstm-pico")] == ["lstm-pico — did not train"]
    runs = _table(sections, "runs")
    assert [r[-1] for r in runs if r[0] == "lstm-pico"] == ["finished, did not train"]


@pytest.mark.slow
def test_checks_between_runs_below_the_bigram_say_so(tmp_path, monkeypatch):
    def weak_k1(run):
        numbers = original_numbers(run)
        if run.tags["family"] == "kgram" and run.config["model"].get("k") == 1:
            numbers["loss"] = 5.2 + (0.05 if run.config["model"]["input"] == "scaled" else 0.0)  # trained, < bigram
        return numbers

    study = make_fake_study(tmp_path / "study", weak_k1, monkeypatch=monkeypatch)
    found = {f.claim: f for f in check_claims(load_results(study))}
    smoother = found["Scaled-embedding curves are smoother than one-hot curves."]
    k1 = [c for c in smoother.checks if "k1" in c.text]
    assert len(k1) == 1 and k1[0].note == "both below the bigram baseline" and k1[0].verdict == AGREES
    assert "both below the bigram baseline" in k1[0].evidence
    assert all(not c.note for c in smoother.checks if "k1" not in c.text)
    sections = read_page(build_study_report(study))
    assert "1 comparisons between runs that are all below the bigram baseline" in \
        (study / "report" / "report.md").read_text()
    margins = {r[0]: r[_table(sections, "group-kgram")[0].index("val NLL − bigram")]
               for r in _table(sections, "group-kgram")[1:]}
    assert margins["kgram-pico-k1-onehot"].startswith("+") and margins["kgram-pico-k5-onehot"].startswith("-")


@pytest.mark.slow
def test_verdicts_during_training_and_unsettled_claims(tmp_path, monkeypatch):
    def tiny_late(run):
        numbers = original_numbers(run)
        if run.tags["family"] == "transformer" and run.tags.get("size") == "tiny":
            numbers["early"] = 1.5  # worse than the pico at 25% and 50% of the run, better at the end
        return numbers

    study = make_fake_study(tmp_path / "study", tiny_late, monkeypatch=monkeypatch)
    found = {f.claim: f for f in check_claims(load_results(study))}
    larger = found["Larger Transformers converge quicker and reach lower test perplexity."]
    assert larger.verdict == AGREES and larger.trend == [DISAGREES, DISAGREES, AGREES] and not larger.settled
    first = larger.checks[0]
    assert first.trend == [DISAGREES, DISAGREES, AGREES]
    assert "during training: disagrees → disagrees → agrees" in first.evidence
    assert found["Larger LSTMs converge quicker and reach lower test perplexity."].trend == [AGREES] * 3
    assert found["Greedy decoding repeats phrases most."].trend == []  # not a loss: no trend
    row = _finding(read_page(build_study_report(study)), "Larger Transformers")
    assert row[1] == "agrees (not settled at this budget)" and row[2] == "disagrees → disagrees → agrees"


@pytest.mark.slow
def test_learning_rates_equal_compute_and_single_seed_notice(tmp_path, monkeypatch):
    def edge(run):
        numbers = original_numbers(run)
        if run.tags["family"] == "lstm" and run.tags.get("size") == "tiny":
            numbers["lr"] = 3e-2  # the sweep's best rate is the grid's top: "(edge)"
        if run.tags["family"] == "lstm" and run.tags.get("size") == "pico":
            numbers["short_greedy"] = True
        return numbers

    study = make_fake_study(tmp_path / "study", edge, monkeypatch=monkeypatch)
    index = build_study_report(study)
    sections = read_page(index)
    md = (study / "report" / "report.md").read_text()
    assert md.index("Verdicts are single-seed") < md.index("## Contents")
    # the lr sweeps: a plot and a table with every model's losses and chosen rate
    lrs = sections["learning-rates"]
    assert len(lrs["images"]) == 1
    assert "peak rate (dotted: the unigram and bigram baselines)" in md  # one data: its baselines are drawn
    chosen = {r[0]: r[-1] for r in lrs["tables"][0][1:]}
    assert len(chosen) == 23 and chosen["lstm-tiny"] == "0.03 (edge)" and chosen["lstm-pico"] == "0.003"
    assert "lr at grid edge: lstm-tiny" in md
    size = _table(sections, "group-size")
    assert {r[0]: r[1] for r in size[1:]}["lstm-tiny"] == "0.03 (edge)"
    # equal compute in the best and equal groups: a FLOPs plot and the sentence
    for group in ("group-best", "group-equal"):
        assert "At equal training compute: at " in md.split(f'id="{group}"')[1].split("<a id=")[0]
    assert len(sections["group-equal"]["images"]) == 3  # curves, FLOPs, parameters
    # undefined distinct-n is n/a, left out of the diversity score
    diversity = _table(sections, "group-size", 1)
    greedy = next(r for r in diversity if r[0] == "lstm-pico" and r[1] == "greedy")
    assert greedy[5:8] == ["n/a", "n/a", "n/a"]
    assert float(greedy[8]) == pytest.approx((0.12 + 0.16 + 0.20) / 3)
    # with two seeds the notice is gone
    two = make_fake_study(tmp_path / "two", original_numbers, seeds=2, monkeypatch=monkeypatch)
    build_study_report(two)
    assert "Verdicts are single-seed" not in (two / "report" / "report.md").read_text()
