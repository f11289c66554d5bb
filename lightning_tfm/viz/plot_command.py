"""`lightning_tfm plot <what>`: one picture of a config or a run per command, each written to a PNG whose path is
printed. Bad input ends the command with one line naming the file, key or value, never a traceback:
`patterns` (which keys each query may see, per attention variant or per config), `positions` (the position
schemes), `schedule` (a config's learning rate over its steps), `curves` (learning curves of runs) and `scaling`
(the scaling benchmark)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  lightning_tfm plot patterns --length 64
  lightning_tfm plot patterns --config configs/variants/shakespeare_base.yaml --config configs/variants/lm_window.yaml
  lightning_tfm plot positions --kind sinusoidal --kind rotary --kind alibi
  lightning_tfm plot positions --checkpoint runs/variants/lm_linear/checkpoints/last.ckpt
  lightning_tfm plot schedule --config configs/translation/multi30k_small.yaml
  lightning_tfm plot curves runs/variants/lm_full runs/variants/lm_linear --metric val_loss
  lightning_tfm plot scaling results/scaling.json"""


def plot(args: list[str]) -> None:
    """Parse `args` (what follows `lightning_tfm plot`), draw, and print the PNG's path."""
    options = _parser().parse_args(args)
    try:
        path = options.draw(options)
    except (ValueError, OSError) as e:
        sys.exit(f"lightning_tfm plot {options.what}: {e}")
    print(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning_tfm plot", description=__doc__,
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="what", required=True)
    for add in (_add_patterns, _add_positions, _add_schedule, _add_curves, _add_scaling):
        add(commands)
    return parser


