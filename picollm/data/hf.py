"""Hugging Face `datasets` as a story source (`hf:NAME`): the hub's datasets, or a folder saved with
`save_to_disk`, failing at once with one clear error when there is no network."""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from picollm.errors import UserError

NO_NETWORK_FIX = "pass a local file or folder with --data.data PATH (e.g. TinyStories-train.txt)"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy can tell; let datasets try

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _env_offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=4)  # `prepare` reads a source two or three times
def load_hf_dataset(name: str, split: str) -> Any:
    """A `datasets.Dataset`: a folder saved with `save_to_disk`, or `load_dataset(name, split=split)`.

    Without network (and the dataset not in the local Hugging Face cache) this fails at once with one
    clear UserError, instead of datasets' retries. `datasets` is imported here: importing it takes longer
    than the rest of picollm, and only hf: sources need it.
    """
    import datasets
    import huggingface_hub.constants as hub_constants

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    local = Path(name).expanduser()
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        try:
            ds = datasets.load_from_disk(str(local))
        except Exception as exc:
            raise UserError(f"cannot load the saved dataset {local} ({one_line(exc)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{local} has no split '{split}' (splits: {', '.join(ds)}); "
                                "pass --data.hf_split NAME")
            ds = ds[split]
        return ds
    offline = _env_offline() or (not local.exists() and not _hub_reachable())
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    if offline:
        # Served from the local cache when there; otherwise datasets fails at once instead of retrying.
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:
        if offline:
            raise UserError(f"cannot load hf:{name}: no network access and it is not in the local "
                            f"Hugging Face cache ({one_line(exc)}); {NO_NETWORK_FIX}") from None
        raise UserError(f"cannot load hf:{name} split '{split}' ({type(exc).__name__}: {one_line(exc)}); "
                        f"check the name and --data.hf_split, or {NO_NETWORK_FIX}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
