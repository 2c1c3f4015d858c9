"""`picollm export`: a checkpoint -> a directory Hugging Face `transformers` loads with no picollm installed.

Two layouts (docs/export.md):
- `gpt2`: a Transformer that is exactly GPT-2 (`gpt2.gpt2_mismatch`) becomes a native `GPT2LMHeadModel`
  (GPT-2's config.json and parameter names); no remote code.
- `picollm`: everything else. The weights keep picollm's names; `configuration_picollm.py` and
  `modeling_picollm.py` (from `hf_template/`, beside this file) are copied in and named by `auto_map`, so
  `from_pretrained` runs them when the user allows remote code (`trust_remote_code`).

Both carry a `picollm` section in config.json (picollm's own checkpoint config: the model spec, the
tokenizer spec and the sha256 of every file), which is what `picollm.load` reads: it never runs the .py
files. The directory is built in a hidden temporary sibling and renamed into place, so a failure leaves
nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from picollm import rundir
from picollm.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    file_record,
    load_model,
    model_config_dict,
    write_dir_atomic,
)
from picollm.errors import UserError
from picollm.export import gpt2
from picollm.export.card import model_card
from picollm.export.layout import CUSTOM_CLASSES, DTYPES, FORMAT_VERSION, SECTION
from picollm.export.tokenizer_files import write_tokenizer_files
from picollm.export.verify import require_transformers, verify_export
from picollm.hub import upload
from picollm.models.base import LanguageModel

HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TEMPLATE_DIR = Path(__file__).parent / "hf_template"
TEMPLATE_FILES = ("configuration_picollm.py", "modeling_picollm.py")
# picollm model fields the template's configs do not take: dropout is for training (0 in the export)
_TRAINING_ONLY = ("family", "dropout", "tie_embeddings")


@dataclass
class Source:
    checkpoint: Path  # the checkpoint directory exported
    run: Path | None  # its run directory, for the model card's data, recipe and metrics
    final: bool  # whether it is the run's final model (the run's summary.json describes it)


def find_source(path: str | Path) -> Source:
    """The checkpoint a RUN_OR_CHECKPOINT argument names; a run must have finished (final/)."""
    given = Path(path).expanduser()
    if not given.exists():
        raise UserError(f"{path} does not exist; pass a run directory or a checkpoint directory")
    if not given.is_dir():
        raise UserError(f"{path} is a file; pass a run directory or a checkpoint directory")
    if (given / CONFIG_FILE).is_file():
        run = rundir.find_run_dir(given)
        return Source(given, run, run is not None and given == run / rundir.FINAL)
    if (given / rundir.CONFIG).is_file():
        if (given / rundir.FINAL).exists():  # a damaged final/ is named, never replaced by best/
            return Source(rundir.model_dir(given), given, True)
        if not (given / rundir.FINAL / CONFIG_FILE).is_file():
            raise UserError(f"{given} has no finished checkpoint ({given / rundir.FINAL} is missing): finish the run "
                            f"with `picollm train --resume {given}`, or export one of its checkpoints, "
                            f"e.g. {given / rundir.BEST}")
        return Source(given / rundir.FINAL, given, True)
    raise UserError(f"{given} is neither a run directory ({rundir.CONFIG}) nor a checkpoint directory ({CONFIG_FILE})")


def check_out_dir(out: Path, source: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory")
    resolved, checkpoint = out.resolve(), source.resolve()
    if resolved == checkpoint or resolved in checkpoint.parents:
        raise UserError(f"--out {out} holds the checkpoint being exported ({source}); choose another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} exists and is not empty; pass --force to replace it, or choose another directory")


def cast_weights(state: dict[str, torch.Tensor], dtype: str, source: Path) -> dict[str, torch.Tensor]:
    """`state` in `dtype`; a UserError naming the tensor when a weight is not finite or would overflow."""
    target = DTYPES[dtype]
    largest = torch.finfo(target).max
    out = {}
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{source}: weight '{name}' holds NaN or inf (training diverged); "
                            "export an earlier checkpoint")
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if peak > largest:
            raise UserError(f"--dtype {dtype}: weight '{name}' reaches {peak:.4g}, beyond {dtype}'s range "
                            f"(+-{largest:.4g}); export with --dtype bf16 or fp32")
        out[name] = tensor.to(target).contiguous()
    return out


def picollm_weights(model: LanguageModel, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's parameters by picollm name, a tied output layer stored once (as the embedding)."""
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    if spec["family"] == "transformer" and spec.get("tie_embeddings", True):
        del state["output_layer.weight"]
    return state


