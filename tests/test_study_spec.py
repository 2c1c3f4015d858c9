"""The study file: schema validation, grid expansion, budgets, run identity (no data, no training)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from picollm.config import RunConfig, from_dict
from picollm.errors import UserError
from picollm.study import plan as study_plan
from picollm.study.spec import expand, load_study, parse_study


def _spec(text: str):
    return parse_study(yaml.safe_load(text), source="test")


MINIMAL = """
default_budget: b
base: {train: {lr: 1.0e-3}, data: {tokenizer: "bpe:300"}}
budgets:
  b:
    set: {train.max_steps: 5}
    rules: [{where: {family: lstm}, set: {train.max_steps: 2}}]
groups:
  g:
    runs:
      - {name: "kgram-k{k}-{input}", preset: kgram-pico, grid: {model.k: [1, 2], model.input: [onehot, scaled]}}
      - {preset: "lstm-{size}", grid: {size: [pico, tiny]}}
  h:
    select: {groups: [g]}
"""


def test_the_builtin_study_is_valid_and_has_every_group():
    spec = load_study()
    assert list(spec.groups) == ["size", "kgram", "transformer", "best", "decoding", "equal"]
    assert set(spec.budgets) == {"quick", "full"} and spec.default_budget == "quick"
    groups = {g.spec.name: g for g in expand(spec, "quick", seeds=1)}
    assert len(groups["size"].runs) == 12 and len(groups["kgram"].runs) == 6
    assert len(groups["transformer"].runs) == 6 and len(groups["equal"].runs) == 3
    assert not groups["best"].runs and groups["best"].spec.select is not None
    full = {g.spec.name: g for g in expand(spec, "full")}
    cfg = full["size"].runs[0].config_dict()
    assert cfg["data"]["tokenizer"] == "gpt2" and cfg["data"]["split"] == [0.98, 0.01, 0.01]
    assert cfg["train"]["epochs"] == 5 and cfg["train"]["lr"] == 3e-4 and cfg["train"]["batch_size"] == 64
    assert cfg["train"].get("max_tokens") is None and cfg["data"]["num_stories"] == 1_000_000


def test_quick_tunes_with_two_seeds_and_no_tune_or_full_leave_the_rate_alone():
    spec = load_study()
    quick = [r for g in expand(spec, "quick") for r in g.runs]
    assert sorted({r.seed for r in quick}) == [0, 1]  # the budget's seeds
    assert {r.config_dict()["train"]["lr"] for r in quick} == {"auto"}
    assert quick[0].config_dict()["train"]["lr_grid"] == [1e-3, 3e-3, 1e-2, 3e-2]
    # --no-tune: the budget's fixed rate; the full budget: the original 3e-4, no sweep
    fixed = [r for g in expand(spec, "quick", seeds=1, tune=False) for r in g.runs]
    assert {r.config_dict()["train"]["lr"] for r in fixed} == {5e-3} and {r.seed for r in fixed} == {0}
    full = [r for g in expand(spec, "full") for r in g.runs]
    assert {r.config_dict()["train"]["lr"] for r in full} == {3e-4} and {r.seed for r in full} == {0}
    # a rate set on the command line (or by a block or rule) is never tuned
    cli = [r for g in expand(spec, "quick", cli={"train.lr": 2e-3}) for r in g.runs]
    assert {r.config_dict()["train"]["lr"] for r in cli} == {2e-3}


def test_no_tune_leaves_plans_without_sweeps_and_their_run_ids_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(study_plan, "_prepare", _fake_prepare)
    spec = load_study()
    tuned = study_plan.plan_study(spec, tmp_path, only=["kgram-pico-k1-*"], progress=False)
    assert len(tuned.runs) == 4 and len(tuned.sweeps) == 2  # 2 models x 2 seeds share 2 sweeps
    for sweep in tuned.sweeps.values():
        seeds = [tuned.runs[rid] for rid in sweep.runs]
        assert [r.seed for r in seeds] == [0, 1]
        assert sweep.key == f"{seeds[0].directory.name}"  # named after the first seed's run
        for run in seeds:
            t = run.config["train"]
            assert t["lr"] == "auto" and t["lr_sweep_seed"] == 0 and t["lr_sweep_dir"] == str(sweep.directory)
    fixed = study_plan.plan_study(spec, tmp_path, only=["kgram-pico-k1-*"], seeds=1, tune=False, progress=False)
    assert not fixed.sweeps and {r.config["train"]["lr"] for r in fixed.runs.values()} == {5e-3}
    # a fixed rate hashes as before the sweep settings existed: changing them changes no id
    run = next(iter(fixed.runs.values()))
    cfg = from_dict(RunConfig, run.config)
    cfg.train.lr_grid, cfg.train.lr_sweep_fraction, cfg.train.full_val_at = [1.0, 2.0], 0.5, []
    assert study_plan.run_identity(cfg) == run.run_id
    # an lr auto run hashes its grid, not a rate
    auto = from_dict(RunConfig, next(iter(tuned.runs.values())).config)
    before = study_plan.run_identity(auto)
    auto.train.lr_grid = [1e-3, 1e-2]
    assert study_plan.run_identity(auto) != before


ASKS_FOR_AUTO = """
default_budget: fixed
base: {train: {lr: 1.0e-3}, data: {tokenizer: "bpe:300"}}
budgets:
  fixed:
    set: {train.lr: 2.0e-3}
    rules: [{where: {family: lstm}, set: {train.lr: auto}}]
  sweeps:
    tune: true
    set: {train.lr: 5.0e-3}
