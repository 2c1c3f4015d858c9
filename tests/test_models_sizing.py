"""Parameter counts in closed form, the presets' sizes, the solver, and `picollm models`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from picollm.cli import main
from picollm.errors import UserError
from picollm.models.registry import build_model, families, preset_fields
from picollm.models.sizing import count_parameters, parse_count, solve

GPT2_VOCAB = 50257
NOMINAL = {"pico": 3.2e6, "tiny": 7e6, "small": 30e6, "base": 110e6}
BUILTIN = ("lstm", "kgram", "transformer")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"


# ---------------------------------------------------------------------------------------------
# closed forms


def lstm_count(V, E, H, L, **_):
    """embedding V E; per layer 4 gates x (input weights + recurrent weights + two biases); output H V + V."""
    layers = sum(4 * H * ((E if i == 0 else H) + H) + 8 * H for i in range(L))
    return V * E + layers + H * V + V, layers


def kgram_count(V, E, H, inner, k=3, onehot=False, **_):
    """(V + 1) rows (padding id) per table, k tables for onehot; MLP; output (width x V + V)."""
    embedding = (k if onehot else 1) * (V + 1) * E
    mlp, width = 0, k * E
    for _ in range(inner):
        mlp += width * H + H
        width = H
    return embedding + mlp + width * V + V, mlp


def transformer_count(V, d, L, T=256, pos="absolute", norm_type="rmsnorm", norm="pre", tied=True,
                      bias=True, **_):
    """wte V d (+ wpe T d); per block: qkv 3d^2, proj d^2, fc 4d^2, proj 4d^2 (+ biases 3d + d + 4d + d) and
    two norms (d each, + d bias for LayerNorm with bias); a final norm for pre-norm; untied output V d."""
    norm_params = d * (2 if norm_type == "layernorm" and bias else 1)
    block = 12 * d * d + (9 * d if bias else 0) + 2 * norm_params
    non_embedding = L * block + (norm_params if norm == "pre" else 0)
    embedding = V * d + (T * d if pos == "absolute" else 0) + (0 if tied else V * d)
    return embedding + non_embedding, non_embedding


CASES = [
    ({"family": "lstm", "embed_dim": 24, "hidden_size": 32, "n_layers": 1},
     lambda V: lstm_count(V, 24, 32, 1)),
    ({"family": "lstm", "embed_dim": 16, "hidden_size": 8, "n_layers": 3},
     lambda V: lstm_count(V, 16, 8, 3)),
    ({"family": "kgram", "embed_dim": 8, "hidden_size": 20, "inner_layers": 3},
     lambda V: kgram_count(V, 8, 20, 3)),
    ({"family": "kgram", "embed_dim": 8, "hidden_size": 20, "inner_layers": 2, "input": "onehot", "k": 4},
     lambda V: kgram_count(V, 8, 20, 2, k=4, onehot=True)),
    ({"family": "kgram", "embed_dim": 8, "inner_layers": 0, "k": 2}, lambda V: kgram_count(V, 8, 64, 0, k=2)),
    ({"family": "transformer", "d_model": 32, "n_heads": 2, "n_layers": 3},
     lambda V: transformer_count(V, 32, 3)),
    ({"family": "transformer", "d_model": 32, "n_heads": 4, "n_layers": 2, "pos": "rope", "norm": "post",
      "norm_type": "layernorm"},
     lambda V: transformer_count(V, 32, 2, pos="rope", norm="post", norm_type="layernorm")),
    ({"family": "transformer", "d_model": 48, "n_heads": 3, "n_layers": 1, "tie_embeddings": False,
      "bias": False, "norm_type": "layernorm", "pos": "nope"},
     lambda V: transformer_count(V, 48, 1, tied=False, bias=False, norm_type="layernorm", pos="nope")),
]


@pytest.mark.parametrize("spec,formula", CASES)
def test_counts_match_the_closed_form(spec, formula):
    total, non_embedding = formula(97)
    model = build_model({**spec, "vocab_size": 97})
    assert model.num_parameters() == total
    assert model.num_parameters(non_embedding=True) == non_embedding
    assert count_parameters({**spec, "vocab_size": 97}) == total  # the meta-device count agrees


@pytest.mark.parametrize("family", BUILTIN)
@pytest.mark.parametrize("size", list(NOMINAL))
def test_presets_are_within_15_percent_of_nominal(family, size):
    spec = {**preset_fields(f"{family}-{size}"), "vocab_size": GPT2_VOCAB}
    with torch.device("meta"):  # shapes only: no memory even for 110M parameters
        model = build_model(spec)
    total = model.num_parameters()
    assert abs(total - NOMINAL[size]) / NOMINAL[size] < 0.15, total
    f = {k: v for k, v in spec.items() if k != "family"}
    expected = {
        "lstm": lambda: lstm_count(GPT2_VOCAB, f["embed_dim"], f["hidden_size"], f["n_layers"]),
        "kgram": lambda: kgram_count(GPT2_VOCAB, f["embed_dim"], f["hidden_size"], f["inner_layers"]),
        "transformer": lambda: transformer_count(GPT2_VOCAB, f["d_model"], f["n_layers"]),
    }[family]()
    assert (total, model.num_parameters(non_embedding=True)) == expected


def test_presets_follow_the_study_table():
    table = {("lstm", "embed_dim", "hidden_size"): [(32, 32), (64, 64), (256, 256)],
             ("kgram", "embed_dim", "inner_layers"): [(32, 1), (64, 3), (256, 5)],
             ("transformer", "d_model", "n_heads", "n_layers"): [(64, 1, 1), (128, 2, 2), (384, 6, 6),
                                                                 (768, 12, 12)]}
    for (family, *keys), rows in table.items():
        for size, row in zip(NOMINAL, rows, strict=False):
            fields = preset_fields(f"{family}-{size}")
            assert tuple(fields[k] for k in keys) == row, (family, size)
    assert all(preset_fields(f"lstm-{s}")["n_layers"] == 1 for s in NOMINAL)


def test_presets_work_with_any_vocab_and_context():
    for family in BUILTIN:
        model = build_model({**preset_fields(f"{family}-pico"), "vocab_size": 300, "context_length": 17})
        assert model(torch.zeros(1, 17, dtype=torch.long)).shape == (1, 17, 300)


# ---------------------------------------------------------------------------------------------
# the solver


@pytest.mark.parametrize("family", BUILTIN)
@pytest.mark.parametrize("target,vocab,non_embedding", [
    (3_200_000, GPT2_VOCAB, False), (30_000_000, GPT2_VOCAB, False), (110_000_000, GPT2_VOCAB, False),
    (5_000_000, 8000, False), (2_000_000, 512, False), (1_000_000, GPT2_VOCAB, True),
    (20_000_000, 8000, True),
])
def test_solver_lands_within_2_percent(family, target, vocab, non_embedding):
    fields = solve(family, target, vocab_size=vocab, non_embedding=non_embedding)
    assert fields["family"] == family and "vocab_size" not in fields
    achieved = count_parameters({**fields, "vocab_size": vocab}, non_embedding=non_embedding)
    assert abs(achieved - target) / target <= 0.02, (fields, achieved)


@pytest.mark.parametrize("family,base", [("kgram", {"input": "onehot", "k": 4, "inner_layers": 2}),
                                         ("transformer", {"n_layers": 4, "pos": "rope"}),
                                         ("lstm", {"n_layers": 2})])
def test_solver_keeps_fixed_fields(family, base):
    fields = solve(family, 12_000_000, vocab_size=16000, base=base)
    assert {k: fields[k] for k in base} == base
    achieved = count_parameters({**fields, "vocab_size": 16000})
    assert abs(achieved - 12_000_000) / 12_000_000 <= 0.02


def test_solver_reproduces_the_table_shape():
    assert solve("transformer", 30_000_000) == preset_fields("transformer-small")


def test_solver_errors():
    with pytest.raises(UserError, match="cannot reach"):
        solve("transformer", 10)  # smaller than one embedding column
    with pytest.raises(UserError, match="d_model"):
        solve("transformer", 3_000_000, base={"d_model": 64})
    with pytest.raises(UserError, match="unknown"):
        solve("lstm", 3_000_000, base={"heads": 2})
    with pytest.raises(UserError, match="model.n_layers"):
        solve("lstm", 3_000_000, base={"n_layers": "two"})
    with pytest.raises(UserError, match="unknown model family"):
        solve("gru", 3_000_000)


@pytest.mark.parametrize("text,value", [("3.2M", 3_200_000), ("110M", 110_000_000), ("7e6", 7_000_000),
                                        ("500K", 500_000), ("500k", 500_000), ("1.5B", 1_500_000_000),
                                        ("1_000_000", 1_000_000), ("42", 42), (" 2.5m ", 2_500_000),
                                        (1e6, 1_000_000)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "M", "abc", "3.2X", "-5M", "0", "inf", "1e400"])
def test_parse_count_rejects(text):
    with pytest.raises(UserError):
        parse_count(text)


# ---------------------------------------------------------------------------------------------
# the command line


def _builtin_rows(rows):
    return [r for r in rows if r["family"] in BUILTIN]


def test_cli_lists_the_12_presets(capsys):
    assert main(["models", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = _builtin_rows(result["presets"])
    assert len(rows) == 12 and result["vocab_size"] == GPT2_VOCAB
    assert {r["name"] for r in rows} == {f"{f}-{s}" for f in BUILTIN for s in NOMINAL}
    for r in rows:
        assert r["parameters"] > r["non_embedding_parameters"] > 0
        assert ("onehot_parameters" in r) == (r["family"] == "kgram")
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("lstm-pico", "kgram-base", "transformer-small", "onehot"))


def test_docs_table_matches_the_counts(capsys):
    main(["models", "--json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["presets"]}
    documented = re.findall(r"^\| (\w+-\w+) \|[^|]*\| ([\d,]+) \| ([\d,]+) \|\s*([\d,]*)\s*\|$",
                            DOCS.read_text(encoding="utf-8"), re.M)
    assert len(documented) == 12
    for name, total, non_embedding, onehot in documented:
        assert rows[name]["parameters"] == int(total.replace(",", ""))
        assert rows[name]["non_embedding_parameters"] == int(non_embedding.replace(",", ""))
        if onehot:
            assert rows[name]["onehot_parameters"] == int(onehot.replace(",", ""))


def test_cli_other_vocab_and_one_family(capsys):
    assert main(["models", "--vocab-size", "1000", "--family", "kgram", "--set", "k=2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["presets"]
    assert [r["preset"] for r in rows] == ["pico", "tiny", "small", "base"]
    assert rows[0]["parameters"] == kgram_count(1000, 32, 32, 1, k=2)[0]
    assert rows[0]["onehot_parameters"] == kgram_count(1000, 32, 32, 1, k=2, onehot=True)[0]


def test_cli_solves(capsys):
    assert main(["models", "--family", "lstm", "--params", "3.2M", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["parameters"] - 3_200_000) <= 64_000 and abs(result["relative_error"]) <= 0.02
    assert set(result["fields"]) == {"embed_dim", "hidden_size"}
    assert main(["models", "--family", "transformer", "--params", "2M", "--non-embedding", "--vocab-size",
                 "8000"]) == 0
    out = capsys.readouterr().out
    assert "d_model=" in out and "non-embedding" in out


@pytest.mark.parametrize("argv", [
    ["models", "--family", "lstm", "--params", "lots"],
    ["models", "--params", "3M"],
    ["models", "--family", "nope"],
    ["models", "--family", "transformer", "--params", "10"],
    ["models", "--family", "transformer", "--params", "1M", "--set", "d_model=32"],
    ["models", "--family", "lstm", "--params", "1M", "--set", "n_layers"],
    ["models", "--vocab-size", "many"],
    ["models", "--vocab-size", "1"],
    ["models", "--non-embedding"],
    ["models", "--set", "k=4"],
])
def test_cli_bad_input_is_one_line_and_code_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("picollm models: error:")


def test_family_without_scale_cannot_be_solved():
    from picollm.models import registry

    family = families()[0]
    registry.register_model("noscale-test", family.config_cls, family.model_cls)
    try:
        with pytest.raises(UserError, match="scale"):
            solve("noscale-test", 1_000_000)
    finally:
        registry._FAMILIES.pop("noscale-test")
