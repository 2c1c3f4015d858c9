"""Model checkpoints in the Hugging Face layout: `config.json` + `model.safetensors` + tokenizer files.

Nothing here unpickles: weights are safetensors, everything else JSON. Every directory is written
atomically (`picollm.fileio.write_dir_atomic`), so a kill at any moment leaves either the previous
complete directory (under its name, or moved aside as `.NAME.old` until the next write puts it back) or
the new complete one; a full disk is a `DiskFullError` naming the directory.

`config.json` records the size and sha256 of the weights and tokenizer files (`files`), so a file
that was truncated, corrupted or copied in from another checkpoint is named on load instead of
being used, and since format 2 the sha256 of its own content (`config_sha256`, over the rest of the
file as canonical JSON), so an edited field (a head count, say) is refused rather than loaded into a
model it does not describe. Format 1 (without it) loads as before; a newer format is refused. So the
checksums catch accidental damage, not a deliberate edit (one that also sets the format to 1 loads);
what keeps a checkpoint from running code is that nothing in it is unpickled.
`load(path)` finds the checkpoint in a run directory (`picollm.rundir`) or fetches it
from the hub (`picollm.hub`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from picollm.data.tokenizer import BPE_FILE, load_tokenizer
from picollm.data.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG
from picollm.device import resolve_device
from picollm.errors import UserError
from picollm.export.gpt2 import from_gpt2_weights
from picollm.export.layout import picollm_view, refuse_pickled_weights
from picollm.export.tokenizer_files import TOKENIZER_JSON, read_tokenizer
from picollm.fileio import file_record, write_dir_atomic
from picollm.hub import download, is_repo_id
from picollm.models.base import LanguageModel
from picollm.models.registry import build_model, model_config_to_dict
from picollm.rundir import MODEL_CONFIG, model_dir

CONFIG_FILE = MODEL_CONFIG
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2
FORMAT_KEY = "picollm_format"
FILES_KEY = "files"  # in config.json: {file name: {"bytes": size, "sha256": hex digest}}
CHECKSUM_KEY = "config_sha256"  # in config.json: config_checksum of the rest of it


def config_checksum(config: dict[str, Any]) -> str:
    """sha256 of `config` without its CHECKSUM_KEY, as canonical JSON (sorted keys, no spaces)."""
    rest = {k: v for k, v in config.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def verify_file(path: Path, record: Any, recorded_in: Path) -> None:
    """UserError unless `path` has the size and sha256 of `record` (as written by `file_record`)."""
    if not isinstance(record, dict):
        return
    if not path.is_file():
        raise UserError(f"{path} is missing; {recorded_in.name} lists it: the checkpoint is incomplete")
    size = path.stat().st_size
    if isinstance(record.get("bytes"), int) and size != record["bytes"]:
        raise UserError(f"{path} is {size:,} bytes but {recorded_in} records {record['bytes']:,}: the file is "
                        "truncated, or does not belong to this checkpoint; use another checkpoint")
    if isinstance(record.get("sha256"), str) and file_record(path)["sha256"] != record["sha256"]:
        raise UserError(f"{path} does not match the sha256 recorded in {recorded_in}: the file is corrupted, "
                        "or does not belong to this checkpoint; use another checkpoint")


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
    if not model.family:
        raise UserError(f"{type(model).__name__} is not a registered model family, so a checkpoint of it could "
                        "not be loaded; register it first with picollm.register_model(name, ...)")
    return model_config_to_dict(model.family, model.config)


def write_model_files(model: LanguageModel, directory: Path, tokenizer: Any = None,
                      extra: dict[str, Any] | None = None) -> None:
    """Write model.safetensors, the tokenizer and config.json (last: it records the others' sizes and
    sha256) into an existing directory."""
    config = {
        FORMAT_KEY: FORMAT_VERSION,
        "model": model_config_dict(model),
        "num_parameters": model.num_parameters(),
        "num_parameters_non_embedding": model.num_parameters(non_embedding=True),
        **(extra or {}),
    }
    save_file(_unique_state_dict(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    names = [WEIGHTS_FILE]
    if tokenizer is not None:
        config["tokenizer"] = tokenizer.name
        tokenizer.save(directory)
        names += [n for n in (TOKENIZER_CONFIG, BPE_FILE) if (directory / n).is_file()]
    config[FILES_KEY] = {name: file_record(directory / name) for name in names}
    config[CHECKSUM_KEY] = config_checksum(config)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise UserError(f"{path} is not valid JSON ({reason}); the checkpoint is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} has no 'model' section; is this a picollm checkpoint?")
    if isinstance(config.get("model"), dict):  # picollm's own layout: versioned and checksummed
        version = config.get(FORMAT_KEY, 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(f"{path} is checkpoint format {version!r}, written by a newer picollm; this one reads "
                            f"formats up to {FORMAT_VERSION}: upgrade picollm to load it")
        if version >= 2 and config.get(CHECKSUM_KEY) != config_checksum(config):
            raise UserError(f"{path} was changed after it was written (its content no longer matches its "
                            f"{CHECKSUM_KEY}): a model field edited by hand, or damage; use another checkpoint")
    # an exported transformers directory or a GPT-2 checkpoint reads as a picollm config with a "layout"
    return picollm_view(config, path)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"{path} is not a readable safetensors file ({reason}); the file is truncated "
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
    directory = Path(path)
    config = read_config(directory)
    config_path = directory / CONFIG_FILE
    try:
        model = build_model(config["model"])
    except UserError as exc:
        raise UserError(f"{config_path}: {exc}") from None
    files = config.get(FILES_KEY) if isinstance(config.get(FILES_KEY), dict) else {}
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        verify_file(weights, files.get(WEIGHTS_FILE), config_path)
    else:
        refuse_pickled_weights(directory)
    state = load_state_dict(weights)
    if config["layout"] == "gpt2":  # GPT2LMHeadModel's names and layouts
        state = from_gpt2_weights(state, model.config.tie_embeddings, weights)  # type: ignore[attr-defined]
    load_weights_into(model, state, weights)
    model.tokenizer = None
    if config["layout"] != "picollm" or config.get("exported"):
        # the transformers tokenizer files: only the one picollm reads is checked (a hub download has no others)
        if str(config.get("tokenizer", "")).startswith("bpe:"):
            verify_file(directory / TOKENIZER_JSON, files.get(TOKENIZER_JSON), config_path)
        model.tokenizer = read_tokenizer(directory, config.get("tokenizer"))
        if model.tokenizer is not None and model.tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"{directory}: the tokenizer has {model.tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {model.config.vocab_size}; the tokenizer files do not belong to this model")
    elif "tokenizer" in config:
        try:
            tokenizer = load_tokenizer(directory)
        except UserError as exc:
            if str(directory) in str(exc):
                raise
            raise UserError(f"{directory / TOKENIZER_CONFIG}: {exc}") from None
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(
                f"{directory / TOKENIZER_CONFIG}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {model.config.vocab_size}; the tokenizer files do not belong to this model")
        if tokenizer.name != config["tokenizer"]:
            raise UserError(
                f"{directory / TOKENIZER_CONFIG} names the tokenizer {tokenizer.name} but {config_path} says "
                f"{config['tokenizer']}; the tokenizer files do not belong to this model")
        for name, record in files.items():
            if name != WEIGHTS_FILE and isinstance(name, str) and "/" not in name and name != CONFIG_FILE:
                verify_file(directory / name, record, config_path)
        model.tokenizer = tokenizer
    model.checkpoint_path = directory
    return model.to(device).eval()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, a run directory (see `picollm.rundir.model_dir`), or a
    Hugging Face repo id."""
    directory = Path(path).expanduser()
    if directory.is_dir():
        return model_dir(directory)
    if is_repo_id(str(path)):
        return download(str(path))
    raise UserError(f"checkpoint {path} does not exist; pass a run directory, a checkpoint directory "
                    "or a Hugging Face repo id (user/name)")


def load(path: str | Path, device: str | torch.device = "cpu") -> LanguageModel:
    """`picollm.load`: a trained model, with its tokenizer as `model.tokenizer`. `device`: cpu, cuda, cuda:N,
    mps or auto (a UserError naming these for any other)."""
    device = resolve_device(device)  # before anything is read: an unknown or absent device is the user's
    return load_model(resolve_checkpoint(path), device=device)
