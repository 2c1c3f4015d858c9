"""The study file: a validated schema, budgets, and the expansion of groups into runs.

A study YAML (the built-in one is `picollm/study/study.yaml`; docs/study.md documents every key) holds

- `base`: the recipe every run starts from, as dotted keys (`train.lr: 3e-4`) or nested sections;
- `budgets`: named ways to scale the work (`full`, `quick`): `set` changes every run, `rules` change the
  runs whose tags match, `eval` changes the generation settings;
- `eval`: what is generated after each run (prompts from the validation split, strategies, the study prompt);
- `findings`: the tolerances the claims are checked with;
- `groups`: one ablation each. A group either trains runs (`runs`: blocks with a preset, fixed `set` keys
  and a `grid` whose product gives the runs) or selects runs from other groups (`select`: the best of each
  family by validation loss among runs whose tags match).

Expansion resolves every run's config in this order (later wins): the preset's model fields, `base`,
the budget's `set`, the block's `set`, the grid values, the budget's matching `rules`, the command line.

(Over 400 lines because the schema and its expansion are one contract: each key's meaning is how it expands.)
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picollm.config import SECTIONS, TrainConfig
from picollm.errors import UserError, check
from picollm.models.registry import PRESET_NAMES, preset_fields
from picollm.schema import apply_overrides, flatten_keys, from_dict, load_yaml, to_dict

STUDY_FILE = Path(__file__).with_name("study.yaml")
TREND_POINTS = (0.25, 0.5)  # fractions of a run scored on the full validation split (besides the end)
SECTIONS_SHOWN = ("curves", "flops", "params", "results", "diversity", "samples", "prompt_samples")


# ---------------------------------------------------------------------------------------------
# the schema


@dataclass
class EvalSpec:
    """What the study generates from each trained run (stored in the run's eval.json)."""

    prompts: int = 20  # M: prompts taken from the starts of validation stories
    prompt_tokens: int = 8  # P: tokens of each story that form its prompt
    max_new_tokens: int = 64
    strategies: dict[str, Any] = field(default_factory=lambda: {
        "greedy": {"strategy": "greedy"},
        "top-p 0.9": {"strategy": "top-p", "top_p": 0.9},
        "top-p 1.0": {"strategy": "top-p", "top_p": 1.0},
    })
    prompt: str = "Once upon a time, there was a very intelligent"  # the study prompt (decoding group)
    prompt_samples: int = 1  # continuations of the study prompt per strategy
    diversity_strategy: str = "top-p 1.0"  # whose distinct-n the results tables and findings use
    seed: int = 0

    def validate(self) -> None:
        check(self.prompts >= 1, "eval.prompts", "must be at least 1")
        check(self.prompt_tokens >= 1, "eval.prompt_tokens", "must be at least 1")
        check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be at least 1")
        check(self.prompt_samples >= 1, "eval.prompt_samples", "must be at least 1")
        check(bool(self.strategies), "eval.strategies", "name at least one strategy")
        for name, kwargs in self.strategies.items():
            check(isinstance(kwargs, dict) and "strategy" in kwargs, f"eval.strategies.{name}",
                  "must be a mapping with a 'strategy' key (greedy, top-p, top-k or sample) and its arguments")
        check(self.diversity_strategy in self.strategies, "eval.diversity_strategy",
              f"must name one of eval.strategies ({', '.join(self.strategies)})")


@dataclass
class FindingsSpec:
    """Tolerances for checking the claims when a run has one seed (with several, their std is used)."""

    loss_tolerance: float = 0.01  # nats: two losses closer than this are "within noise"
    distinct_tolerance: float = 0.01  # distinct-n ratios / repetition rates closer than this are a tie
    little: float = 0.05  # nats: "changes validation loss little" means a spread below this
    convergence_tolerance: float = 0.1  # relative: tokens-to-reference within 10% are a tie
    smoothness_tolerance: float = 0.1  # relative: roughness within 10% is a tie

    def validate(self) -> None:
        for name in ("loss_tolerance", "distinct_tolerance", "little", "convergence_tolerance",
                     "smoothness_tolerance"):
            check(getattr(self, name) >= 0, f"findings.{name}", "must be >= 0")


@dataclass
class MatchSpec:
    """Solve a block's model size so its parameter count equals a target (the parameter solver)."""

    target: Any = None  # a number of parameters, or a preset name whose count is the target
    non_embedding: bool = False  # match non-embedding parameters instead of the total

    def validate(self) -> None:
        ok = (isinstance(self.target, int) and not isinstance(self.target, bool) and self.target > 0) or \
            isinstance(self.target, str)
        if not ok:
            raise UserError("study key 'match.target': give a parameter count (e.g. 2000000) or a preset "
                            f"name (e.g. transformer-pico), got {self.target!r}")


@dataclass
class BlockSpec:
    """Runs of a group: a preset + fixed keys + a grid (the product of the grid's value lists)."""

    name: str | None = None  # label template, e.g. "kgram-{size}-{input}"; default: preset + grid values
    preset: str | None = None  # template, e.g. "lstm-{size}"
    set: dict[str, Any] = field(default_factory=dict)  # dotted config keys -> values
    grid: dict[str, Any] = field(default_factory=dict)  # dotted config key or variable -> list of values
    tags: dict[str, Any] = field(default_factory=dict)  # extra tags (templates), used by budgets, select and findings
    match: MatchSpec | None = None


@dataclass
class SelectSpec:
    """A group of runs chosen from other groups after training (e.g. the best pico of each family)."""

    groups: list[str] = field(default_factory=list)
    where: dict[str, Any] = field(default_factory=dict)  # tag -> value or list of values
    per: str = "family"  # one run per value of this tag
    by: str = "val_loss"  # val_loss | test_loss: lower is better

    def validate(self) -> None:
        if not self.groups:
            raise UserError("study key 'select.groups': name the groups to select from")
        if self.by not in ("val_loss", "test_loss"):
            raise UserError(f"study key 'select.by': use val_loss or test_loss, got {self.by!r}")


@dataclass
class GroupSpec:
    name: str = ""
    title: str = ""
    description: str = ""
    runs: list[BlockSpec] = field(default_factory=list)
    select: SelectSpec | None = None
    show: list[str] = field(default_factory=lambda: ["curves", "results", "diversity", "samples"])

    def check(self) -> None:
        if bool(self.runs) == (self.select is not None):
            raise UserError(f"study group '{self.name}': give either 'runs' (blocks to train) or 'select' "
                            "(runs chosen from other groups), not both or neither")
        unknown = [s for s in self.show if s not in SECTIONS_SHOWN]
        if unknown:
            raise UserError(f"study group '{self.name}': unknown section(s) in 'show': {', '.join(unknown)}; "
                            f"allowed: {', '.join(SECTIONS_SHOWN)}")


@dataclass
class RuleSpec:
    where: dict[str, Any] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class BudgetSpec:
    description: str = ""
    evals_per_run: int | None = None  # sets train.eval_interval so each run has about this many evaluations
    tune: bool = False  # train.lr auto for every run that does not set train.lr itself (--no-tune: off, below)
    seeds: int = 1  # seeds per run unless --seeds says otherwise
    set: dict[str, Any] = field(default_factory=dict)
    rules: list[RuleSpec] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)  # EvalSpec fields to change


