"""The Hugging Face hub: upload an exported model directory; download a checkpoint to load.

Only `config.json`, `model.safetensors` and tokenizer JSON files are fetched: nothing that runs code (a
repo `picollm push` made also holds the transformers model code, which picollm never downloads).
`huggingface_hub` is imported where it is used: it takes longer to import than the rest of the CLI.
"""

from __future__ import annotations

from pathlib import Path

from picollm.errors import UserError

ALLOWED_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"]


def is_repo_id(text: str) -> bool:
    """Whether `text`, given where a path or a hub repo may go, names a repo (`user/name`): one slash,
    not a path (relative with a dot, absolute, home) and nothing at that path on disk."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def upload(folder: str | Path, repo_id: str, private: bool = False, message: str = "Upload picollm model") -> str:
    """Upload every file of `folder` to the model repo `repo_id` (created if missing); returns its URL.

    `picollm push` uploads what `picollm export` writes (picollm.export.hf.push), so a repo made by picollm
    loads with transformers' `from_pretrained` and with `picollm.load`.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
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
