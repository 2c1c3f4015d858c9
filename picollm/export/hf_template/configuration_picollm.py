"""Configurations of picollm models for Hugging Face `transformers` (copied here by `picollm export`).

One class per picollm family. The fields are picollm's own (`picollm.models.*Config`), so config.json
reads like the `model:` section of the picollm recipe that trained the model.
"""

from transformers import PreTrainedConfig


class PicollmTransformerConfig(PreTrainedConfig):
    """GPT-2-style decoder: see `norm_type`, `norm`, `pos` and `activation` for the choices."""

    model_type = "picollm_transformer"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
                     "max_position_embeddings": "context_length"}

    vocab_size: int = 50257
    context_length: int = 256  # the most positions the model can attend to
    d_model: int = 128
    n_heads: int = 2
    n_layers: int = 2
    norm_type: str = "rmsnorm"  # rmsnorm | layernorm
    norm: str = "pre"  # pre: x + f(norm(x)), and a final norm; post: norm(x + f(x))
    pos: str = "absolute"  # absolute (learned table) | rope | nope (no positions)
    bias: bool = True  # biases of the linear layers (and of LayerNorm)
    activation: str = "gelu"  # gelu (exact) | gelu_tanh (GPT-2's approximation)
    rope_base: float = 10000.0
    tie_word_embeddings: bool = True


class PicollmLSTMConfig(PreTrainedConfig):
    """Token embedding -> stacked LSTM -> output layer."""

    model_type = "picollm_lstm"
    attribute_map = {"num_hidden_layers": "n_layers"}

    vocab_size: int = 50257
    context_length: int = 256  # the training window; the LSTM itself has no limit
    embed_dim: int = 64
    hidden_size: int = 64
    n_layers: int = 1
    tie_word_embeddings: bool = False


class PicollmKGramConfig(PreTrainedConfig):
    """The previous k tokens -> MLP -> next-token logits."""

    model_type = "picollm_kgram"

    vocab_size: int = 50257
    context_length: int = 256  # the training window; the prediction sees the last k tokens only
    k: int = 3
    input: str = "scaled"  # scaled (one shared embedding x sqrt(embed_dim)) | onehot (a table per position)
    embed_dim: int = 64
    inner_layers: int = 3
    hidden_size: int = 64
    tie_word_embeddings: bool = False