@dataclass
class StudySpec:
    title: str = "picollm study"
    description: str = ""
    default_budget: str = "quick"
    base: dict[str, Any] = field(default_factory=dict)
    budgets: dict[str, BudgetSpec] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    findings: FindingsSpec = field(default_factory=FindingsSpec)
    groups: dict[str, GroupSpec] = field(default_factory=dict)
    source: str = ""  # where it was read from


def _block(data: Any, where: str) -> BlockSpec:
    if not isinstance(data, dict):
        raise UserError(f"study key '{where}': a run block must be a mapping (preset, set, grid, ...)")
    data = dict(data)
    match = data.pop("match", None)
    block = from_dict(BlockSpec, data, prefix=where)
    if match is not None:
        if not isinstance(match, dict):
            match = {"target": match}
        block.match = from_dict(MatchSpec, match, prefix=f"{where}.match")
    for key, values in block.grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"study key '{where}.grid.{key}': give a non-empty list of values, got {values!r}")
    block.set = flatten(block.set, f"{where}.set")
    return block


def parse_study(data: dict, source: str = "") -> StudySpec:
    """A validated StudySpec from the YAML mapping (UserError naming the key on any mistake)."""
    if not isinstance(data, dict):
        raise UserError(f"study file {source}: expected a mapping with 'groups', 'budgets', ...")
    data = dict(data)
    groups_raw = data.pop("groups", None)
    budgets_raw = data.pop("budgets", None) or {}
    eval_raw = data.pop("eval", None)
    findings_raw = data.pop("findings", None)
    spec = from_dict(StudySpec, data, prefix="")
    spec.source = source
    spec.base = flatten(spec.base, "base")
    spec.eval = from_dict(EvalSpec, eval_raw or {}, prefix="eval")
    spec.findings = from_dict(FindingsSpec, findings_raw or {}, prefix="findings")
    if not isinstance(budgets_raw, dict):
        raise UserError("study key 'budgets': expected a mapping of budget name -> {description, set, rules, eval}")
    for name, raw in budgets_raw.items():
        if raw is not None and not isinstance(raw, dict):
            raise UserError(f"study key 'budgets.{name}': expected a mapping (description, set, rules, eval)")
        raw = dict(raw or {})
        rules = raw.pop("rules", None) or []
        budget = from_dict(BudgetSpec, raw, prefix=f"budgets.{name}")
        budget.set = flatten(budget.set, f"budgets.{name}.set")
        if not isinstance(rules, list):
            raise UserError(f"study key 'budgets.{name}.rules': expected a list of {{where, set}}")
        budget.rules = [from_dict(RuleSpec, r, prefix=f"budgets.{name}.rules[{i}]") for i, r in enumerate(rules)]
        for rule in budget.rules:
            rule.set = flatten(rule.set, f"budgets.{name}.rules")
        # the eval changes must be valid EvalSpec fields
        from_dict(EvalSpec, {**_eval_dict(spec.eval), **budget.eval}, prefix=f"budgets.{name}.eval")
        spec.budgets[name] = budget
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise UserError(f"study file {source}: 'groups' must map group names to groups (at least one)")
    for name, raw in groups_raw.items():
        if raw is not None and not isinstance(raw, dict):
            raise UserError(f"study key 'groups.{name}': expected a mapping (title, runs or select, ...)")
        raw = dict(raw or {})
        blocks = raw.pop("runs", None) or []
        select = raw.pop("select", None)
        group = from_dict(GroupSpec, {**raw, "name": str(name)}, prefix=f"groups.{name}")
        if not isinstance(blocks, list):
            raise UserError(f"study key 'groups.{name}.runs': expected a list of run blocks")
        group.runs = [_block(b, f"groups.{name}.runs[{i}]") for i, b in enumerate(blocks)]
        if select is not None:
            group.select = from_dict(SelectSpec, select, prefix=f"groups.{name}.select")
        group.check()
        spec.groups[str(name)] = group
    for group in spec.groups.values():
        if group.select:
            missing = [g for g in group.select.groups if g not in spec.groups or spec.groups[g].select]
            if missing:
                raise UserError(f"study group '{group.name}' selects from {', '.join(missing)}, which "
                                "is not a group that trains runs")
    if spec.default_budget not in spec.budgets:
        spec.budgets.setdefault(spec.default_budget, BudgetSpec(description="the base recipe, unchanged"))
    return spec


