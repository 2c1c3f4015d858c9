"""The Hugging Face hub: upload a run's final checkpoint with a model card; download one to load.

Only `config.json`, `model.safetensors` and tokenizer JSON files are fetched: nothing that runs code.
`huggingface_hub` is imported where it is used: it takes longer to import than the rest of the CLI.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from picollm import rundir
from picollm.errors import UserError

ALLOWED_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"]


def model_card(checkpoint: Path, run: Path | None) -> str:
    """A README.md for the hub: family, parameters, data, recipe, final metrics."""
    config = json.loads((checkpoint / rundir.MODEL_CONFIG).read_text(encoding="utf-8"))
    summary: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    if run is not None and (run / rundir.SUMMARY).is_file():
        summary = json.loads((run / rundir.SUMMARY).read_text(encoding="utf-8"))
    if run is not None and (run / rundir.CONFIG).is_file():
        recipe = yaml.safe_load((run / rundir.CONFIG).read_text(encoding="utf-8"))
    model = config["model"]
    lines = [
        "---", "library_name: picollm", "tags: [picollm, tinystories, " + model["family"] + "]",
        "datasets: [roneneldan/TinyStories]", "---", "",
        f"# picollm {model['family']} ({config['num_parameters']:,} parameters)", "",
        "A small language model trained with [picollm](https://pypi.org/project/picollm/). Load it with:", "",
        "```python", "import picollm", "model = picollm.load(\"REPO_ID\")",
        "print(model.generate(\"Once upon a time\", strategy=\"top-p\", top_p=0.9)[0])", "```", "",
        "## Model", "", "| field | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in model.items()],
        f"| parameters | {config['num_parameters']:,} |",
        f"| non-embedding parameters | {config['num_parameters_non_embedding']:,} |",
        f"| tokenizer | {config.get('tokenizer', 'none')} |", "",
    ]
    if recipe:
        lines += ["## Data and recipe", "", "```yaml",
                  yaml.safe_dump({"data": recipe.get("data"), "train": recipe.get("train")}, sort_keys=False),
                  "```", ""]
    if summary:
        lines += ["## Final metrics", "", "| split | NLL (nats/token) | perplexity | bits per byte |",
                  "|---|---|---|---|"]
        for split in ("train", "val", "test"):
            if split in summary:
                m = summary[split]
                bpb = f"{m['bpb']:.4f}" if m.get("bpb") is not None else "-"
                lines.append(f"| {split} | {m['nll']:.4f} | {m['ppl']:.2f} | {bpb} |")
        lines += ["", f"Trained on {summary.get('tokens_seen', 0):,} tokens in {summary.get('wall_time_s', 0):.0f} s "
                  f"({summary.get('device', '?')})."]
    return "\n".join(lines) + "\n"


def push(path: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload the final checkpoint of a run (or a checkpoint directory) to `repo_id`; returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    source = Path(path).expanduser()
    if not source.is_dir():
        raise UserError(f"{path} is not a directory; pass a run directory or a checkpoint directory")
    checkpoint = rundir.model_dir(source)
    run = source if (source / rundir.CONFIG).is_file() else None
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        for name in ALLOWED_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, staging / name)
        (staging / "README.md").write_text(model_card(checkpoint, run).replace("REPO_ID", repo_id), encoding="utf-8")
        api = HfApi()
        try:
            api.create_repo(repo_id, exist_ok=True, private=private)
            api.upload_folder(folder_path=str(staging), repo_id=repo_id,
                              commit_message="Upload picollm checkpoint")
        except (HfHubHTTPError, OSError) as exc:
            raise UserError(f"could not upload to the hub repo '{repo_id}': {str(exc).splitlines()[0]}; "
                            "check your network and `huggingface-cli login`") from None
    return f"https://huggingface.co/{repo_id}"


def download(repo_id: str) -> Path:
    """Fetch (or find in the local cache) a checkpoint repo; honours HF_HUB_OFFLINE=1."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOWED_FILES))
    except LocalEntryNotFoundError:
        raise UserError(f"'{repo_id}' is not a local path, and the hub cannot be reached and has no cached copy; "
                        "connect to the network or pass a local checkpoint directory") from None
    except HFValidationError:
        raise UserError(f"'{repo_id}' is neither a local path nor a valid hub repo id (user/name)") from None
    except HfHubHTTPError as exc:
        raise UserError(f"could not download '{repo_id}' from the hub: {str(exc).splitlines()[0]}") from None
