"""picollm: train, evaluate and compare small language models on TinyStories."""

from __future__ import annotations

from picollm._version import __version__
from picollm.checkpoint import load
from picollm.errors import UserError
from picollm.evaluation import evaluate
from picollm.models.base import LanguageModel, ModelConfig
from picollm.models.registry import build_model, register_model
from picollm.training.trainer import train

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