groups:
  g:
    runs:
      - {name: "kgram-{input}", preset: kgram-pico, set: {train.lr: auto}, grid: {model.input: [onehot, scaled]}}
      - {name: "transformer-grid-{lr}", preset: transformer-pico, grid: {train.lr: [auto, 4.0e-3]}}
      - {name: "lstm", preset: lstm-pico}
      - {name: "transformer", preset: transformer-pico}
"""


def test_no_tune_turns_every_auto_into_the_fixed_rate_and_plans_no_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(study_plan, "_prepare", _fake_prepare)
    spec = _spec(ASKS_FOR_AUTO)
    # without --no-tune the study file's autos are tuned, even in a budget that does not tune
    tuned = study_plan.plan_study(spec, tmp_path / "a", progress=False)
    assert {label: r.config["train"]["lr"] for r in tuned.runs.values() for _, label in r.uses} == {
        "kgram-onehot": "auto", "kgram-scaled": "auto", "transformer-grid-auto": "auto",
        "transformer-grid-0.004": 4e-3, "lstm": "auto", "transformer": 2e-3}
    assert len(tuned.sweeps) == 4 and not tuned.untuned and not tuned.no_tune
    # --no-tune: an auto from a block, a grid or a rule is the rate the layers below it give (the budget's)
    fixed = study_plan.plan_study(spec, tmp_path / "b", tune=False, progress=False)
    rates = {label: r.config["train"]["lr"] for r in fixed.runs.values() for _, label in r.uses}
    assert rates == {"kgram-onehot": 2e-3, "kgram-scaled": 2e-3, "transformer-grid-auto": 2e-3,
                     "transformer-grid-0.004": 4e-3, "lstm": 2e-3, "transformer": 2e-3}
    assert len(fixed.runs) == 5  # the grid's untuned auto is the plain transformer's run: one directory
    assert not fixed.sweeps and all(r.sweep is None for r in fixed.runs.values())
    assert fixed.untuned == {"kgram-onehot": 2e-3, "kgram-scaled": 2e-3, "transformer-grid-auto": 2e-3,
                             "lstm": 2e-3}
    record = study_plan.study_record(fixed)
    assert record["no_tune"] is True and record["tune"] is False and record["untuned"] == fixed.untuned
    # --train.lr auto on the command line: the same; a tuning budget: its documented fixed rate
    cli = study_plan.plan_study(spec, tmp_path / "c", budget="sweeps", overrides={"train.lr": "auto"}, tune=False,
                                progress=False)
    assert not cli.sweeps and {r.config["train"]["lr"] for r in cli.runs.values()} == {5e-3, 4e-3}
    assert cli.untuned["transformer"] == 5e-3 and "transformer-grid-0.004" in cli.untuned
    row = next(r for r in cli.budget_changes if r["key"] == "train.lr")
    assert row["budget"] == 5e-3 and row["where"] == "all runs (--no-tune: no lr sweep)"
    tuning_row = next(r for r in study_plan.budget_changes(spec, "sweeps") if r["key"] == "train.lr")
    assert tuning_row["budget"] == "auto: an lr sweep per model (--no-tune: 0.005)"
    # auto everywhere and no number anywhere: the trainer's default rate
    bare = _spec(ASKS_FOR_AUTO.replace("lr: 1.0e-3", "lr: auto").replace("set: {train.lr: 2.0e-3}", "set: {}"))
    runs = [r for g in expand(bare, "fixed", tune=False) for r in g.runs]
    assert {r.label: r.config_dict()["train"]["lr"] for r in runs}["lstm"] == RunConfig().train.lr


def test_grid_over_dotted_keys_labels_tags_and_budget_rules():
    groups = expand(_spec(MINIMAL), "b")
    runs = groups[0].runs
    assert [r.label for r in runs] == ["kgram-k1-onehot", "kgram-k1-scaled", "kgram-k2-onehot", "kgram-k2-scaled",
                                       "lstm-pico", "lstm-tiny"]
    first = runs[0].config_dict()
    assert first["model"]["k"] == 1 and first["model"]["input"] == "onehot" and first["model"]["embed_dim"] == 32
    assert first["train"] == {"lr": 1e-3, "max_steps": 5, "seed": 0}
    assert runs[0].tags == {"size": "pico", "family": "kgram", "k": 1, "input": "onehot"}
    assert runs[4].config_dict()["train"]["max_steps"] == 2  # the rule for family=lstm
    assert runs[5].tags["size"] == "tiny"


def test_seeds_only_and_command_line_overrides():
    spec = _spec(MINIMAL)
    groups = expand(spec, "b", seeds=3, cli={"train.lr": 0.5})
    seeds = [r.seed for r in groups[0].runs if r.label == "lstm-pico"]
    assert seeds == [0, 1, 2]
    assert all(r.config_dict()["train"]["lr"] == 0.5 for r in groups[0].runs)
    assert [g.spec.name for g in expand(spec, "b", only=["h"])] == ["g", "h"]  # h selects from g
    with pytest.raises(UserError, match="nope names no group and no run"):
        expand(spec, "b", only=["nope"])
    by_label = expand(spec, "b", only=["kgram-k1-*", "lstm-tiny"])
    assert [r.label for r in by_label[0].runs] == ["kgram-k1-onehot", "kgram-k1-scaled", "lstm-tiny"]
    with pytest.raises(UserError, match="unknown budget 'huge'"):
        expand(spec, "huge")


@pytest.mark.parametrize("text, message", [
    ("groups: {g: {runs: [{preset: lstm-pico, colour: red}]}}", "colour"),
    ("groups: {g: {runs: [{preset: lstm-pico, grid: {model.k: 3}}]}}", "non-empty list"),
    ("groups: {g: {runs: [{name: '{nope}', preset: lstm-pico}]}}", "unknown placeholder"),
    ("groups: {g: {select: {groups: [x]}}}", "selects from x"),
    ("groups: {g: {}}", "either 'runs'"),
    ("groups: {g: {runs: [{preset: lstm-pico, set: {optim.lr: 1}}]}}", "start with one of"),
    ("groups: {g: {runs: [{preset: lstm-pico}]}}\neval: {diversity_strategy: beam}", "diversity_strategy"),
    ("groups: {g: {runs: [{preset: lstm-pico}], show: [everything]}}", "unknown section"),
    ("groups: {g: {runs: [{preset: lstm-pico}, {preset: lstm-pico}]}}", "several runs are labelled"),
    ("groups: {g: {runs: [{set: {model.family: lstm}, match: {target: -3}}]}}", "match.target"),
])
def test_mistakes_are_user_errors_naming_the_key(text, message):
    with pytest.raises(UserError, match=message):
        expand(_spec(text), "quick")


def _fake_prepare(data_cfg, progress):  # noqa: ARG001
    return SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=300), num_tokens=lambda split: 10_000)


def test_identity_is_shared_across_groups_and_ignores_how_a_run_is_carried_out(tmp_path, monkeypatch):
    monkeypatch.setattr(study_plan, "_prepare", _fake_prepare)
    text = MINIMAL + """
  again:
    runs:
      - {name: "same-as-k1-onehot", preset: kgram-pico, set: {model.k: 1, model.input: onehot, model.dropout: 0.0}}
