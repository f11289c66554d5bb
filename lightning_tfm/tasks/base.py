"""What the tasks share: the optimizer and schedule chosen from YAML; the tokenizer (plus any task metadata)
carried inside every checkpoint so evaluation and fine-tuning use what training used; the random state in
every checkpoint, so a resumed run draws the same dropout masks as an uninterrupted one; a stop with a clear
message at the first non-finite loss."""

from __future__ import annotations

import inspect
import math
import types
from typing import Any, Callable, Iterable, Sequence

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_tfm.finetune import FineTuning, PretrainedSource, load_pretrained, read_source
from lightning_tfm.inference import Converted, InferencePrecision, to_inference_precision
from lightning_tfm.models.attention_contract import after_optimizer_step, auxiliary_losses
from lightning_tfm.models.class_paths import as_config, class_path, is_plain

OptimizerFactory = Callable[[Iterable], Optimizer]
ScheduleFactory = Callable[[Optimizer], LRScheduler]


class TaskModule(L.LightningModule):
    """Base of the tasks.

    A task builds its backbone with `build_backbone` and, once its head exists, calls `load_pretrained`.

    Args:
        optimizer: factory params -> optimizer; None gives the task's default, always `fused=True` (one kernel
            for all parameters instead of a loop over them: about 6% faster training steps on CPU, more on GPU).
        lr_schedule: factory optimizer -> LR scheduler, stepped every optimizer step; None for a constant lr.
        init_from: a pretrained source (checkpoint, export or Hugging Face folder) to start from; None for none.
        finetune: freezing, backbone learning rate or LoRA, applied after the pretrained weights load.

    `inference_precision` (fp32, bf16 or int8; `lightning_tfm.inference`) is the number format of `test` and
    `predict`: an attribute, not a hyperparameter, since it belongs to how a model is used, not to the model (the
    CLI sets it from `--inference_precision`; a checkpoint's hyperparameters would override a model argument).
    """

    def __init__(self, optimizer: OptimizerFactory | None = None, lr_schedule: ScheduleFactory | None = None,
                 init_from: str | None = None, finetune: FineTuning | None = None) -> None:
        super().__init__()
        self.inference_precision: InferencePrecision = "fp32"
        self._inference: Converted | None = None
        self.optimizer_factory, self.schedule_factory = optimizer, lr_schedule
        self.init_from, self.finetune = init_from, finetune
        self.tokenizer: Tokenizer | None = None
        self.pretrained_from: str | None = None     # provenance, written into every checkpoint
        self.data_config: dict[str, Any] | None = None  # the run's data settings (the CLI sets them) for export
        self._source: PretrainedSource | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None,
                             frame: types.FrameType | None = None, logger: bool = True) -> None:
        """Lightning's, then factories given from Python (classes, `functools.partial`s of them) are stored as
        the class_path configs the CLI stores. The checkpoint is then plain data: it loads with
        `weights_only=True`, serves as `init_from`, and `load_from_checkpoint` rebuilds the task through
        Lightning's CLI instantiator. Hyperparameters that stay Python objects (a lambda) are left as they are."""
        super().save_hyperparameters(*args, ignore=ignore, frame=frame or inspect.currentframe().f_back,
                                     logger=logger)
        if "_instantiator" in self.hparams:             # the CLI's run: already class_path configs
            return
        plain = {key: as_config(value) for key, value in self.hparams.items()}
        if all(is_plain(value) for value in plain.values()):
            self.hparams.update(plain, _class_path=class_path(type(self)),
                                _instantiator="lightning.pytorch.cli.instantiate_module")

    def build_backbone(self, model: Callable[[int], nn.Module] | None, vocab_size: int | None) -> nn.Module:
        """The task's `model`, from its factory or, when that is None, with the architecture of `init_from`.
        The architecture taken from a source goes into the hyperparameters, so this run's checkpoints rebuild
        it without the source."""
        name = type(self).__name__
        if vocab_size is None:
            raise ValueError(f"{name}: vocab_size is not set (the CLI links it from data.vocab_size)")
        self._source = read_source(self.init_from) if self.init_from else None
        if model is not None:
            return model(vocab_size)
        if self._source is None:
            raise ValueError(f"{name}: give `model` (an architecture) or `init_from` (a pretrained source)")
        if vocab_size > (self._source.vocab_size or vocab_size):
            raise ValueError(f"{name}: the data's tokenizer has {vocab_size} tokens but init_from "
                             f"{self._source.path} has {self._source.vocab_size}; fine-tune with the source's "
                             "tokenizer (leave data.tokenization.path unset and the CLI uses it)")
        self.hparams["model"] = self._source.architecture
        return self._source.build(self._source.vocab_size or vocab_size)

    def load_pretrained(self) -> None:
        """Load `init_from` into the task (backbone exactly, head where it fits; the report is printed), take
        its tokenizer, then apply the fine-tuning controls."""
        source, self._source = self._source, None
        if source is not None:
            report = load_pretrained(self, source)
            rank_zero_info(report.summary(source))
            if source.tokenizer is not None:
                self.tokenizer = Tokenizer.from_str(source.tokenizer)
            self.pretrained_from = str(source.path)
            self.hparams["init_from"] = None          # its weights are in this run's checkpoints from now on
        if self.finetune is not None:
            self.finetune.apply(self.model)

    def training_loss(self, loss: Tensor, batch_size: int) -> Tensor:
        """The task's loss plus the model's auxiliary losses (adaptive spans' penalty, routing's commitment),
        in training only. `train_loss` logs the task's loss alone, so it compares across models; each auxiliary
        loss is logged under its own name (`train_span_penalty`) and never enters validation metrics."""
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)
        for name, extra in auxiliary_losses(self.model).items():
            self.log(f"train_{name}", extra, batch_size=batch_size)
            loss = loss + extra
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step, then the blocks' own updates: once per optimizer step, so gradient accumulation
        over k micro-batches updates them once, like the weights."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        after_optimizer_step(self.model)

    def default_optimizer(self, params: Iterable) -> Optimizer:
        raise NotImplementedError(f"{type(self).__name__} must define its default optimizer")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.finetune is not None:
            params = self.finetune.param_groups(self.model, params)
        optimizer = (self.optimizer_factory or self.default_optimizer)(params)
        if optimizer.defaults.get("fused") and self._clips_scaled_gradients():
            optimizer = _unfused(optimizer)
        if self.schedule_factory is None:
            return optimizer
        schedule = self.schedule_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _clips_scaled_gradients(self) -> bool:
        """Mixed precision with gradient clipping: Lightning unscales fp16 gradients before it clips them, which
        it cannot do for a fused optimizer (the kernel unscales them itself), so it refuses the pair (bf16 too)."""
        if self._trainer is None:
            return False
        return isinstance(self.trainer.precision_plugin, MixedPrecision) and bool(self.trainer.gradient_clip_val)

    def setup(self, stage: str) -> None:
        """Take the tokenizer (and what the task needs from the data) from the datamodule, and check they
        fit the model."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "tokenizer", None) is not None:
            if self.pretrained_from and self.tokenizer and self.tokenizer.to_str() != datamodule.tokenizer.to_str():
                raise ValueError(f"the data's tokenizer is not the one stored with init_from {self.pretrained_from}; "
                                 "leave data.tokenization.path unset so the CLI uses the source's tokenizer")
            self.tokenizer = datamodule.tokenizer
            self.check_data(datamodule)
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no tokenizer: use a datamodule that provides one, "
                             "or load a checkpoint that carries one")
        if stage == "fit":
            n = sum(p.numel() for p in self.parameters())
            rank_zero_info(f"{type(self).__name__}: {n:,} parameters, {n - self.frozen_parameters():,} trainable")

    def on_test_start(self) -> None:
        self._enter_inference_precision()

    def on_predict_start(self) -> None:
        self._enter_inference_precision()

    def on_test_end(self) -> None:
        self._leave_inference_precision()

    def on_predict_end(self) -> None:
        self._leave_inference_precision()

    def _enter_inference_precision(self) -> None:
        if self.inference_precision != "fp32" and self._inference is None:
            self._inference = to_inference_precision(self, self.inference_precision)
            detail = _int8_detail(self._inference) if self.inference_precision == "int8" else ""
            rank_zero_info(f"{type(self).__name__}: evaluating in {self.inference_precision}{detail}")

    def _leave_inference_precision(self) -> None:
        """Back to the fp32 weights, so a `fit` or checkpoint after `test` sees the model it trained."""
        if self._inference is not None:
            self._inference.restore()
            self._inference = None

    def frozen_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if not p.requires_grad)

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Raise if the datamodule's tokenizer or labels do not fit the model (each task checks its own)."""
        vocab_size = datamodule.tokenizer.get_vocab_size()
        model_vocab = getattr(self.model, "vocab_size", None)
        if model_vocab is not None and vocab_size > model_vocab:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {model_vocab}: "
                             "this checkpoint was trained with another tokenizer; pass the one stored with it")

    def on_before_backward(self, loss: Tensor) -> None:
        """Stop at the first NaN or infinite loss on any rank, naming the step, before its gradients reach the
        weights or the optimizer state (the last checkpoint on disk is then the last good one)."""
        bad = not math.isfinite(float(loss.detach()))
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            raise FloatingPointError(
                f"the training loss is {float(loss.detach())} at step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {self.trainer.fit_loop.epoch_loop.batch_idx}); training stopped. "
                "Lower the learning rate, clip gradients (trainer.gradient_clip_val) or use bf16 instead of fp16, "
                "and resume from the last good checkpoint")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:     # deferred: building the DataLoader iterator draws from it
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_state"] = _rng_state()
        if self.pretrained_from is not None:
            checkpoint["pretrained_from"] = self.pretrained_from
        if self.data_config is not None:
            checkpoint["data_config"] = self.data_config
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_str()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _end_the_epoch_once(checkpoint)
        self._rng_to_restore = checkpoint.get("rng_state")
        self.data_config = checkpoint.get("data_config", self.data_config)
        self.pretrained_from = checkpoint.get("pretrained_from", self.pretrained_from)
        stored = checkpoint.get("tokenizer")
        if stored is None:
            return
        if self.tokenizer is not None and self.tokenizer.to_str() != stored:
            raise ValueError("the data's tokenizer differs from the one stored in the checkpoint: evaluate and "
                             "fine-tune with the checkpoint's tokenizer (the CLI does this for --ckpt_path; in "
                             "Python, save it with `Tokenizer.from_str(ckpt['tokenizer']).save(path)` and give "
                             "that path to the datamodule)")
        self.tokenizer = Tokenizer.from_str(stored)


