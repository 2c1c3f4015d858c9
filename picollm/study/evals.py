"""What the study generates from each finished run: eval.json (diversity and samples per decoding strategy
on prompts from the validation split, and the study prompt's continuations), so `report` needs only logs.

Running the study again regenerates eval.json when it is missing or was made with other eval settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from picollm import rundir
from picollm.checkpoint import load
from picollm.config import to_dict
from picollm.diversity_eval import diversity_eval, story_prompts
from picollm.errors import UserError
from picollm.evaluation import prepared_for_run
from picollm.fileio import write_json_atomic
from picollm.generation import generate
from picollm.study.spec import EvalSpec


def eval_record_settings(settings: EvalSpec) -> dict[str, Any]:
    return to_dict(settings)


def eval_is_current(directory: Path, settings: EvalSpec) -> bool:
    path = Path(directory) / rundir.EVAL
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return False
    return record.get("settings") == eval_record_settings(settings)


def run_is_finished(directory: Path) -> bool:
    summary = rundir.read_summary(Path(directory))
    return bool(summary) and summary.get("status") == "finished"


def evaluate_run(directory: str | Path, settings: EvalSpec, prepared: Any = None,
                 device: str = "cpu") -> dict[str, Any]:
    """Generate from a finished run and write its eval.json: diversity and samples per strategy on
    prompts from the validation split, and the study prompt's continuations."""
    directory = Path(directory)
    model = load(str(directory), device=device)
    data = prepared if prepared is not None else prepared_for_run(directory)
    tokens = data.tokens("val")
    offsets = data.story_offsets("val")
    tok = model.tokenizer
    starts = list(offsets) + [len(tokens)]
    usable = sum(1 for a, b in zip(starts[:-1], starts[1:]) if b - a >= settings.prompt_tokens + 2)
    if usable == 0:
        raise UserError(f"{directory}: no validation story is longer than {settings.prompt_tokens} tokens")
    prompts = story_prompts(tokens, offsets, min(settings.prompts, usable), settings.prompt_tokens)
    results = diversity_eval(model, prompts, settings.strategies, max_new_tokens=settings.max_new_tokens,
                             seed=settings.seed, return_texts=True)
    diversity = {name: {k: v for k, v in rep.items() if k != "continuations"} for name, rep in results.items()}
    samples = {name: list(rep.get("continuations", [])) for name, rep in results.items()}
    prompt_samples = {}
    for name, kwargs in settings.strategies.items():
        n = 1 if kwargs.get("strategy") == "greedy" else settings.prompt_samples
        prompt_samples[name] = generate(model, settings.prompt, max_new_tokens=settings.max_new_tokens,
                                        num_samples=n, seed=settings.seed, **kwargs)
    eot = getattr(tok, "eot_id", None)
    record = {
        "settings": eval_record_settings(settings),
        "prompts": [tok.decode([t for t in p if t != eot]) for p in prompts],
        "diversity": diversity,
        "samples": samples,
        "study_prompt": {"prompt": settings.prompt, "samples": prompt_samples},
    }
    write_json_atomic(directory / rundir.EVAL, record)
    return record
