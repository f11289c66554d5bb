"""`lightning_tfm plot ...`: each picture is a PNG of the size its module states, and the values drawn come from
the code that computes them (the attention pattern of a block, the scheduler's own lr, the logged metrics); bad
input ends the command with a message naming the file, key or value."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from matplotlib.image import imread
from torch.optim import AdamW

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.attention_variants import SlidingWindowAttention
from lightning_tfm.tasks.schedules import WarmupCosineSchedule
from lightning_tfm.viz import attention_patterns, learning_curves, position_plots, scaling_plot, schedule_plot
from lightning_tfm.viz.canvas import DPI
from lightning_tfm.viz.config_files import merge
from lightning_tfm.viz.config_patterns import config_blocks, group_configs
from lightning_tfm.viz.plot_command import plot

REPO = Path(__file__).resolve().parents[2]
BASE, WINDOW = REPO / "configs/variants/shakespeare_base.yaml", REPO / "configs/variants/lm_window.yaml"


def _pixels(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG read back."""
    image = imread(path)
    assert image.ndim == 3 and image.size > 0
    return image.shape[:2]


def _inches(width: float, height: float) -> tuple[int, int]:
    return round(height * DPI), round(width * DPI)


def _exit_message(args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        plot(args)
    assert isinstance(exit_info.value.code, str), "a bad input must exit with a message, not a status"
    return exit_info.value.code


def _write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# attention patterns


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_pattern_is_exactly_the_band(causal):
    T, window = 12, 4
    block = SlidingWindowAttention(16, 2, LayerPlace(causal=causal, max_len=T), window=window)
    grid = attention_patterns.allowed_keys(block, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    # Longformer's band: causal, the window keys ending at the query; bidirectional, window - 1 on each side
    band = (i - j >= 0) & (i - j < window) if causal else (i - j).abs() < window
    assert torch.equal(grid, band)


def test_full_causal_pattern_is_the_lower_triangle():
    block = MultiHeadAttention(16, 2, LayerPlace(causal=True, max_len=10))
    assert torch.equal(attention_patterns.allowed_keys(block, 10), torch.ones(10, 10, dtype=torch.bool).tril())


class _NoWeights(MultiHeadAttention):
    def attend(self, q, k, v, mask):
        if self.keep_weights:
            raise ValueError("_NoWeights cannot keep attention weights (supports.weights is False)")
        return super().attend(q, k, v, mask)


def test_blocks_that_cannot_keep_weights_are_skipped_with_a_note(tmp_path):
    place = LayerPlace(causal=True, max_len=8)
    blocks = [("full", MultiHeadAttention(16, 2, place)), ("none", _NoWeights(16, 2, place))]
    drawn, skipped = attention_patterns.panels(blocks)
    assert [panel.title for panel in drawn] == ["full"]
    assert len(skipped) == 1 and "none: skipped" in skipped[0] and "cannot keep attention weights" in skipped[0]
    path = attention_patterns.draw_patterns(drawn, tmp_path / "one.png", weights=True)
    width, height = attention_patterns.PANEL
    assert _pixels(path) == _inches(width, height + attention_patterns.HEADING)


def test_every_catalogued_variant_is_drawn_or_skipped_in_its_own_form():
    blocks = list(attention_patterns.variant_blocks(16, d_model=16, n_heads=2))
    drawn, skipped = attention_patterns.panels(blocks)
    assert len(drawn) + len(skipped) == len(attention_patterns.catalogue(16)) == len(blocks)
    for title, block in blocks:
        assert block.place.causal == title.endswith("causal")
        assert block.place.causal <= type(block).supports.causal      # bidirectional-only ones drawn bidirectional
    for panel in drawn:
        assert panel.weights.shape[0] == 16 and panel.weights.abs().sum() > 0


def test_a_base_and_variant_config_draw_the_variants_blocks(tmp_path, capsys):
    dilated = REPO / "configs/variants/lm_dilated.yaml"
    assert group_configs([BASE, WINDOW, BASE, dilated]) == [[BASE, WINDOW], [BASE, dilated]]
    blocks = config_blocks([BASE, dilated], length=16)
    assert [(type(b).__name__, b.place.index, b.place.causal) for _, b in blocks] == [
        ("SlidingWindowAttention", 0, True), ("DilatedWindowAttention", 2, True)]
    assert "layers 2-3" in blocks[1][0]
    out = tmp_path / "window.png"
    plot(["patterns", "--config", str(BASE), "--config", str(WINDOW), "--length", "16", "--output", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    width, height = attention_patterns.PANEL
    assert _pixels(out) == _inches(width, height + attention_patterns.HEADING)


def test_a_class_swap_replaces_the_earlier_init_args():
    base = {"attention": {"class_path": "a.Window", "init_args": {"window": 64}}, "n_layers": 4}
    merged = merge(base, {"attention": {"class_path": "a.Memory", "init_args": {"n_memory": 8}}})
    assert merged == {"attention": {"class_path": "a.Memory", "init_args": {"n_memory": 8}}, "n_layers": 4}
    assert merge(base, {"attention": {"init_args": {"window": 8}}})["attention"]["init_args"] == {"window": 8}


def test_a_config_whose_attention_is_not_an_attention_block_exits_naming_file_and_key(tmp_path):
    config = _write_yaml(tmp_path / "bad.yaml", {"model": {
        "class_path": "lightning_tfm.tasks.LanguageModelModule",
        "init_args": {"model": {"class_path": "lightning_tfm.models.DecoderOnly",
                                "init_args": {"d_model": 16, "n_heads": 2,
                                              "attention": {"class_path": "torch.nn.Linear"}}}}}})
    message = _exit_message(["patterns", "--config", str(config), "--output", str(tmp_path / "x.png")])
    assert message.startswith("lightning_tfm plot patterns: ")
    assert str(config) in message and "model.init_args.model.init_args.attention" in message
    assert "Linear is not an Attention subclass" in message
    assert not (tmp_path / "x.png").exists()


def test_a_variant_override_alone_exits_asking_for_its_base(tmp_path):
    message = _exit_message(["patterns", "--config", str(WINDOW), "--output", str(tmp_path / "x.png")])
    assert str(WINDOW) in message and "--config base.yaml --config variant.yaml" in message


# positions


def test_position_pictures_and_their_values(tmp_path):
    path = position_plots.draw_positions(tmp_path / "p.png", ("sinusoidal", "rotary", "alibi"), length=16,
                                         d_model=16, n_heads=4)
    assert _pixels(path) == _inches(position_plots.ROW[0], 3 * position_plots.ROW[1])
    # RoPE with q = k = 1: q_m . k_n = 2 sum_i cos((m - n) theta_i), theta_i = 10000^(-2i/D) (RoFormer §3.4.3)
    D, d = 4, torch.arange(16, dtype=torch.float64)[:, None]
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    want = torch.cos(d * theta).mean(dim=1)
    torch.testing.assert_close(position_plots.rotary_scores(16, 16, 4).double(), want, atol=1e-5, rtol=0)
    # ALiBi with 8 heads: slopes 1/2, 1/4, ..., 1/256 (Press et al. §3), bias -slope |i - j|
    bias = position_plots.alibi_bias(6, 8)
    assert bias[0, 5, 1].item() == pytest.approx(-0.5 * 4) and bias[7, 0, 3].item() == pytest.approx(-3 / 256)


def _checkpoint(path: Path, state: dict, positions: str) -> Path:
    torch.save({"state_dict": state, "hyper_parameters": {"model": {"class_path": "lightning_tfm.DecoderOnly",
                "init_args": {"positions": {"class_path": positions}}}}}, path)
    return path


def test_learned_positions_are_read_from_a_checkpoint(tmp_path):
    table = torch.randn(20, 8)
    ckpt = _checkpoint(tmp_path / "learned.ckpt", {"model.embedding.positions.table.weight": table},
                       "lightning_tfm.blocks.LearnedPositions")
    key, read = position_plots.learned_table(ckpt)
    assert key == "model.embedding.positions.table.weight" and torch.equal(read, table)
    out = tmp_path / "learned.png"
    plot(["positions", "--kind", "learned", "--checkpoint", str(ckpt), "--length", "12", "--output", str(out)])
    assert _pixels(out) == _inches(*position_plots.ROW)


def test_a_checkpoint_without_learned_positions_exits_naming_it_and_its_scheme(tmp_path):
    ckpt = _checkpoint(tmp_path / "rotary.ckpt", {"model.embedding.tokens.weight": torch.zeros(3, 8)},
                       "lightning_tfm.blocks.RotaryPositions")
    message = _exit_message(["positions", "--checkpoint", str(ckpt), "--output", str(tmp_path / "x.png")])
    assert str(ckpt) in message and "no learned position table" in message and "RotaryPositions" in message
    assert "--checkpoint" in _exit_message(["positions", "--kind", "learned"])


# schedules


def test_schedule_values_are_the_schedulers_own(tmp_path):
    config = _write_yaml(tmp_path / "lm.yaml", {
        "model": {"class_path": "lightning_tfm.tasks.LanguageModelModule", "init_args": {
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.002, "fused": True}},
            "lr_schedule": {"class_path": "lightning_tfm.tasks.WarmupCosineSchedule",
                            "init_args": {"warmup_steps": 10, "total_steps": 50, "min_ratio": 0.1}}}},
        "trainer": {"max_steps": 60}})
    path, rates, note = schedule_plot.draw_config_schedule([config], tmp_path / "s.png")
    assert _pixels(path) == _inches(*schedule_plot.SIZE) and len(rates) == 60 and note is None
    optimizer = AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=10, total_steps=50, min_ratio=0.1)
    for step in range(60):
        if step in (0, 5, 9, 10, 30, 59):
            assert rates[step] == pytest.approx(schedule.get_last_lr()[0], rel=1e-12)
        optimizer.step()
        schedule.step()


def test_translation_schedule_peaks_at_the_papers_value(tmp_path):
    config = REPO / "configs/translation/multi30k_small.yaml"
    out = tmp_path / "noam.png"
    plot(["schedule", "--config", str(config), "--steps", "1500", "--output", str(out)])
    _, rates, _ = schedule_plot.draw_config_schedule([config], tmp_path / "again.png", steps=1500)
    # lr = 0.5 * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step from 1 (paper §5.3); peak at warmup
    assert max(rates) == pytest.approx(0.5 * 256 ** -0.5 * 1000 ** -0.5) and rates.index(max(rates)) == 999
    assert _pixels(out) == _inches(*schedule_plot.SIZE)


def test_without_an_optimizer_the_tasks_default_is_used(tmp_path):
    config = _write_yaml(tmp_path / "bare.yaml", {"model": {"class_path": "lightning_tfm.tasks.LanguageModelModule"}})
    _, rates, note = schedule_plot.draw_config_schedule([config], tmp_path / "s.png", steps=3)
    assert rates == [1e-3] * 3 and note is None          # LanguageModelModule.default_optimizer: AdamW(lr=1e-3)
    missing = tmp_path / "missing.yaml"
    assert str(missing) in _exit_message(["schedule", "--config", str(missing)])


# learning curves


def _metrics(run: Path, version: int, rows: list[str]) -> Path:
    path = run / "logs" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text("epoch,step,train_loss,train_tok_s,val_loss,val_acc\n" + "\n".join(rows) + "\n")
    return path


def test_curves_pick_the_loss_columns_and_join_a_resumed_run(tmp_path, capsys):
    run = tmp_path / "lm_small"
    _metrics(run, 0, ["0,9,2.5,100.0,,", "0,19,2.0,110.0,,", "0,19,,,2.2,0.4"])
    _metrics(run, 1, ["1,29,1.8,120.0,,", "1,39,1.6,120.0,1.9,0.5"])         # resumed: goes on from step 19
    loaded = learning_curves.read_run(run)
    assert loaded.label == "lm_small" and len(loaded.files) == 2
    assert learning_curves.default_metrics([loaded]) == ["train_loss", "val_loss"]
    assert learning_curves.series(loaded, "train_loss") == ([9.0, 19.0, 29.0, 39.0], [2.5, 2.0, 1.8, 1.6])
    assert learning_curves.series(loaded, "val_loss", x="epoch") == ([0.0, 1.0], [2.2, 1.9])
    _metrics(run, 2, ["0,9,3.0,100.0,,"])                                    # started again from step 0
    assert learning_curves.series(learning_curves.read_run(run), "train_loss") == ([9.0], [3.0])
    out = tmp_path / "curves.png"
    plot(["curves", str(run), str(run / "logs/version_0/metrics.csv"), "--label", "a", "--label", "b",
          "--output", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    assert _pixels(out) == _inches(2 * learning_curves.PANEL[0], learning_curves.PANEL[1])


def test_curves_exit_on_a_missing_file_or_an_unknown_metric(tmp_path):
    run = tmp_path / "run"
    _metrics(run, 0, ["0,9,2.5,100.0,2.4,0.3"])
    message = _exit_message(["curves", str(run), "--metric", "val_bleu"])
    assert "'val_bleu'" in message and "available: train_loss, train_tok_s, val_acc, val_loss" in message
    missing = tmp_path / "nowhere"
    assert str(missing) in _exit_message(["curves", str(missing)])


# scaling


def test_scaling_plot_from_a_results_file(tmp_path):
    records = [{"variant": name, "T": t, "seconds": t / 1e4 * k, "peak_mib": t / 100 * k}
               for k, name in enumerate(("full", "window", "full (bidir.)", "clustered"), start=1)
               for t in (64, 128)]
    results = tmp_path / "scaling.json"
    results.write_text(json.dumps({"records": records, "summary": {}}))
    out = tmp_path / "scaling.png"
    plot(["scaling", str(results), "--output", str(out)])
    assert _pixels(out) == _inches(*scaling_plot.SIZE)
    # files written before records said so: causal unless the class is bidirectional only
    assert [scaling_plot.is_causal(r) for r in records[::2]] == [True, True, False, False]
    assert scaling_plot.is_causal({"variant": "clustered", "causal": True})
    missing = tmp_path / "none.json"
    assert str(missing) in _exit_message(["scaling", str(missing)])
    results.write_text("{}")
    assert "holds no records" in _exit_message(["scaling", str(results)])
