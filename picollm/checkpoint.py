"""Model checkpoints in the Hugging Face layout: `config.json` + `model.safetensors` + tokenizer files.

Nothing here unpickles: weights are safetensors, everything else JSON. Every directory is written
atomically: into a hidden temporary sibling first, then renamed into place, so a kill at any moment
leaves either the previous complete directory or the new complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from picollm.errors import UserError
from picollm.models.base import LanguageModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dir_atomic(directory: Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp_dir)` then move `tmp_dir` to `directory`, replacing an existing one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if directory.exists():
            # rename the old one away first: the swap is two renames, and no moment has neither
            old = directory.with_name(f".{directory.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def model_config_dict(model: LanguageModel) -> dict[str, Any]:
    from picollm.models.registry import model_config_to_dict

    return model_config_to_dict(model.family, model.config)


def write_model_files(model: LanguageModel, directory: Path, tokenizer: Any = None,
                      extra: dict[str, Any] | None = None) -> None:
    """Write config.json, model.safetensors and the tokenizer into an existing directory."""
    config = {
        "picollm_format": FORMAT_VERSION,
        "model": model_config_dict(model),
        "num_parameters": model.num_parameters(),
        "num_parameters_non_embedding": model.num_parameters(non_embedding=True),
        **(extra or {}),
    }
    if tokenizer is not None:
        config["tokenizer"] = tokenizer.name
        tokenizer.save(directory)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(_unique_state_dict(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def save_model(model: LanguageModel, directory: str | Path, tokenizer: Any = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Save `model` (and its tokenizer) as a loadable checkpoint directory, atomically."""
    return write_dir_atomic(Path(directory), lambda tmp: write_model_files(model, tmp, tokenizer, extra))


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not a picollm checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{path} has no 'model' section; is this a picollm checkpoint?")
    return config


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc}); the file is truncated "
                        "or corrupted: use another checkpoint") from None


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` into `model`, checking names and shapes; tied tensors may be stored once."""
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise UserError(f"{source} holds tensors the model does not have: {', '.join(unknown[:5])}")
    by_ptr: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        by_ptr.setdefault(tensor.data_ptr(), []).append(name)
    for names in by_ptr.values():
        present = [n for n in names if n in state]
        if not present:
            raise UserError(f"{source} lacks tensor '{names[0]}'; the checkpoint does not match its config")
        for name in present:
            if tuple(state[name].shape) != tuple(expected[name].shape):
                raise UserError(
                    f"{source}: tensor '{name}' has shape {tuple(state[name].shape)} but config.json "
                    f"implies {tuple(expected[name].shape)}; the weights do not match the config")
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
    """Load a checkpoint directory written by `save_model` (weights + config + tokenizer if present)."""
    from picollm.models.registry import build_model

    directory = Path(path)
    config = read_config(directory)
    try:
        model = build_model(config["model"])
    except UserError as exc:
        raise UserError(f"{directory / CONFIG_FILE}: {exc}") from None
    load_weights_into(model, load_state_dict(directory / WEIGHTS_FILE), directory / WEIGHTS_FILE)
    model.tokenizer = None
    if "tokenizer" in config:
        from picollm.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(directory)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(
                f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}; the tokenizer files do not belong to this model")
        model.tokenizer = tokenizer
    model.checkpoint_path = directory
    return model.to(device).eval()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, a run directory, or a Hugging Face repo id.

    In a run directory the final model wins, then the best by validation loss, then the latest
    periodic checkpoint.
    """
    directory = Path(path).expanduser()
    if directory.is_dir():
        if (directory / CONFIG_FILE).is_file():
            return directory
        for name in ("final", "best"):
            if (directory / name / CONFIG_FILE).is_file():
                return directory / name
        periodic = sorted((directory / "checkpoints").glob("step-*")) if (directory / "checkpoints").is_dir() else []
        periodic = [p for p in periodic if (p / CONFIG_FILE).is_file()]
        if periodic:
            return periodic[-1]
        raise UserError(f"{directory} holds no checkpoint (no {CONFIG_FILE}, final/, best/ or checkpoints/)")
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not directory.exists():
        from picollm.hub import download

        return download(text)
    raise UserError(f"checkpoint {path} does not exist; pass a run directory, a checkpoint directory "
                    "or a Hugging Face repo id (user/name)")


def load(path: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
    """`picollm.load`: a trained model, with its tokenizer as `model.tokenizer`."""
    return load_model(resolve_checkpoint(path), device=device)
