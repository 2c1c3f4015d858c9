"""Model registry: family name -> config dataclass, module and size presets.

The built-in families (lstm, kgram, transformer) register themselves on import. A user's family plugs
in from their own code with `picollm.register_model(...)`, or from an installed package through the
`picollm.models` entry-point group (the entry point names a callable that registers the family).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from picollm.errors import UserError
from picollm.models.base import LanguageModel, ModelConfig
from picollm.schema import from_dict

BUILTIN_MODULES = ("picollm.models.lstm", "picollm.models.kgram", "picollm.models.transformer")
PRESET_NAMES = ("pico", "tiny", "small", "base")


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type[ModelConfig]
    model_cls: type[LanguageModel]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # width -> config fields: the knob the parameter solver turns (None: the family cannot be solved)
    scale: Callable[[int], dict[str, Any]] | None = None
    description: str = ""


_FAMILIES: dict[str, Family] = {}
_loaded = False


def register_model(name: str, config_cls: type[ModelConfig], model_cls: type[LanguageModel],
                   presets: dict[str, dict[str, Any]] | None = None,
                   scale: Callable[[int], dict[str, Any]] | None = None, description: str = "") -> Family:
    """Make a family available to every picollm command and API under `name`."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, ModelConfig)):
        raise TypeError(f"{name}: config_cls must be a subclass of picollm.ModelConfig")
    if not (isinstance(model_cls, type) and issubclass(model_cls, LanguageModel)):
        raise TypeError(f"{name}: model_cls must be a subclass of picollm.LanguageModel")
    if not model_cls.__dict__.get("family"):
        # the class's own name for it: a model built directly, not through the registry, saves loadably
        model_cls.family = name
    family = Family(name, config_cls, model_cls, dict(presets or {}), scale, description)
    _FAMILIES[name] = family
    return family


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group="picollm.models"):
        ep.load()()


def families() -> list[Family]:
    _load_builtins()
    return list(_FAMILIES.values())


def get_family(name: str) -> Family:
    _load_builtins()
    if name not in _FAMILIES:
        raise UserError(f"unknown model family '{name}'; known families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def model_config_from_dict(data: dict[str, Any]) -> tuple[Family, ModelConfig]:
    """`{"family": "lstm", "hidden_size": 64, ...}` -> (family, validated config)."""
    if not isinstance(data, dict) or "family" not in data:
        raise UserError("config section 'model' needs a 'family' key (e.g. family: transformer)")
    fields = dict(data)
    family = get_family(str(fields.pop("family")))
    return family, from_dict(family.config_cls, fields, prefix="model")


def model_config_to_dict(family: str, config: ModelConfig) -> dict[str, Any]:
    return {"family": family, **dataclasses.asdict(config)}


def preset_fields(preset: str) -> dict[str, Any]:
    """'transformer-pico' -> {"family": "transformer", **that preset's fields}."""
    name, _, size = preset.rpartition("-")
    if not name:
        raise UserError(f"preset '{preset}' should look like FAMILY-SIZE, e.g. transformer-pico")
    family = get_family(name)
    if size not in family.presets:
        raise UserError(f"family '{name}' has no preset '{size}'; it has: {', '.join(family.presets)}")
    return {"family": name, **family.presets[size]}


def build_model(spec: dict[str, Any]) -> LanguageModel:
    """Build an untrained model from `{"family": ..., **fields}` (fields default to the config's)."""
    family, config = model_config_from_dict(spec)
    model = family.model_cls(config)
    if model.family != family.name:  # a class registered under a second name
        model.family = family.name
    return model
