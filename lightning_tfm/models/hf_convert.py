"""Convert Hugging Face transformers checkpoints into our assemblies with the same outputs (GPT-2 to
`DecoderOnly`, BERT to `EncoderOnly`, Marian to `EncoderDecoder`), from a model instance's config and state_dict
or a directory's config.json and safetensors; transformers is never imported here."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_tfm.blocks.attention import MultiHeadAttention
from lightning_tfm.blocks.feedforward import GELUFeedForward, ReLUFeedForward, SiLUFeedForward
from lightning_tfm.blocks.norms import LayerNorm
from lightning_tfm.blocks.positions import LearnedPositions, SinusoidalPositions
from lightning_tfm.models.class_paths import as_config, class_path
from lightning_tfm.models.decoder_only import DecoderOnly
from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.models.encoder_only import EncoderOnly
from lightning_tfm.models.stacks import FeedForwardFactory

logger = logging.getLogger(__name__)

Converted = DecoderOnly | EncoderOnly | EncoderDecoder

# save_pretrained writes only the config values that differ from the class defaults, so a directory's
# config.json is read on top of these (copied from transformers 5.24's GPT2Config, BertConfig, MarianConfig)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "activation_function": "gelu_new", "resid_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5,
             "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
             "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
             "layer_norm_eps": 1e-12, "is_decoder": False, "add_cross_attention": False,
             "position_embedding_type": "absolute"},
    "marian": {"vocab_size": 58101, "max_position_embeddings": 1024, "encoder_layers": 12, "encoder_ffn_dim": 4096,
               "encoder_attention_heads": 16, "decoder_layers": 12, "decoder_ffn_dim": 4096,
               "decoder_attention_heads": 16, "activation_function": "gelu", "d_model": 1024, "dropout": 0.1,
               "attention_dropout": 0.0, "activation_dropout": 0.0, "scale_embedding": False},
}
# where the backbone sits inside the task models (GPT2LMHeadModel.transformer, BertForMaskedLM.bert, ...)
_PREFIXES = {"gpt2": "transformer.", "bert": "bert.", "marian": "model."}
# weights left behind on purpose: task heads we have no block for, and buffers older versions saved
_DROPPED = {
    "gpt2": r"(multiple_choice_head|score|qa_outputs|classifier)\.|h\.\d+\.attn\.(masked_)?bias$",
    "bert": r"(pooler|cls|classifier|qa_outputs)\.|embeddings\.(position_ids|token_type_ids)$",
}


def from_huggingface(model_or_dir: nn.Module | str | os.PathLike) -> Converted:
    """Build our model with a Hugging Face model's weights and the same outputs (tested against transformers).

    GPT-2 (`GPT2Model`, `GPT2LMHeadModel`) becomes a pre-norm `DecoderOnly`; BERT (`BertModel`,
    `BertForMaskedLM`, `BertForSequenceClassification`, ...) an `EncoderOnly` backbone, dropping the pooler and
    task heads (logged); Marian (`MarianModel`, `MarianMTModel`) a post-norm `EncoderDecoder`.

    The model records what it was built from in `model.architecture` (a class_path config) and, for a
    `BertForSequenceClassification`, its pooler and classifier in `model.classification_head` under
    `ClassificationHead`'s names (`pooler.*`, `classifier.*`): with `pooling="cls"` and `pooler=True` that head
    computes what BERT's does (tested). Otherwise `classification_head` is empty.

    Args:
        model_or_dir: a transformers model instance, or a directory holding `config.json` and
            `model.safetensors` (or a sharded `model.safetensors.index.json`), as `save_pretrained` writes it.
    Returns:
        the converted model, in eval mode like `from_pretrained`'s.
    Raises:
        ValueError: the model type is not supported, its config asks for something our blocks cannot
            compute, or its weights do not match the expected names and shapes.
        FileNotFoundError: the directory lacks config.json or safetensors weights.
    """
    model_type, config, state = _read(model_or_dir)
    config = {**_DEFAULTS[model_type], **config}
    weights = _Weights(state, model_type)
    model, converted = _CONVERTERS[model_type](config, weights)
    head = _classification_head(weights)
    weights.check_all_used()
    _load(model, converted, model_type)
    model.classification_head = head
    return model.eval()


def _classification_head(weights: _Weights) -> dict[str, Tensor]:
    """BERT's sequence-classification head (pooler, classifier) under `ClassificationHead`'s names, or {}."""
    if weights.model_type != "bert" or "classifier.weight" not in weights.state:
        return {}
    return {"pooler.weight": weights("pooler.dense.weight"), "pooler.bias": weights("pooler.dense.bias"),
            "classifier.weight": weights("classifier.weight"), "classifier.bias": weights("classifier.bias")}


def _read(model_or_dir: nn.Module | str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """(model type, config dict, HF state dict) from a model instance or a save_pretrained directory."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = Path(model_or_dir)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} does not exist; pass a directory written by save_pretrained")
        config = json.loads(config_file.read_text())
        return _model_type(config), config, _read_weights(path)   # the type is checked before the weights load
    if not isinstance(model_or_dir, nn.Module) or not hasattr(model_or_dir, "config"):
        raise TypeError(f"from_huggingface: expected a transformers model or a directory, got "
                        f"{type(model_or_dir).__name__}")
    config = model_or_dir.config.to_dict()
    return _model_type(config), config, model_or_dir.state_dict()