def _end_the_epoch_once(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written after an epoch's last training batch but before the epoch ended (`every_n_train_steps`
    landing there): Lightning 2.6 counts that epoch as ended while it restores the loops, then ends it again, so
    the resumed run skips an epoch number and the batches that go with it. Unmarked as the last batch (Lightning
    calls this hook before it restores the loops), the restored epoch finds all its batches done and ends once."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    batches, epochs = loop.get("epoch_loop.batch_progress"), loop.get("epoch_progress")
    if batches and epochs and batches.get("is_last_batch"):
        current = epochs["current"]
        if current["processed"] == current["started"] - 1:                  # the epoch had not ended
            batches["is_last_batch"] = False


def _rng_state() -> dict[str, Any]:
    """Torch's CPU and CUDA generators (dropout, masking), as tensors a weights-only load accepts."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _unfused(optimizer: Optimizer) -> Optimizer:
    """The same optimizer, hyperparameters and parameter groups, with the per-parameter (foreach) kernels."""
    groups = [{key: value for key, value in group.items() if key != "fused"} for group in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer)).parameters
    settings = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    rank_zero_info(f"{type(optimizer).__name__}: fused=False, since Lightning clips mixed-precision gradients only "
                   "after unscaling them itself")
    return type(optimizer)(groups, **(settings | {"fused": False}))


def _int8_detail(converted: Converted) -> str:
    rows = ", ".join(f"{shape} from {n} rows" for shape, n in converted.min_rows.items())
    return f": {converted.quantized} linear maps in int8 ({rows}), {converted.kept_float} kept fp32 (no faster)"