"""
    plan = study_plan.plan_study(_spec(text), tmp_path, progress=False)
    assert len(plan.runs) == 6  # 'again' reuses g's kgram-k1-onehot (dropout 0.0 is the default)
    shared = next(r for r in plan.runs.values() if r.label == "kgram-k1-onehot")
    assert shared.uses == [("g", "kgram-k1-onehot"), ("again", "same-as-k1-onehot")]
    assert shared.config["model"]["vocab_size"] == 300
    cfg = from_dict(RunConfig, shared.config)
    ident = study_plan.run_identity(cfg)
    cfg.train.threads, cfg.train.device, cfg.out = 1, "cpu", "elsewhere"
    assert study_plan.run_identity(cfg) == ident
    cfg.train.seed = 1
    assert study_plan.run_identity(cfg) != ident
    # a directory found under its id is reused even if its label changed
    (tmp_path / "runs" / f"renamed-{ident}").mkdir(parents=True)
    plan = study_plan.plan_study(_spec(text), tmp_path, progress=False)
    assert next(r for r in plan.runs.values() if r.run_id == ident).directory.name == f"renamed-{ident}"


def test_evals_per_run_and_parameter_matching(tmp_path, monkeypatch):
    monkeypatch.setattr(study_plan, "_prepare", _fake_prepare)
    text = """
