"""The learning rate a training config trains with, step by step: the config's own optimizer and `lr_schedule`
built on one dummy parameter and stepped as Lightning steps them (interval "step": the optimizer steps, then the
schedule), with the peak and the end of the warmup marked."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim import Adam, Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_tfm.viz.canvas import figure, save_png
from lightning_tfm.viz.config_files import class_spec, describe, import_class, lookup, read_configs

OPTIMIZER_KEY = "model.init_args.optimizer"
SCHEDULE_KEY = "model.init_args.lr_schedule"
FALLBACK_STEPS = 20000
SIZE = (9.0, 4.5)                 # inches


def build_schedule(config: dict[str, Any], source: str) -> tuple[Optimizer, LRScheduler | None, str]:
    """The config's optimizer on one dummy parameter, its schedule (None without one) and a title naming both.

    Without an optimizer the task's own default is used (`default_optimizer`), or Adam(lr=1) where the task
    cannot say. Raises ValueError naming the files and key when a class cannot be imported or built."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    spec = lookup(config, OPTIMIZER_KEY)
    if spec is None:
        optimizer, whose = _task_default_optimizer(config, source, params)
        name = f"{type(optimizer).__name__}(lr={optimizer.defaults['lr']:g}) ({whose})"
    else:
        optimizer = _instantiate(spec, f"{source}: {OPTIMIZER_KEY}", params, drop=("fused",))
        name = _call_text(spec, f"{source}: {OPTIMIZER_KEY}")
    spec = lookup(config, SCHEDULE_KEY)
    if spec is None:
        return optimizer, None, f"{name}, no lr_schedule"
    schedule = _instantiate(spec, f"{source}: {SCHEDULE_KEY}", optimizer)
    return optimizer, schedule, f"{name} x {_call_text(spec, f'{source}: {SCHEDULE_KEY}')}"


def _task_default_optimizer(config: dict[str, Any], source: str, params: list) -> tuple[Optimizer, str]:
    """The optimizer the config's task builds without one, and whose default it is."""
    task_path = lookup(config, "model.class_path")
    if isinstance(task_path, str):
        task = import_class(task_path, f"{source}: model.class_path")
        try:
            # the defaults read no state, so the unbound method runs without building the task and its model
            return task.default_optimizer(None, params), f"{task.__name__}'s default"
        except (AttributeError, NotImplementedError, TypeError):
            pass
    return Adam(params, lr=1.0), "no optimizer in the config"


def _instantiate(spec: Any, where: str, first: Any, drop: tuple[str, ...] = ()) -> Any:
    """class(first, **init_args) of a class_path spec; `drop` leaves out arguments that do not change the lr
    (a fused kernel, which not every device has)."""
    class_path, init_args = class_spec(spec, where)
    cls = import_class(class_path, where)
    init_args = {key: value for key, value in init_args.items() if key not in drop}
    try:
        return cls(first, **init_args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot build {class_path} with init_args {init_args}: {e}") from e


def _call_text(spec: Any, where: str) -> str:
    class_path, init_args = class_spec(spec, where)
    args = ", ".join(f"{key}={value}" for key, value in init_args.items() if key not in ("fused", "foreach"))
    return f"{class_path.rsplit('.', 1)[-1]}({args})"


def default_steps(config: dict[str, Any], schedule: LRScheduler | None) -> tuple[int, str | None]:
    """Steps to draw: trainer.max_steps, else the schedule's total_steps, else FALLBACK_STEPS; and a note for
    the console when the choice is a guess or the run is bounded by time."""
    max_steps = lookup(config, "trainer.max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        max_time = lookup(config, "trainer.max_time")
        note = (f"trainer.max_steps={max_steps} bounds a run that trainer.max_time={max_time} may stop sooner; "
                "--steps N draws fewer") if max_time else None
        return max_steps, note
    total = getattr(schedule, "total_steps", None)
    if isinstance(total, int) and total > 0:
        return total, f"no trainer.max_steps: drawing the schedule's total_steps={total}"
    return FALLBACK_STEPS, f"no trainer.max_steps and no schedule total_steps: drawing {FALLBACK_STEPS} steps"


def learning_rates(optimizer: Optimizer, schedule: LRScheduler | None, steps: int) -> list[float]:
    """The lr of the first param group at optimizer steps 0..steps-1, stepping as Lightning does."""
    if steps < 1:
        raise ValueError(f"steps={steps}, must be >= 1")
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()                        # no gradient: nothing changes but the step count
        if schedule is not None:
            schedule.step()
    return rates


def draw_schedule(rates: Sequence[float], path: str | os.PathLike, title: str,
                  warmup_steps: int | None = None) -> Path:
    """The lr against the step, the peak marked with a dot and the warmup's end with a dashed line."""
    fig, ax = figure(*SIZE)
    ax.plot(range(len(rates)), rates, linewidth=1.5)
    peak = max(range(len(rates)), key=rates.__getitem__)
    ax.plot([peak], [rates[peak]], "o", color="tab:red")
    ax.annotate(f"peak {rates[peak]:.3g} at step {peak}", (peak, rates[peak]), textcoords="offset points",
                xytext=(8, -4), fontsize=8, va="top")
    if warmup_steps:
        ax.axvline(warmup_steps, color="grey", linestyle="--", linewidth=1, label=f"warmup ends ({warmup_steps})")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def draw_config_schedule(paths: Sequence[str | os.PathLike], path: str | os.PathLike,
                         steps: int | None = None) -> tuple[Path, list[float], str | None]:
    """Draw the lr of the merged config files over `steps` (None: `default_steps`).

    Returns:
        the PNG, the lr at every step, and a note on how the steps were chosen (or None).
    """
    config, source = read_configs(paths), describe(paths)
    optimizer, schedule, name = build_schedule(config, source)
    note = None
    if steps is None:
        steps, note = default_steps(config, schedule)
    rates = learning_rates(optimizer, schedule, steps)
    png = draw_schedule(rates, path, f"{source}\n{name}", getattr(schedule, "warmup_steps", None))
    return png, rates, note