def load_study(path: str | Path | None = None) -> StudySpec:
    """The built-in study (None) or a user's study YAML."""
    path = STUDY_FILE if path is None else Path(path)
    return parse_study(load_yaml(path), source=str(path))


def _eval_dict(spec: EvalSpec) -> dict:
    return to_dict(spec)


def flatten(data: Any, where: str) -> dict[str, Any]:
    """`{"train": {"lr": 1}}` or `{"train.lr": 1}` -> `{"train.lr": 1}`; keys must start with a section."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"study key '{where}': expected a mapping of config keys, got {data!r}")
    out = flatten_keys(data)
    for key in out:
        if key.split(".")[0] not in SECTIONS:
            raise UserError(f"study key '{where}.{key}': config keys start with one of "
                            f"{', '.join(SECTIONS)} (e.g. train.lr)")
    return out


# ---------------------------------------------------------------------------------------------
# expansion


@dataclass
class PlannedRun:
    """One run as the study asks for it, before the data is prepared (vocab and solver not applied)."""

    group: str
    label: str
    tags: dict[str, Any]
    seed: int
    overrides: dict[str, Any]  # dotted keys, in the order they apply
    preset: str | None
    match: MatchSpec | None = None
    explicit: set[str] = field(default_factory=set)  # keys a block, grid, rule or the command line sets
    untuned: bool = False  # a layer asked for train.lr auto, and --no-tune gave it the fixed rate instead

    def config_dict(self) -> dict:
        data: dict = {"model": preset_fields(self.preset)} if self.preset else {}
        return apply_overrides(data, self.overrides)


@dataclass
class PlannedGroup:
    spec: GroupSpec
    runs: list[PlannedRun] = field(default_factory=list)


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.\-]*)\}")


def fill(template: str, values: dict[str, Any], where: str) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise UserError(f"study key '{where}': unknown placeholder {{{key}}} in {template!r}; "
                            f"known: {', '.join(sorted(values))}")
        return _fmt(values[key])

    return _PLACEHOLDER.sub(sub, template)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def tags_match(tags: dict[str, Any], where: dict[str, Any]) -> bool:
    """Whether a run's tags satisfy a `where:` mapping (of budget rules, `select` and the findings):
    every key is a tag of the run, whose value is the wanted one or one of a list of them. Values
    compare as written in a label, so 0 matches 0.0, and "true" matches true."""
    for key, wanted in (where or {}).items():
        if key not in tags:
            return False
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if tags[key] not in allowed and _fmt(tags[key]) not in [_fmt(a) for a in allowed]:
            return False
    return True


def budget_overrides(spec: StudySpec, budget: str) -> BudgetSpec:
    if budget not in spec.budgets:
        raise UserError(f"unknown budget '{budget}'; this study has: {', '.join(spec.budgets)}")
    return spec.budgets[budget]


def eval_settings(spec: StudySpec, budget: str) -> EvalSpec:
    b = budget_overrides(spec, budget)
    return from_dict(EvalSpec, {**_eval_dict(spec.eval), **b.eval}, prefix=f"budgets.{budget}.eval")


def fixed_lr(layers: list[dict[str, Any]]) -> float:
    """The rate of a run that asked for `train.lr: auto` under --no-tune: the last number the layers (in
    expansion order) give train.lr, as if no layer had said auto: the budget's fixed rate (quick: 5e-3)
    unless a later layer sets its own, else base's, else the trainer's default."""
    rates = [layer["train.lr"] for layer in layers if layer.get("train.lr", "auto") != "auto"]
    return rates[-1] if rates else TrainConfig().lr


def expand_block(spec: StudySpec, group: str, index: int, block: BlockSpec, budget: BudgetSpec,
                 seeds: list[int], cli: dict[str, Any], tune: bool = False,
                 no_tune: bool = False) -> list[PlannedRun]:
    where = f"groups.{group}.runs[{index}]"
    keys = list(block.grid)
    runs = []
    for combo in itertools.product(*(block.grid[k] for k in keys)):
        chosen = dict(zip(keys, combo))
        variables: dict[str, Any] = {}
        for key, value in chosen.items():
            variables[key] = value
            if "." in key:
                variables.setdefault(key.rsplit(".", 1)[1], value)
        preset = fill(block.preset, variables, f"{where}.preset") if block.preset else None
        tags: dict[str, Any] = {}
        family = None
        if preset:
            name, _, size = preset.rpartition("-")
            family = name or None
            if size in PRESET_NAMES:
                tags["size"] = size
        grid_set = {k: v for k, v in chosen.items() if "." in k}
        settings = {**spec.base, **budget.set, **block.set, **grid_set}
        family = settings.get("model.family", family)
        if family is None:
            raise UserError(f"study key '{where}': give a preset (e.g. lstm-pico) or model.family")
        tags["family"] = family
        for key, value in chosen.items():
            tags[key.rsplit(".", 1)[-1]] = value
        variables = {**tags, **variables}
        for key, value in block.tags.items():
            tags[key] = fill(value, variables, f"{where}.tags.{key}") if isinstance(value, str) else value
        variables = {**tags, **variables}
        if block.name:
            label = fill(block.name, variables, f"{where}.name")
        else:
            in_preset = set(_PLACEHOLDER.findall(block.preset or ""))
            label = "-".join([preset or family] + [_fmt(v) for k, v in chosen.items() if k not in in_preset])
        explicit = set(block.set) | set(grid_set) | set(cli)
        rules = [rule.set for rule in budget.rules if tags_match(tags, rule.where)]
        for rule_set in rules:
            settings.update(rule_set)
            explicit |= set(rule_set)
        if tune and "train.lr" not in explicit:  # the budget tunes: a sweep chooses this model's rate
            settings["train.lr"] = "auto"
        settings.update(cli)
        untuned = no_tune and settings.get("train.lr") == "auto"
        if untuned:  # --no-tune wins over an auto from any layer: no sweep, the fixed rate
            settings["train.lr"] = fixed_lr([spec.base, budget.set, block.set, grid_set, *rules, cli])
        for seed in seeds:
            runs.append(PlannedRun(group=group, label=label, tags=dict(tags), seed=seed,
                                   overrides={**settings, "train.seed": seed}, preset=preset,
                                   match=copy.deepcopy(block.match), explicit=explicit, untuned=untuned))
    return runs


def expand(spec: StudySpec, budget: str, seeds: int | None = None, only: list[str] | None = None,
           cli: dict[str, Any] | None = None, tune: bool | None = None) -> list[PlannedGroup]:
    """Every group's runs for `budget`, `seeds` seeds each (train.seed = 0..seeds-1 + base seed; None: the
    budget's `seeds`). `tune`: None: the budget's `tune` (train.lr auto where no layer sets train.lr);
    True: that for any budget; False (--no-tune): no run is tuned, and an auto that a layer (base, budget,
    block, grid, rule, command line) asks for becomes the fixed rate of `fixed_lr`."""
    b = budget_overrides(spec, budget)
    seeds = b.seeds if seeds is None else seeds
    no_tune = tune is False
    tune = b.tune if tune is None else tune
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    first_seed = int({**spec.base, **b.set, **(cli or {})}.get("train.seed", 0))
    seed_list = [first_seed + i for i in range(seeds)]
    group_names = [n for n in (only or []) if n in spec.groups]
    patterns = [n for n in (only or []) if n not in spec.groups]
    names = select_groups(spec, group_names) if group_names or not patterns else list(spec.groups)
    planned = []
    matched: set[str] = set()
    for name in names:
        group = spec.groups[name]
        pg = PlannedGroup(group)
        for i, block in enumerate(group.runs):
            pg.runs.extend(expand_block(spec, name, i, block, b, seed_list, dict(cli or {}), tune, no_tune))
        labels = [r.label for r in pg.runs if r.seed == seed_list[0]]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise UserError(f"study group '{name}': several runs are labelled {', '.join(dupes)}; give the "
                            "blocks a 'name' template that tells them apart")
        if patterns and name not in group_names:  # --only run labels: keep the runs that match
            keep = [r for r in pg.runs if any(fnmatch.fnmatchcase(r.label, p) for p in patterns)]
            matched.update(p for p in patterns for r in keep if fnmatch.fnmatchcase(r.label, p))
            if not keep and not group.select:
                continue
            pg.runs = keep
        planned.append(pg)
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        raise UserError(f"--only: {', '.join(unmatched)} names no group and no run; groups: "
                        f"{', '.join(spec.groups)} (run labels and patterns like 'kgram-pico-*' work too)")
    return planned


def select_groups(spec: StudySpec, only: list[str] | None) -> list[str]:
    """Group names to run, in study order; a selecting group brings the groups it selects from."""
    if not only:
        return list(spec.groups)
    wanted: set[str] = set()
    for name in only:
        if name not in spec.groups:
            raise UserError(f"--only: unknown group '{name}'; this study has: {', '.join(spec.groups)}")
        wanted.add(name)
        if spec.groups[name].select:
            wanted.update(spec.groups[name].select.groups)
    return [n for n in spec.groups if n in wanted]
