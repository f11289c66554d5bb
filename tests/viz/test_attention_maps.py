"""Attention maps: kept only where asked, rows that are distributions over the real keys, rollout as its paper
writes it, and `lightning_tfm attention` drawing PNGs from checkpoints of each family (or refusing clearly)."""

import matplotlib.image
import pytest
import torch
from checkpoint_files import TINY_DECODER, TINY_ENCODER, write_checkpoint

from lightning_tfm.cli import main
from lightning_tfm.data import SpecialTokens, train_tokenizer
from lightning_tfm.models.presets import TinyDecoder, TinyEncoder, TinyEncoderDecoder
from lightning_tfm.tasks import ClassificationModule, LanguageModelModule, TranslationModule
from lightning_tfm.viz.heatmaps import panel_inches
from lightning_tfm.viz.recorder import AttentionRecorder, rollout

TINY_SEQ2SEQ = {"class_path": "lightning_tfm.models.presets.TinyEncoderDecoder"}
TEXTS = ["a man rides a bike", "ein mann fährt rad", "two dogs play in the snow", "zwei hunde spielen im schnee"] * 10


def _padded_batch(vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    return ids, mask


def test_only_the_named_layer_keeps_weights_and_outputs_do_not_change():
    model = TinyEncoderDecoder().eval()
    src, src_mask = _padded_batch()
    tgt, tgt_mask = _padded_batch()
    with torch.no_grad():
        plain = model(src, tgt, src_mask, tgt_mask)
        recorder = AttentionRecorder(model, {"cross": [1]}, heads=[2])
        with recorder:
            recorded = model(src, tgt, src_mask, tgt_mask)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    assert list(recorder.maps["cross"]) == [1] and recorder.maps["cross"][1].shape == (2, 1, 9, 9)
    kept = [name for name, m in model.named_modules() if getattr(m, "keep_weights", False)]
    assert kept == []                                  # switched back on exit, the others never switched on
    assert all(getattr(m, "weights", None) is None for m in model.modules())


def test_rows_sum_to_one_over_real_keys_and_pads_get_nothing():
    model = TinyEncoder().eval()
    ids, mask = _padded_batch()
    with AttentionRecorder(model, {"encoder": None}) as recorder, torch.no_grad():
        model(ids, mask)
    for weights in recorder.maps["encoder"].values():
        assert (weights[1, :, :, 6:] == 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))


def test_causal_maps_see_no_future():
    model = TinyDecoder().eval()
    ids, _ = _padded_batch()
    with AttentionRecorder(model, {"decoder": [0]}) as recorder, torch.no_grad():
        model(ids)
    assert (recorder.maps["decoder"][0].triu(1) == 0).all()


def test_rollout_is_the_product_of_residual_mixed_layers():
    torch.manual_seed(0)
    maps = [torch.softmax(torch.randn(1, 2, 5, 5), -1) for _ in range(3)]
    eye = torch.eye(5)
    mixed = [0.5 * eye + 0.5 * m[0].mean(0) for m in maps]     # rows already sum to 1
    expected = mixed[2] @ mixed[1] @ mixed[0]
    torch.testing.assert_close(rollout(maps)[0], expected)
    torch.testing.assert_close(rollout(maps).sum(-1), torch.ones(1, 5))