default_budget: b
base: {model: {context_length: 16}, train: {batch_size: 4, max_tokens: 6400}}
budgets: {b: {evals_per_run: 10}}
groups:
  equal:
    runs:
      - {name: lstm, set: {model.family: lstm}, match: {target: transformer-pico}}
      - {name: kgram, set: {model.family: kgram, model.input: onehot}, match: {target: 50000}}
"""
    plan = study_plan.plan_study(_spec(text), tmp_path, progress=False)
    from picollm.models.sizing import count_parameters

    runs = {r.label: r for r in plan.runs.values()}
    target = count_parameters({"family": "transformer", "d_model": 64, "n_heads": 1, "n_layers": 1,
                               "context_length": 16, "vocab_size": 300})
    assert abs(count_parameters(runs["lstm"].config["model"]) - target) <= 0.02 * target
    assert abs(count_parameters(runs["kgram"].config["model"]) - 50_000) <= 0.02 * 50_000
    assert runs["kgram"].config["model"]["input"] == "onehot"
    assert runs["lstm"].config["train"]["eval_interval"] == 10  # 100 steps / 10 evaluations


def test_grid_replacement_and_with_base(tmp_path, monkeypatch):
    monkeypatch.setattr(study_plan, "_prepare", _fake_prepare)
    plan = study_plan.plan_study(load_study(), tmp_path, only=["size"], grid={"model.input": ["onehot"]},
                                 extend={"size": ["base"]}, seeds=1, progress=False)
    labels = [r.label for r in plan.runs.values()]
    assert labels == ["lstm-pico", "lstm-tiny", "lstm-small", "lstm-base", "kgram-pico-onehot", "kgram-tiny-onehot",
                      "kgram-small-onehot", "kgram-base-onehot", "transformer-pico", "transformer-tiny",
                      "transformer-small", "transformer-base"]
    assert next(r for r in plan.runs.values() if r.label == "transformer-base").config["model"]["d_model"] == 768


WHERE = """
default_budget: b
budgets:
  b:
    rules: [{where: {dropout: 0, tie: "true"}, set: {train.max_steps: 2}}]
groups:
  g:
    runs: [{preset: lstm-pico, grid: {model.dropout: [0.0, 0.1]}, tags: {tie: true}}]
  best:
    select: {groups: [g], where: {dropout: 0, tie: "true"}}
"""


def test_one_where_matcher_for_budget_rules_select_and_findings(tmp_path):
    """`where:` reads the same in a budget rule, a select group and the findings: 0 matches a tag 0.0
    and "true" a tag true (select once compared str(0.0) with str(0) and selected nothing)."""
    from picollm.study.findings import Checker
    from picollm.study.results import Entry, GroupResult, Stat, StudyResults, select_entries

    spec = _spec(WHERE)
    runs = expand(spec, "b")[0].runs
    assert [r.tags["dropout"] for r in runs] == [0.0, 0.1]
    assert [r.config_dict()["train"].get("max_steps") for r in runs] == [2, None]  # the rule: 0.0 only
    entries = [Entry(r.label, r.tags, [], {"val_nll": Stat([1.0 + r.tags["dropout"]])}) for r in runs]
    group = GroupResult("g", "g", "", [], entries)
    chosen = select_entries([group], {"groups": ["g"], "where": {"dropout": 0, "tie": "true"}, "per": "family"})
    assert [e.label for e in chosen] == [runs[0].label]
    checker = Checker(StudyResults(tmp_path, {}, [group]))
    assert [e.label for e in checker.entries("g", dropout=0, tie="true")] == [runs[0].label]
    assert checker.entries("g", dropout=0, missing="x") == []  # a tag the runs do not have matches nothing