def _add_patterns(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("patterns", help="which keys each query may see, per attention variant",
                              description="One panel per attention block, computed by running it with "
                              "keep_weights: every variant, or the blocks a training config builds.")
    sub.add_argument("--config", action="append", default=[], metavar="CONFIG.yaml",
                     help="a training config; repeat to merge files in order (a base, then a variant). A file "
                     "naming its own model class starts another model: --config base --config a --config base "
                     "--config b draws two")
    sub.add_argument("--length", type=int, help="sequence length T of the picture (default: 64 for the variants, "
                     "a config's positions max_len up to 256)")
    sub.add_argument("--head", type=int, default=0, help="the head drawn (default 0)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the weights and the input (default 0)")
    sub.add_argument("--weights", action="store_true", help="draw |weight| on a log colour scale")
    sub.add_argument("--output", type=Path, default=Path("pictures/patterns.png"),
                     help="PNG to write (default: %(default)s)")
    sub.set_defaults(draw=_patterns)


def _patterns(options: argparse.Namespace) -> Path:
    from lightning_tfm.viz.attention_patterns import draw_patterns, panels, variant_blocks
    from lightning_tfm.viz.config_patterns import config_blocks, context_length, group_configs

    if options.length is not None and options.length < 1:
        raise ValueError(f"--length {options.length}: must be >= 1")
    if options.config:
        blocks = [block for group in group_configs(options.config)
                  for block in config_blocks(group, options.length or context_length(group), options.seed)]
    else:
        blocks = variant_blocks(options.length or 64, seed=options.seed)
    drawn, skipped = panels(blocks, options.head, options.seed)
    for note in skipped:
        print(note, file=sys.stderr)
    return draw_patterns(drawn, options.output, options.weights)


def _add_positions(commands: argparse._SubParsersAction) -> None:
    from lightning_tfm.viz.position_plots import KINDS

    sub = commands.add_parser("positions", help="position encodings: tables, similarities, biases",
                              description="One row per position scheme, computed by blocks/positions.py.")
    sub.add_argument("--kind", action="append", choices=KINDS,
                     help="a scheme to draw; repeat for several (default: sinusoidal, rotary, alibi, and learned "
                     "with --checkpoint)")
    sub.add_argument("--checkpoint", help="a checkpoint whose model learned its positions (LearnedPositions)")
    sub.add_argument("--length", type=int, default=128, help="positions drawn (default 128)")
    sub.add_argument("--d-model", type=int, default=128, help="d_model of the sinusoids and rotary (default 128)")
    sub.add_argument("--heads", type=int, default=8, help="heads of rotary and ALiBi (default 8)")
    sub.add_argument("--output", type=Path, default=Path("pictures/positions.png"),
                     help="PNG to write (default: %(default)s)")
    sub.set_defaults(draw=_positions)


def _positions(options: argparse.Namespace) -> Path:
    from lightning_tfm.viz.position_plots import draw_positions

    kinds = options.kind or ["sinusoidal", "rotary", "alibi"] + (["learned"] if options.checkpoint else [])
    if "learned" in kinds and not options.checkpoint:
        raise ValueError("--kind learned reads the table of a trained model: add --checkpoint CKPT")
    return draw_positions(options.output, list(dict.fromkeys(kinds)), options.length, options.d_model,
                          options.heads, options.checkpoint)


def _add_schedule(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("schedule", help="a config's learning rate over its steps",
                              description="The config's optimizer and lr_schedule, stepped on a dummy parameter.")
    sub.add_argument("--config", action="append", required=True, metavar="CONFIG.yaml",
                     help="a training config; repeat to merge files in order")
    sub.add_argument("--steps", type=int, help="steps to draw (default: trainer.max_steps, else the schedule's "
                     "total_steps, else 20000)")
    sub.add_argument("--output", type=Path, default=Path("pictures/schedule.png"),
                     help="PNG to write (default: %(default)s)")
    sub.set_defaults(draw=_schedule)


def _schedule(options: argparse.Namespace) -> Path:
    from lightning_tfm.viz.schedule_plot import draw_config_schedule

    path, _, note = draw_config_schedule(options.config, options.output, options.steps)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return path


def _add_curves(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("curves", help="learning curves of runs, overlaid",
                              description="Metrics logged by CSVLogger (RUN/logs/version_*/metrics.csv).")
    sub.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_METRICS_CSV", help="run directories or metrics.csv files")
    sub.add_argument("--metric", action="append",
                     help="a column to draw; repeat for several (default: every train_*loss and val_*loss)")
    sub.add_argument("--label", action="append", help="a legend name per run, in order (default: the run's folder)")
    sub.add_argument("--x", choices=("step", "epoch"), default="step", help="the x axis (default step)")
    sub.add_argument("--output", type=Path, default=Path("pictures/curves.png"),
                     help="PNG to write (default: %(default)s)")
    sub.set_defaults(draw=_curves)


def _curves(options: argparse.Namespace) -> Path:
    from lightning_tfm.viz.learning_curves import default_metrics, draw_curves, read_run

    labels = options.label or [None] * len(options.runs)
    if len(labels) != len(options.runs):
        raise ValueError(f"{len(labels)} --label for {len(options.runs)} runs: give one per run, or none")
    runs = [read_run(run, label) for run, label in zip(options.runs, labels)]
    return draw_curves(runs, options.metric or default_metrics(runs), options.output, options.x)


def _add_scaling(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("scaling", help="the scaling benchmark, log-log",
                              description="Time and memory against length per variant, from scripts/scaling.py.")
    sub.add_argument("results", nargs="?", type=Path, default=Path("results/scaling.json"),
                     metavar="RESULTS_JSON", help="the benchmark's JSON (default results/scaling.json)")
    sub.add_argument("--output", type=Path, default=Path("pictures/scaling.png"),
                     help="PNG to write (default: %(default)s)")
    sub.set_defaults(draw=_scaling)


def _scaling(options: argparse.Namespace) -> Path:
    from lightning_tfm.viz.scaling_plot import draw_scaling, read_scaling

    return draw_scaling(read_scaling(options.results), options.output)