def custom_config(spec: dict[str, Any]) -> dict[str, Any]:
    """config.json fields of the template's config class for this model."""
    family = spec["family"]
    if family not in CUSTOM_CLASSES:
        raise UserError(f"the '{family}' family cannot be exported: picollm exports {', '.join(CUSTOM_CLASSES)}")
    config_class, model_class = CUSTOM_CLASSES[family]
    fields = {k: v for k, v in spec.items() if k not in _TRAINING_ONLY}
    if family == "transformer":
        fields["tie_word_embeddings"] = bool(spec.get("tie_embeddings", True))
    return {
        "architectures": [model_class],
        "model_type": f"picollm_{family}",
        "auto_map": {"AutoConfig": f"configuration_picollm.{config_class}",
                     "AutoModelForCausalLM": f"modeling_picollm.{model_class}"},
        **fields,
    }


def layout_for(spec: dict[str, Any], requested: str) -> str:
    """'gpt2' where the model is exactly GPT-2 (and `requested` allows), else 'picollm'."""
    if requested == "picollm" or gpt2.gpt2_mismatch(spec) is not None:
        return "picollm"
    return "gpt2"


def run_info(source: Source) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's recipe, its final metrics when the export is the run's final model) for the model card."""
    recipe: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    if source.run is not None:
        try:
            loaded = yaml.safe_load((source.run / rundir.CONFIG).read_text(encoding="utf-8"))
            recipe = loaded if isinstance(loaded, dict) else {}
        except (OSError, yaml.YAMLError):
            recipe = {}
        if source.final:
            summary = rundir.read_json(source.run / rundir.SUMMARY) or {}
    return recipe, summary


def export_hf(path: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False,
              layout: str = "auto", repo_id: str | None = None, verify: bool = False) -> Path:
    """Write a transformers directory for the checkpoint (or finished run) at `path` into `out`.

    `dtype`: fp32, bf16 or fp16 weights. `layout`: auto (GPT-2 where it matches exactly) or picollm
    (always the custom model). `repo_id` names the model in the card's snippets (default: `out`).
    `verify` loads the result with transformers before it is put in place and checks its logits and
    tokenizer against picollm's (needs the `hf` extra).
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use {', '.join(DTYPES)}")
    if layout not in ("auto", "picollm"):
        raise UserError(f"unknown --layout {layout!r}; use auto or picollm")
    if verify:
        require_transformers()
    source = find_source(path)
    out = Path(out).expanduser()
    check_out_dir(out, source.checkpoint, force)
    model = load_model(source.checkpoint)
    checkpoint_config = rundir.read_json(source.checkpoint / CONFIG_FILE) or {}
    spec = model_config_dict(model)
    chosen = layout_for(spec, layout)
    weights = cast_weights(picollm_weights(model, spec), dtype, source.checkpoint)
    tokenizer = getattr(model, "tokenizer", None)
    eot = tokenizer.eot_id if tokenizer is not None else None
    recipe, summary = run_info(source)

    def fill(tmp: Path) -> None:
        if chosen == "gpt2":
            hf_config = gpt2.gpt2_config(spec)
            save_file(gpt2.to_gpt2_weights(weights), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            hf_config = custom_config(spec)
            save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            for name in TEMPLATE_FILES:
                shutil.copyfile(TEMPLATE_DIR / name, tmp / name)
        hf_config.update(bos_token_id=eot, eos_token_id=eot, dtype=HF_DTYPE_NAMES[dtype], use_cache=True)
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp, spec["context_length"])
            generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        section = {
            "format": FORMAT_VERSION,
            "layout": chosen,
            "model": spec,
            "dtype": dtype,
            "tokenizer": tokenizer.name if tokenizer is not None else None,
            "num_parameters": model.num_parameters(),
            "num_parameters_non_embedding": model.num_parameters(non_embedding=True),
            **{k: checkpoint_config[k] for k in ("step", "val_loss") if k in checkpoint_config},
        }
        card = model_card(spec=spec, section=section, layout=chosen, recipe=recipe, summary=summary,
                          name=repo_id or str(out.resolve()), final=source.final)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        section["files"] = {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        hf_config[SECTION] = section
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        if verify:
            verify_export(tmp, model, dtype)

    return write_dir_atomic(out, fill)


def push(path: str | Path, repo_id: str, private: bool = False, dtype: str = "fp32") -> str:
    """`picollm push`: export the checkpoint (or finished run) at `path` and upload it to `repo_id`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_hf(path, Path(tmp) / "export", dtype=dtype, repo_id=repo_id)
        return upload(folder, repo_id, private=private)