@pytest.mark.parametrize("layers, heads, message", [
    ({"cross": [0]}, None, "no 'cross' attention; it has encoder"),
    ({"encoder": [5]}, None, "encoder layer 5 does not exist: the model has 2"),
    ({"encoder": [0]}, [4], "heads \\[4\\]: the attention blocks have 4 heads"),
])
def test_a_request_the_model_cannot_meet_is_named(layers, heads, message):
    with pytest.raises(ValueError, match=message):
        AttentionRecorder(TinyEncoder(), layers, heads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    bpe = train_tokenizer(TEXTS, "bpe", 100)
    mt = TranslationModule(TinyEncoderDecoder, vocab_size=bpe.get_vocab_size(), beam_size=2)
    mt.tokenizer = bpe
    cls_tok = train_tokenizer(TEXTS, "wordpiece", 100, SpecialTokens(bos=None, eos=None, cls="<cls>", sep="<sep>"))
    cls = ClassificationModule(TinyEncoder, vocab_size=cls_tok.get_vocab_size(), n_classes=2)
    cls.tokenizer = cls_tok
    chars = train_tokenizer(TEXTS, "char", 0, SpecialTokens(pad=None, bos=None, eos=None))
    lm = LanguageModelModule(TinyDecoder, vocab_size=chars.get_vocab_size())
    lm.tokenizer = chars
    return {"mt": write_checkpoint(mt, out / "mt.ckpt", TINY_SEQ2SEQ),
            "cls": write_checkpoint(cls, out / "cls.ckpt", TINY_ENCODER, label_names=["neg", "pos"]),
            "lm": write_checkpoint(lm, out / "lm.ckpt", TINY_DECODER)}


def _png_size(path) -> tuple[int, int]:
    image = matplotlib.image.imread(path)
    assert image.size and image.std() > 0                     # not blank
    return image.shape[1], image.shape[0]


def test_translation_maps_of_the_models_own_translation(checkpoints, tmp_path, capsys):
    main(["attention", str(checkpoints["mt"]), "--text", "two dogs play", "--output", str(tmp_path),
          "--heads", "1", "--rollout"])
    out = capsys.readouterr().out
    assert "translation:" in out
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["cross_layer0_head1.png", "cross_layer1_head1.png", "decoder_layer0_head1.png",
                     "decoder_layer1_head1.png", "encoder_layer0_head1.png", "encoder_layer1_head1.png",
                     "rollout_decoder.png", "rollout_encoder.png"]
    n_src = 1 + len(checkpoints_tokens(checkpoints["mt"], "two dogs play"))
    width, height = panel_inches(1, n_src)                   # at least the panel's size, one row of panels
    w, h = _png_size(tmp_path / "encoder_layer0_head1.png")
    assert w == round(width * 100)


def checkpoints_tokens(path, text):
    from lightning_tfm.viz.trained import load_trained
    return load_trained(path).tokenizer.encode(text, add_special_tokens=False).ids


def test_translation_maps_on_a_given_target_grid_of_heads(checkpoints, tmp_path):
    main(["attention", str(checkpoints["mt"]), "--text", "a man rides", "--target", "ein mann fährt",
          "--attention", "cross", "--layers", "1", "--output", str(tmp_path)])
    w, h = _png_size(tmp_path / "cross_layer1.png")
    assert w > 3 * h / 2                                     # four heads side by side


@pytest.mark.parametrize("kind, group", [("cls", "encoder"), ("lm", "decoder")])
def test_encoder_only_and_decoder_only_checkpoints(checkpoints, tmp_path, kind, group):
    main(["attention", str(checkpoints[kind]), "--text", "two dogs", "--layers", "0", "--output", str(tmp_path)])
    assert [p.name for p in tmp_path.glob("*.png")] == [f"{group}_layer0.png"]


@pytest.mark.parametrize("args, message", [
    (["--text", "two dogs", "--target", "zwei"],
     "--target is for translation checkpoints; .* holds a TinyDecoder .*LanguageModelModule"),
    (["--text", "two dogs", "--attention", "cross"], "has no 'cross' attention; it has decoder"),
    (["--text", "two dogs " * 100], "is 900 tokens long, more than the model's context of 128"),
    (["--text", "two dogs", "--heads", "9"], "the attention blocks have 4 heads"),
])
def test_bad_requests_exit_with_one_line(checkpoints, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        main(["attention", str(checkpoints["lm"]), *args, "--output", str(tmp_path)])


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="lightning_tfm attention: .*bad.ckpt"):
        main(["attention", str(bad), "--text", "x", "--output", str(tmp_path)])


VARIANT_LMS = {
    "linear": {"class_path": "lightning_tfm.blocks.attention_variants.LinearAttention"},
    "compressed": {"class_path": "lightning_tfm.blocks.attention_variants.MemoryCompressedAttention",
                   "init_args": {"compression": 3}},
    "routing": {"class_path": "lightning_tfm.blocks.attention_variants.RoutingAttention",
                "init_args": {"n_clusters": 2, "window": 2, "chunk": 4}},
}


@pytest.mark.parametrize("variant", sorted(VARIANT_LMS))
def test_a_variant_checkpoint_draws_its_own_structure(checkpoints, tmp_path, variant):
    from lightning_tfm.finetune.sources import architecture_factory
    from lightning_tfm.viz.trained import load_trained

    architecture = {"class_path": "lightning_tfm.models.DecoderOnly",
                    "init_args": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                                  "attention": VARIANT_LMS[variant]}}
    chars = load_trained(checkpoints["lm"]).tokenizer
    lm = LanguageModelModule(architecture_factory(architecture), vocab_size=chars.get_vocab_size())
    lm.tokenizer = chars
    path = write_checkpoint(lm, tmp_path / f"{variant}.ckpt", architecture)
    main(["attention", str(path), "--text", "two dogs play", "--output", str(tmp_path / "maps")])
    assert (tmp_path / "maps" / "decoder_layer0.png").is_file()
    trained = load_trained(path)
    ids = trained.ids("two dogs play")
    with AttentionRecorder(trained.model, {"decoder": [0]}) as recorder, torch.no_grad():
        trained.model(torch.tensor([ids]))
    weights = recorder.maps["decoder"][0]
    assert (weights.triu(1) == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, len(ids)))
    if variant == "compressed":              # a completed block of 3 shares one weight among its tokens
        assert torch.allclose(weights[0, :, -1, 0], weights[0, :, -1, 2])
