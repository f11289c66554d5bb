"""Loading a pretrained source into a task: the backbone ("model.*") must match exactly, the task's head takes
what fits, and the report says which weights were loaded, which are new and which were dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_tfm.finetune.sources import PretrainedSource

BACKBONE = "model."


@dataclass
class LoadReport:
    """Names of the task's weights taken from the source, left as initialised, and source weights unused.

    Attributes:
        loaded: task weights set from the source.
        new: task weights the source has no value for (a new head), or whose shape differs (a head for
            another label set); they keep their initialisation.
        dropped: source weights the task has no place for (e.g. the masked-LM head when fine-tuning a classifier).
    """

    loaded: list[str]
    new: list[str]
    dropped: list[str]

    def summary(self, source: PretrainedSource) -> str:
        lines = [f"init_from {source.path} ({source.kind}): loaded {len(self.loaded)} weights, "
                 f"{len(self.new)} new, {len(self.dropped)} dropped"]
        if self.new:
            lines.append(f"  new (initialised here): {', '.join(self.new)}")
        if self.dropped:
            lines.append(f"  dropped (not used by this task): {', '.join(self.dropped)}")
        return "\n".join(lines)


def load_pretrained(task: nn.Module, source: PretrainedSource) -> LoadReport:
    """Copy the source's weights into `task` in place.

    Every backbone weight (names starting with "model.") must be in the source with the same shape: a backbone
    built differently from the source is an error, not a silent partial load. Head weights load when the source
    has them with the same shape and are reported as new otherwise.

    Raises:
        ValueError: a backbone weight is missing from the source or has another shape, naming it.
    """
    own = task.state_dict()
    loaded, new, mismatched = [], [], []
    values: dict[str, Tensor] = {}
    for name, tensor in own.items():
        theirs = source.weights.get(name)
        if theirs is not None and theirs.shape == tensor.shape:
            values[name] = theirs
            loaded.append(name)
        elif name.startswith(BACKBONE):
            mismatched.append(name if theirs is None else
                              f"{name} {tuple(theirs.shape)} in the source, {tuple(tensor.shape)} here")
        else:
            new.append(name if theirs is None else
                       f"{name} (shape {tuple(theirs.shape)} in the source, {tuple(tensor.shape)} here)")
    if mismatched:
        raise ValueError(_mismatch_message(source, mismatched))
    with torch.no_grad():
        for name, value in values.items():
            own[name].copy_(value)
    dropped = sorted(set(source.weights) - set(own))
    return LoadReport(loaded, new, dropped)


def _mismatch_message(source: PretrainedSource, mismatched: list[str]) -> str:
    hint = ("check that the model's architecture matches the source (or leave `model` unset to take the "
            "source's own)")
    if any("embedding.tokens" in m for m in mismatched):
        hint = (f"the source's vocabulary has {source.vocab_size} tokens: fine-tune with the tokenizer stored in "
                "the source (leave data.tokenization.path unset and the CLI uses it)")
    shown = "; ".join(mismatched[:5]) + (f"; and {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
    return f"init_from {source.path}: the backbone does not match the source: {shown}. {hint}"