def _model_type(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type not in _CONVERTERS:
        raise ValueError(f"from_huggingface: model_type={model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(_CONVERTERS))}")
    return model_type


def _read_weights(path: Path) -> dict[str, Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json; "
                                "pytorch_model.bin is not read (unpickling runs arbitrary code)")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


class _Weights:
    """The HF state dict with the backbone prefix stripped; remembers which weights were taken."""

    def __init__(self, state: dict[str, Tensor], model_type: str) -> None:
        prefix = _PREFIXES[model_type]
        self.state = {k.removeprefix(prefix): v for k, v in state.items()}
        self.model_type, self.used = model_type, set()

    def __call__(self, key: str) -> Tensor:
        if key not in self.state:
            raise ValueError(f"{self.model_type}: the checkpoint has no weight {key!r}; it has "
                             f"{len(self.state)} others, e.g. {sorted(self.state)[:5]}")
        self.used.add(key)
        return self.state[key]

    def first(self, *keys: str) -> Tensor:
        """The first of `keys` the checkpoint has. The others are marked as read too: they are tied copies
        that save_pretrained may leave out, or Marian's `shared`, which transformers 5 leaves unused when
        tie_word_embeddings=False."""
        present = [k for k in keys if k in self.state]
        if not present:
            raise ValueError(f"{self.model_type}: the checkpoint has none of the weights {list(keys)}")
        self.used.update(present)
        return self.state[present[0]]

    def check_all_used(self) -> None:
        left = [k for k in self.state if k not in self.used]
        pattern = _DROPPED.get(self.model_type)
        dropped = [k for k in left if pattern and re.match(pattern, k)]
        unknown = sorted(set(left) - set(dropped))
        if unknown:
            raise ValueError(f"{self.model_type}: weights our model has no place for: {unknown}")
        if dropped:
            logger.info("from_huggingface(%s): dropped %d head weights: %s", self.model_type, len(dropped), dropped)


def _load(model: nn.Module, state: dict[str, Tensor], model_type: str) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{model_type} -> {type(model).__name__}: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:           # shape mismatches
        raise ValueError(f"{model_type} -> {type(model).__name__}: {e}") from e


def _build(cls: type[nn.Module], vocab_size: int, **kwargs: Any) -> nn.Module:
    """`cls(vocab_size, **kwargs)`, remembering its arguments as a `class_path` config in `model.architecture`,
    so a model fine-tuned from a converted one is rebuilt from its own checkpoint or export, without the
    Hugging Face directory."""
    model = cls(vocab_size, **kwargs)
    model.architecture = {"class_path": class_path(cls),
                          "init_args": {name: as_config(value) for name, value in kwargs.items()}}
    return model


def _require(config: dict[str, Any], model_type: str, **wanted: Any) -> None:
    """Reject config values our blocks cannot compute, naming the key."""
    for key, want in wanted.items():
        if config[key] != want:
            raise ValueError(f"{model_type}: config {key}={config[key]!r} is not supported; "
                             f"the converter needs {key}={want!r}")


def _feedforward(config: dict[str, Any], key: str, dropout: float = 0.0) -> FeedForwardFactory:
    """The feed-forward block for HF's activation name in config[key] (transformers' ACT2FN)."""
    act = config[key]
    if act in ("gelu_new", "gelu_pytorch_tanh"):
        return partial(GELUFeedForward, dropout=dropout, approximate="tanh")
    if act == "gelu":
        return partial(GELUFeedForward, dropout=dropout, approximate="none")
    if act in ("swish", "silu"):
        return partial(SiLUFeedForward, dropout=dropout)
    if act == "relu":
        return partial(ReLUFeedForward, dropout=dropout)
    raise ValueError(f"config {key}={act!r} is not supported; supported: gelu, gelu_new, gelu_pytorch_tanh, "
                     "relu, silu, swish")


def _affine(w: _Weights, src: str, dst: str, transpose: bool = False) -> dict[str, Tensor]:
    """A Linear or LayerNorm's weight and bias; GPT-2's Conv1D stores the weight as (in, out): transpose."""
    weight = w(f"{src}.weight")
    return {f"{dst}.weight": weight.t() if transpose else weight, f"{dst}.bias": w(f"{src}.bias")}


def _fused_qkv(w: _Weights, srcs: tuple[str, str, str], dst: str) -> dict[str, Tensor]:
    """Separate q, k, v Linears -> our fused qkv Linear, rows [q; k; v] (3C, C)."""
    return {f"{dst}.weight": torch.cat([w(f"{s}.weight") for s in srcs]),
            f"{dst}.bias": torch.cat([w(f"{s}.bias") for s in srcs])}


_GPT2_LAYER = {"ln_1": "attention_residual.norm", "attn.c_attn": "attention.qkv", "attn.c_proj": "attention.out",
               "ln_2": "feedforward_residual.norm", "mlp.c_fc": "feedforward.fc1", "mlp.c_proj": "feedforward.fc2"}


def _gpt2(c: dict[str, Any], w: _Weights) -> tuple[DecoderOnly, dict[str, Tensor]]:
    _require(c, "gpt2", scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    tokens = w("wte.weight")
    output = w.first("lm_head.weight", "wte.weight")    # GPT2Model and save_pretrained have no lm_head
    tied = torch.equal(output, tokens)
    model = _build(
        DecoderOnly, c["vocab_size"], d_model=c["n_embd"], n_layers=c["n_layer"], n_heads=c["n_head"],
        d_ff=c["n_inner"] or 4 * c["n_embd"], dropout=c["resid_pdrop"],
        attention=partial(MultiHeadAttention, dropout=c["attn_pdrop"]),
        feedforward=_feedforward(c, "activation_function"), norm=partial(LayerNorm, eps=c["layer_norm_epsilon"]),
        positions=partial(LearnedPositions, max_len=c["n_positions"]), norm_placement="pre", tie_embeddings=tied)
    state = {"embedding.tokens.weight": tokens, "embedding.positions.table.weight": w("wpe.weight"),
             "output.weight": output,
             **_affine(w, "ln_f", "stack.final_norm")}
    for i in range(c["n_layer"]):
        for theirs, ours in _GPT2_LAYER.items():     # Conv1D weights are (in, out): transpose all but the norms
            state |= _affine(w, f"h.{i}.{theirs}", f"stack.layers.{i}.{ours}", transpose=not theirs.startswith("ln"))
    return model, state


_BERT_LAYER = {"attention.output.dense": "attention.out", "attention.output.LayerNorm": "attention_residual.norm",
               "intermediate.dense": "feedforward.fc1", "output.dense": "feedforward.fc2",
               "output.LayerNorm": "feedforward_residual.norm"}


def _bert(c: dict[str, Any], w: _Weights) -> tuple[EncoderOnly, dict[str, Tensor]]:
    _require(c, "bert", is_decoder=False, add_cross_attention=False, position_embedding_type="absolute")
    model = _build(
        EncoderOnly, c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"], d_ff=c["intermediate_size"], dropout=c["hidden_dropout_prob"],
        attention=partial(MultiHeadAttention, dropout=c["attention_probs_dropout_prob"]),
        feedforward=_feedforward(c, "hidden_act"), norm=partial(LayerNorm, eps=c["layer_norm_eps"]),
        positions=partial(LearnedPositions, max_len=c["max_position_embeddings"]), norm_placement="post",
        n_segments=c["type_vocab_size"], embedding_norm=True)
    state = {"embedding.tokens.weight": w("embeddings.word_embeddings.weight"),
             "embedding.positions.table.weight": w("embeddings.position_embeddings.weight"),
             "embedding.segments.weight": w("embeddings.token_type_embeddings.weight"),
             **_affine(w, "embeddings.LayerNorm", "embedding.norm")}
    for i in range(c["num_hidden_layers"]):
        src, dst = f"encoder.layer.{i}", f"stack.layers.{i}"
        qkv = tuple(f"{src}.attention.self.{name}" for name in ("query", "key", "value"))
        state |= _fused_qkv(w, qkv, f"{dst}.attention.qkv")
        for theirs, ours in _BERT_LAYER.items():
            state |= _affine(w, f"{src}.{theirs}", f"{dst}.{ours}")
    return model, state


# Marian's layer sub-modules -> ours: attention blocks, then the Linears and LayerNorms around them
_MARIAN_ATTENTION = {"encoder": {"self_attn": "attention"},
                     "decoder": {"self_attn": "self_attention", "encoder_attn": "cross_attention"}}
_FEEDFORWARD = {"fc1": "feedforward.fc1", "fc2": "feedforward.fc2", "final_layer_norm": "feedforward_residual.norm"}
_MARIAN_AFFINE = {"encoder": {"self_attn_layer_norm": "attention_residual.norm", **_FEEDFORWARD},
                  "decoder": {"self_attn_layer_norm": "self_attention_residual.norm",
                              "encoder_attn_layer_norm": "cross_attention_residual.norm", **_FEEDFORWARD}}


def _marian(c: dict[str, Any], w: _Weights) -> tuple[EncoderDecoder, dict[str, Tensor]]:
    # transformers 5.24's Marian is post-norm with no final or embedding LayerNorm (unlike BART/mBART)
    for enc, dec in (("encoder_ffn_dim", "decoder_ffn_dim"), ("encoder_attention_heads", "decoder_attention_heads")):
        if c[enc] != c[dec]:
            raise ValueError(f"marian: config {enc}={c[enc]} differs from {dec}={c[dec]}; EncoderDecoder "
                             "uses one value for both stacks")
    # sharing is read from the weights HF computes with: transformers 5 unties encoder, decoder and lm_head
    # when tie_word_embeddings=False, whatever share_encoder_decoder_embeddings says
    src = w.first("encoder.embed_tokens.weight", "shared.weight")
    tgt = w.first("decoder.embed_tokens.weight", "shared.weight")
    output = w.first("lm_head.weight", "decoder.embed_tokens.weight", "shared.weight")
    shared = src.shape == tgt.shape and torch.equal(src, tgt)
    tied = torch.equal(output, tgt)
    attention = partial(MultiHeadAttention, dropout=c["attention_dropout"])
    model = _build(
        EncoderDecoder, c["vocab_size"], d_model=c["d_model"], n_layers=c["encoder_layers"],
        n_heads=c["encoder_attention_heads"],
        d_ff=c["encoder_ffn_dim"], dropout=c["dropout"], attention=attention, cross_attention=attention,
        feedforward=_feedforward(c, "activation_function", c["activation_dropout"]),
        norm=partial(LayerNorm, eps=1e-5),   # Marian's nn.LayerNorm default; the config has no eps key
        positions=partial(SinusoidalPositions, max_len=c["max_position_embeddings"], layout="split"),
        norm_placement="post", tgt_vocab_size=len(tgt),
        share_embeddings=shared, tie_embeddings=tied, scale_embeddings=c["scale_embedding"], output_bias=True,
        n_decoder_layers=c["decoder_layers"])
    bias = w("final_logits_bias").reshape(-1) if "final_logits_bias" in w.state else torch.zeros(len(tgt))
    state = {"src_embedding.tokens.weight": src, "tgt_embedding.tokens.weight": tgt, "output.bias": bias,
             "output.weight": output}
    for side, n_layers, embedding in (("encoder", c["encoder_layers"], model.src_embedding),
                                      ("decoder", c["decoder_layers"], model.tgt_embedding)):
        _check_sinusoids(w, f"{side}.embed_positions.weight", embedding.positions)
        for i in range(n_layers):
            layer = f"{side}.layers.{i}"                  # the same path in both models
            for theirs, ours in _MARIAN_ATTENTION[side].items():
                state |= _fused_qkv(w, tuple(f"{layer}.{theirs}.{x}_proj" for x in "qkv"), f"{layer}.{ours}.qkv")
                state |= _affine(w, f"{layer}.{theirs}.out_proj", f"{layer}.{ours}.out")
            for theirs, ours in _MARIAN_AFFINE[side].items():
                state |= _affine(w, f"{layer}.{theirs}", f"{layer}.{ours}")
    return model, state


def _check_sinusoids(w: _Weights, key: str, positions: SinusoidalPositions) -> None:
    """Marian's frozen table must be our split sinusoids (instances have it; save_pretrained drops it)."""
    if key not in w.state:
        return
    theirs, ours = w(key).float(), positions.table
    diff = (theirs - ours).abs().max().item() if theirs.shape == ours.shape else float("inf")
    if diff > 1e-4:
        raise ValueError(f"marian: {key} differs from SinusoidalPositions(layout='split') by up to {diff:.3g}")


_CONVERTERS: dict[str, Callable[[dict[str, Any], _Weights], tuple[Converted, dict[str, Tensor]]]] = {
    "gpt2": _gpt2, "bert": _bert, "marian": _marian,
}
