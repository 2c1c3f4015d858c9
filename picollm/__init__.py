"""picollm: train, evaluate and compare small language models on TinyStories."""

from __future__ import annotations

from typing import Any

from picollm.errors import UserError
from picollm.models.base import LanguageModel, ModelConfig
from picollm.models.registry import build_model, register_model

__version__ = "0.1.0"

__all__ = [
    "LanguageModel",
    "ModelConfig",
    "UserError",
    "build_model",
    "evaluate",
    "load",
    "register_model",
    "train",
    "__version__",
]


def load(path: str, device: str = "cpu") -> LanguageModel:
    """Load a trained model from a run directory, a checkpoint directory or a hub repo id."""
    from picollm.checkpoint import load as _load

    return _load(path, device=device)


def train(config: Any, **kwargs: Any) -> Any:
    """Train a model from a `RunConfig` (or a dict in the YAML layout); returns the finished run."""
    from picollm.training.trainer import train as _train

    return _train(config, **kwargs)


def evaluate(model: Any, **kwargs: Any) -> Any:
    """NLL, perplexity and bits per byte of a model; see `picollm.evaluation.evaluate`."""
    from picollm.evaluation import evaluate as _evaluate

    return _evaluate(model, **kwargs)
