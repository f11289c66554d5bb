"""Our trained translation checkpoint as an equivalent transformers `MarianMTModel` folder (`save_pretrained`), so
that transformers' `generate` and CTranslate2 decode the very weights ours decodes (scripts/decode_table.py).

    python scripts/export_marian.py runs/multi30k_small/checkpoints/best.ckpt --output exported/marian

It runs `lightning_tfm.models.hf_convert`'s Marian map backwards. Marian's sinusoids put every sine before every
cosine where ours interleave them (unless `layout: split`), so every residual-stream dimension is then permuted
(a relabelling of the basis: the model computes the same function). Only the architecture Marian has is
exported: post-norm layers with biases, ReLU feed-forward, sinusoidal positions, one embedding shared by source,
target and the output. The export is checked: the first decoding step's log-probabilities of the folder, read
back by `from_huggingface`, must match the checkpoint's to 1e-4."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from race_marian import Size, build_marian  # scripts/ is sys.path[0]
from torch import Tensor

from lightning_tfm.blocks.positions import SinusoidalPositions
from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.models.hf_convert import from_huggingface
from lightning_tfm.viz.trained import load_trained


def marian_state(model: EncoderDecoder) -> dict[str, Tensor]:
    """Marian's state dict holding `model`'s weights, residual-stream dimensions permuted to Marian's order."""
    s = {k: v.detach() for k, v in model.state_dict().items()}
    C = model.d_model
    positions = model.src_embedding.positions
    if not isinstance(positions, SinusoidalPositions):
        raise ValueError(f"Marian has sinusoidal positions; this model has {type(positions).__name__}")
    perm = torch.arange(C)                                               # Marian's dim j is our dim perm[j]
    if positions.layout == "interleaved":
        perm = torch.cat([torch.arange(0, C, 2), torch.arange(1, C, 2)])
    tokens = s["src_embedding.tokens.weight"]
    if not (torch.equal(tokens, s["tgt_embedding.tokens.weight"]) and torch.equal(tokens, s["output.weight"])):
        raise ValueError("Marian shares one embedding between source, target and output; this model does not")
    m = {k: tokens[:, perm] for k in ("model.shared.weight", "model.encoder.embed_tokens.weight",
                                      "model.decoder.embed_tokens.weight", "lm_head.weight")}
    m["final_logits_bias"] = torch.zeros(1, tokens.shape[0])

    def reads(src: str, dst: str) -> None:            # a linear map from the residual stream
        m[f"{dst}.weight"], m[f"{dst}.bias"] = s[f"{src}.weight"][:, perm], s[f"{src}.bias"]

    def writes(src: str, dst: str) -> None:           # a linear map or norm into the residual stream
        m[f"{dst}.weight"], m[f"{dst}.bias"] = s[f"{src}.weight"][perm], s[f"{src}.bias"][perm]

    def attention(src: str, dst: str) -> None:
        w, b = s[f"{src}.qkv.weight"][:, perm], s[f"{src}.qkv.bias"]
        for i, name in enumerate("qkv"):
            m[f"{dst}.{name}_proj.weight"], m[f"{dst}.{name}_proj.bias"] = w[i * C:(i + 1) * C], b[i * C:(i + 1) * C]
        writes(f"{src}.out", f"{dst}.out_proj")

    def block(src: str, dst: str, attentions: tuple[tuple[str, str], ...]) -> None:
        """One layer: its attention sub-layers (ours, Marian's name), then the feed-forward, each with its norm."""
        for ours, theirs in attentions:
            attention(f"{src}.{ours}", f"{dst}.{theirs}")
            writes(f"{src}.{ours}_residual.norm", f"{dst}.{theirs}_layer_norm")
        reads(f"{src}.feedforward.fc1", f"{dst}.fc1")
        writes(f"{src}.feedforward.fc2", f"{dst}.fc2")
        writes(f"{src}.feedforward_residual.norm", f"{dst}.final_layer_norm")

    for i in range(len(model.encoder.layers)):
        block(f"encoder.layers.{i}", f"model.encoder.layers.{i}", (("attention", "self_attn"),))
        block(f"decoder.layers.{i}", f"model.decoder.layers.{i}",
              (("self_attention", "self_attn"), ("cross_attention", "encoder_attn")))
    return m


def export(checkpoint: str | Path, output: str | Path) -> float:
    """Write the Marian folder; returns the largest first-step log-probability difference (checked < 1e-4)."""
    trained = load_trained(checkpoint)
    model, sp = trained.model.eval(), trained.specials
    size = Size(n_layers=len(model.encoder.layers), d_model=model.d_model,
                n_heads=model.encoder.layers[0].attention.n_heads,
                d_ff=model.encoder.layers[0].feedforward.fc1.out_features)
    marian = build_marian(size, model.vocab_size, sp.pad, sp.bos, sp.eos).eval()
    try:
        missing, unexpected = marian.load_state_dict(marian_state(model), strict=False)
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"{checkpoint}: not Marian's architecture ({error})") from error
    if unexpected or [k for k in missing if "embed_positions" not in k]:
        raise ValueError(f"{checkpoint}: not Marian's architecture (missing {missing}, unexpected {unexpected})")
    marian.save_pretrained(output)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, model.vocab_size, (3, 9), generator=g)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 6, 4])[:, None]
    start = torch.full((3, 1), sp.bos)
    with torch.no_grad():
        ours = model.search_state(src, mask, 4).step(start)
        back = from_huggingface(output).eval().search_state(src, mask, 4).step(start)
    gap = float((ours - back).abs().max())
    if gap > 1e-4:
        raise ValueError(f"{checkpoint}: the exported model differs from the checkpoint ({gap:.2e} in log-prob); "
                         "not Marian's architecture")
    return gap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        gap = export(args.checkpoint, args.output)
    except ValueError as error:
        sys.exit(f"export_marian: {error}")
    print(f"{args.output}: MarianMTModel with the weights of {args.checkpoint} (first-step log-probs within {gap:.1e})")


if __name__ == "__main__":
    main()
