"""Trainer callbacks: training throughput in tokens per second, writing predictions to a file, opt-in
`torch.compile`, and attention maps of a validation example logged as images at each validation."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_tfm.viz.recorder import AttentionRecorder, attention_groups


def count_tokens(batch: Any) -> int:
    """Real (unpadded) tokens in a batch: the sum of its boolean masks, else the size of its id tensors."""
    if not isinstance(batch, dict):
        return 0
    masks = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dtype == torch.bool]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return int(sum(v.numel() for k, v in batch.items() if isinstance(v, torch.Tensor) and k in ("ids", "src", "tgt")))


class TokensPerSecond(L.Callback):
    """Log training throughput (`train_tok_s`, real tokens per second on this process, and the global figure
    `train_tok_s_global` under DDP) to the progress bar and the loggers, averaged over `window` steps.

    Args:
        window: optimizer steps per measurement.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"TokensPerSecond: window={window}, must be >= 1")
        self.window = window
        self._tokens, self._steps, self._start = 0, 0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._steps == 0:
            self._start = time.perf_counter()
        self._tokens += count_tokens(batch)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps += 1
        if self._steps < self.window:
            return
        rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        module.log("train_tok_s", rate, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        if trainer.world_size > 1:
            module.log("train_tok_s_global", rate * trainer.world_size, on_step=True, on_epoch=False,
                       rank_zero_only=True)
        self._tokens, self._steps = 0, 0


_MISREADABLE = re.compile(r'[\n\r]|^["{\[]')   # a line break, or a start that reads as JSON


class PredictionWriter(BasePredictionWriter):
    """Write each prediction as one line of `path`, in the order of the input: plain text for a string, JSON
    for anything else (labels with probabilities) and for a string that could be misread (one spanning lines,
    or starting with `"`, `{` or `[`). So a line starting with `"`, `{` or `[` is JSON, any other is the text.

    Under DDP every rank predicts its share of the examples, and rank 0 gathers them at the end and writes
    them in the order of their positions in the input (the example indices Lightning records for each batch),
    so the file is the same as one process's, which writes as it goes.

    Args:
        path: output file; its folder is created.
    """

    def __init__(self, path: str = "predictions.txt") -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self._file = None
        self._pending: list[tuple[int, Any]] = []

    def on_predict_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._pending = []
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")

    def write_on_batch_end(self, trainer: L.Trainer, module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if trainer.world_size == 1:
            self._write(prediction)
            return
        if not batch_indices or len(batch_indices) != len(prediction):
            raise RuntimeError("PredictionWriter under DDP orders the ranks' predictions by the example indices "
                               "Lightning records for a DataLoader's batches, one per prediction; this loader gave "
                               f"{len(batch_indices or [])} for {len(prediction)} predictions: predict on one device")
        self._pending.extend(zip(batch_indices, prediction))

    def on_predict_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, self._pending)
            by_index = dict(pair for rank in gathered for pair in rank)
            self._write([by_index[i] for i in sorted(by_index)])
            self._pending = []
        if self._file is not None:
            self._file.close()
            self._file = None
            rank_zero_info(f"predictions written to {self.path}")

    def _write(self, prediction: Any) -> None:
        if self._file is None:
            return
        for item in prediction:
            plain = isinstance(item, str) and not _MISREADABLE.search(item)
            self._file.write((item if plain else json.dumps(item, ensure_ascii=False)) + "\n")


class CompileModel(L.Callback):
    """Opt-in `torch.compile` of the task's network before fit (add it to `trainer.callbacks`).

    The network (`module.model`) is compiled in place (`nn.Module.compile`), so parameter names and
    checkpoints stay as without it. Batches padded to a multiple of 8 keep the number of shapes small; decoding
    with a growing KV cache recompiles a few times, then runs eagerly (torch's recompile limit).

    Args:
        backend: torch.compile backend ("inductor"; "eager" only checks that the model traces).
        mode: None, "default", "reduce-overhead" or "max-autotune".
        dynamic: None lets torch decide which dimensions vary; True or False forces it.
        fullgraph: fail on graph breaks instead of splitting the graph.
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None,
                 fullgraph: bool = False) -> None:
        self.options = {"backend": backend, "mode": mode, "dynamic": dynamic, "fullgraph": fullgraph}

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        network = getattr(module, "model", None)
        if stage == "fit" and isinstance(network, torch.nn.Module):
            network.compile(**self.options)
            rank_zero_info(f"CompileModel: {type(network).__name__} compiled with {self.options}")


class AttentionMapImages(L.Callback):
    """At the end of every validation, draw the attention maps of one validation example (the same each time,
    taken from the first validation batch) and log each layer's picture as an image to the W&B and
    TensorBoard loggers of the run. The PNGs are also written to `default_root_dir/attention_maps/step-N/`.
    Only rank zero draws; only the chosen layers leave their fused attention path, and only for that one
    example.

        trainer:
          callbacks:
            - class_path: lightning_tfm.callbacks.AttentionMapImages
              init_args: {attention: [cross], layers: [2]}

    Args:
        attention: which attention to draw: "encoder", "decoder", "cross"; None for every kind the model has.
        layers: layer indices (negative counts from the last); None draws the last layer.
        heads: heads to draw; None for all, in a grid.
        example: which example of the first validation batch.
        max_tokens: cut the example to this many tokens (language-model blocks are long).
    """

    def __init__(self, attention: list[str] | None = None, layers: list[int] | None = None,
                 heads: list[int] | None = None, example: int = 0, max_tokens: int = 48) -> None:
        if example < 0 or max_tokens < 2:
            raise ValueError(f"AttentionMapImages: example={example} must be >= 0 and max_tokens={max_tokens} >= 2")
        self.attention, self.layers, self.heads = attention, layers, heads
        self.example, self.max_tokens = example, max_tokens
        self._inputs: tuple[Tensor, ...] | None = None
        self._labels: dict[str, tuple[list[str], list[str]]] = {}

    def on_validation_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self._inputs is None and batch_idx == 0 and trainer.is_global_zero:
            self._inputs = self._take_example(module, batch)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._inputs is None:
            return
        from lightning_tfm.viz.heatmaps import draw_heads  # matplotlib only in runs that draw

        model = module.model
        groups = self.attention or list(attention_groups(model))
        selection = {g: _indices(self.layers, len(attention_groups(model)[g])) for g in groups}
        recorder = AttentionRecorder(model, selection, self.heads)
        with recorder, torch.no_grad():
            model(*(x.to(module.device) for x in self._inputs))
        folder = Path(trainer.default_root_dir) / "attention_maps" / f"step-{trainer.global_step}"
        for group in groups:
            queries, keys = self._labels[group]
            for layer, maps in sorted(recorder.maps[group].items()):
                key = f"attention/{group}_layer{layer}"
                title = f"{group} attention, layer {layer}, step {trainer.global_step}"
                path = draw_heads(maps[0], queries, keys, title, folder / f"{group}_layer{layer}.png")
                _log_image(trainer, key, path)

    def _take_example(self, module: L.LightningModule, batch: dict[str, Any]) -> tuple[Tensor, ...] | None:
        """The example's unpadded inputs on the CPU, and the token labels of each attention kind."""
        from lightning_tfm.viz.heatmaps import token_labels

        row, tokenizer = self.example, module.tokenizer
        groups = attention_groups(module.model)
        if "cross" in groups:                                   # an encoder-decoder
            src = batch["src"][row][batch["src_mask"][row]][: self.max_tokens].cpu()
            tgt = batch["tgt"][row][batch["tgt_mask"][row]][: self.max_tokens + 1].cpu()
            source, inputs, produced = (token_labels(tokenizer, ids) for ids in (src, tgt[:-1], tgt[1:]))
            self._labels = {"encoder": (source, source), "decoder": (inputs, inputs), "cross": (produced, source)}
            return src[None], tgt[None, :-1]
        ids = batch["ids"][row]
        if "mask" in batch:
            ids = ids[batch["mask"][row]]
        ids = ids[: self.max_tokens].cpu()
        labels = token_labels(tokenizer, ids)
        (group,) = groups
        self._labels = {group: (labels, labels)}
        return (ids[None],)


def _indices(layers: Sequence[int] | None, n: int) -> list[int]:
    chosen = [-1] if layers is None else layers
    for i in chosen:
        if not -n <= i < n:
            raise ValueError(f"AttentionMapImages: layer {i} does not exist; the model has {n} layers")
    return sorted({i % n for i in chosen})


def _log_image(trainer: L.Trainer, key: str, path: Path) -> None:
    import matplotlib.image

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            image = matplotlib.image.imread(path)[..., :3]          # RGBA -> RGB, floats in [0, 1]
            logger.experiment.add_image(key, image, trainer.global_step, dataformats="HWC")
