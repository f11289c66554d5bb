"""`lightning_tfm attention`: heatmaps of a trained model's attention on a text, one PNG per layer (a grid of
heads, or one head alone), and attention rollout across layers.

    lightning_tfm attention runs/multi30k_small/checkpoints/averaged.ckpt --text "A man is riding a bicycle." \\
        --attention cross --output pictures/multi30k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.viz.heatmaps import draw_heads
from lightning_tfm.viz.recorder import AttentionRecorder, attention_groups, rollout
from lightning_tfm.viz.trained import Trained, as_batch, load_trained

GROUP_TITLES = {"encoder": "encoder self-attention", "decoder": "decoder self-attention",
                "cross": "cross-attention (rows: the target token produced; columns: the source)"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning_tfm attention", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint of a lightning_tfm run (best.ckpt, averaged.ckpt, ...)")
    p.add_argument("--text", required=True, help="the input: a sentence to translate, classify or continue")
    p.add_argument("--target", help="translation only: the target to align with; default: the model's translation")
    p.add_argument("--attention", nargs="+", choices=["encoder", "decoder", "cross"],
                   help="which attention to draw (default: every kind the model has)")
    p.add_argument("--layers", nargs="+", type=int, help="layer indices, from 0 (default: all)")
    p.add_argument("--heads", nargs="+", type=int, help="head indices, from 0 (default: all, in a grid)")
    p.add_argument("--rollout", action="store_true", help="also draw attention rollout over all layers "
                   "(Abnar and Zuidema 2020) of each self-attention stack")
    p.add_argument("--beam", type=int, default=None, help="beam size of the model's own translation "
                   "(default: the task's)")
    p.add_argument("--output", default="pictures/attention", help="folder for the PNGs (created)")
    return p


def attention(args: list[str]) -> None:
    """The command: parse, draw, print each PNG written; bad input exits with one line."""
    options = parser().parse_args(args)
    try:
        for path in draw(options):
            print(path)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"lightning_tfm attention: {e}")


def draw(options: argparse.Namespace) -> list[Path]:
    trained = load_trained(options.checkpoint)
    groups = options.attention or list(attention_groups(trained.model))
    inputs, queries, keys, caption = _inputs(trained, options)
    output = Path(options.output)
    written = []
    recorder = AttentionRecorder(trained.model, {g: options.layers for g in groups}, options.heads)
    with recorder, torch.no_grad():
        trained.model(*inputs)
    heads = options.heads or list(range(next(iter(recorder.blocks.values())).n_heads))
    for group in groups:
        for layer, maps in sorted(recorder.maps[group].items()):
            name = f"{group}_layer{layer}" + (f"_head{heads[0]}" if len(heads) == 1 else "") + ".png"
            title = f"{GROUP_TITLES[group]}, layer {layer} — {trained.family} {Path(trained.path).name}\n{caption}"
            written.append(draw_heads(maps[0], queries[group], keys[group], title, output / name,
                                      [f"head {h}" for h in heads]))
    if options.rollout:
        written += _rollouts(trained, inputs, [g for g in groups if g != "cross"], queries, keys, caption, output)
    return written


def _inputs(trained: Trained, options: argparse.Namespace):
    """The model's forward arguments and each group's query and key labels."""
    if not isinstance(trained.model, EncoderDecoder):
        if options.target is not None:
            raise ValueError(f"--target is for translation checkpoints; {trained.path} holds a {trained.family} "
                             f"({trained.task})")
        ids = trained.ids(options.text)
        labels = trained.labels(ids)
        group = next(iter(attention_groups(trained.model)))
        return (as_batch(ids),), {group: labels}, {group: labels}, options.text
    src = trained.ids(options.text, "source")
    if options.target is not None:
        tgt = trained.ids(options.target, "target")
    else:
        tgt = trained.translate(src, options.beam)
        print(f"translation: {trained.tokenizer.decode(tgt[1:-1], skip_special_tokens=True)}")
    source, decoder_in, produced = trained.labels(src), trained.labels(tgt[:-1]), trained.labels(tgt[1:])
    caption = f"{options.text} → {trained.tokenizer.decode(tgt[1:-1], skip_special_tokens=True)}"
    return ((as_batch(src), as_batch(tgt[:-1])), {"encoder": source, "decoder": decoder_in, "cross": produced},
            {"encoder": source, "decoder": decoder_in, "cross": source}, caption)


def _rollouts(trained: Trained, inputs: tuple, groups: list[str], queries: dict, keys: dict, caption: str,
              output: Path) -> list[Path]:
    recorder = AttentionRecorder(trained.model, {g: None for g in groups})
    with recorder, torch.no_grad():
        trained.model(*inputs)
    written = []
    for group in groups:
        maps = [recorder.maps[group][i] for i in sorted(recorder.maps[group])]
        title = f"attention rollout, {GROUP_TITLES[group]}, {len(maps)} layers — {Path(trained.path).name}\n{caption}"
        written.append(draw_heads(rollout(maps)[0:1], queries[group], keys[group], title,
                                  output / f"rollout_{group}.png", ["rollout"]))
    return written
