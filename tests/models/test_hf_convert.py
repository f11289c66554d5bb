"""from_huggingface against transformers models built from tiny configs with random weights; nothing is downloaded.

Each parity test prints its measured max abs difference (run with -s to see them).
"""

import json

import pytest
import torch

from lightning_tfm.blocks.feedforward import GELUFeedForward, ReLUFeedForward, SiLUFeedForward
from lightning_tfm.blocks.norms import LayerNorm
from lightning_tfm.models.decoder_only import DecoderOnly
from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.models.encoder_only import EncoderOnly
from lightning_tfm.models.hf_convert import from_huggingface

transformers = pytest.importorskip("transformers")

V, ATOL = 97, 1e-4


def _jitter(model):
    """Move every weight off its init (LayerNorm gains of 1, zero biases), so a swapped or skipped
    weight cannot hide behind a default value. Marian's frozen sinusoid table stays as it is."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name == "final_logits_bias":
                b.normal_()
    return model.eval()


def _padded(lengths, T, vocab=V, seed=0):
    """(B, T) random ids and the (B, T) bool mask of right padding with the given real lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=gen)
    real = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~real, 0), real


def _same_eps(ours, theirs):
    """Every LayerNorm has the eps of transformers' (too small a difference for the parity tests to see)."""
    mine = {m.eps for m in ours.modules() if isinstance(m, LayerNorm)}
    hf = {m.eps for m in theirs.modules() if isinstance(m, torch.nn.LayerNorm)}
    return mine == hf and len(hf) == 1


def _check(label, got, want):
    diff = (got - want).abs().max().item()
    print(f"\n{label}: max abs diff {diff:.3g}")
    assert diff <= ATOL, f"{label}: max abs diff {diff:.3g} > {ATOL}"


# ---------------------------------------------------------------------------------------------- GPT-2

def _gpt2(**overrides):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=1, eos_token_id=2, **overrides)
    return _jitter(transformers.GPT2LMHeadModel(cfg))


def test_gpt2_matches_transformers_on_padded_batch():
    theirs = _gpt2()
    ours = from_huggingface(theirs)
    assert isinstance(ours, DecoderOnly) and ours.output.weight is ours.embedding.tokens.weight
    assert _same_eps(ours, theirs)
    ff = ours.stack.layers[0].feedforward
    assert isinstance(ff, GELUFeedForward) and ff.approximate == "tanh"
    ids, real = _padded([17, 12, 5], 17)
    with torch.no_grad():
        got = ours(ids, mask=real)
        want = theirs(ids, attention_mask=real.long()).logits
    _check("gpt2 padded batch logits", got[real], want[real])


def test_gpt2_backbone_and_untied_head():
    theirs = _gpt2(tie_word_embeddings=False)
    ours = from_huggingface(theirs)
    assert ours.output.weight is not ours.embedding.tokens.weight
    backbone = from_huggingface(theirs.transformer)      # GPT2Model: no lm_head, no prefix
    ids, real = _padded([9, 6], 9, seed=1)
    with torch.no_grad():
        _check("gpt2 untied head logits", ours(ids, mask=real)[real],
               theirs(ids, attention_mask=real.long()).logits[real])
        _check("gpt2 GPT2Model hidden states", backbone.hidden(ids, mask=real)[real],
               theirs.transformer(ids, attention_mask=real.long()).last_hidden_state[real])


def test_gpt2_from_directory(tmp_path):
    theirs = _gpt2()
    theirs.save_pretrained(tmp_path)
    ours = from_huggingface(tmp_path)
    ids, real = _padded([11, 4], 11, seed=2)
    with torch.no_grad():
        _check("gpt2 from directory logits", ours(ids, mask=real)[real],
               theirs(ids, attention_mask=real.long()).logits[real])


def test_gpt2_kv_cache_matches_full_forward():
    theirs = _gpt2()
    ours = from_huggingface(theirs)
    ids = torch.randint(3, V, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = theirs(ids).logits                                          # (B, 20, V)
        cache = ours.new_cache()
        got = torch.cat([ours(ids[:, t:t + 1], cache=cache) for t in range(20)], dim=1)
    assert cache.length == 20
    _check("gpt2 kv-cache 20 steps logits", got, want)


# ----------------------------------------------------------------------------------------------- BERT

def _bert(cls_name="BertModel", **overrides):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=3, **overrides)
    return _jitter(getattr(transformers, cls_name)(cfg))


def test_bert_matches_transformers_on_padded_batch():
    theirs = _bert()
    ours = from_huggingface(theirs)
    assert isinstance(ours, EncoderOnly) and _same_eps(ours, theirs)
    assert ours.stack.layers[0].feedforward.approximate == "none"
    ids, real = _padded([15, 10, 3], 15)
    segments = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = ours(ids, mask=real, segments=segments)
        want = theirs(ids, attention_mask=real.long(), token_type_ids=segments).last_hidden_state
        got_default = ours(ids, mask=real)                                 # no segments: all segment 0
        want_default = theirs(ids, attention_mask=real.long()).last_hidden_state
    _check("bert padded batch hidden states", got[real], want[real])
    _check("bert padded batch, default segments", got_default[real], want_default[real])


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertForSequenceClassification"])
def test_bert_task_model_from_directory_keeps_backbone(tmp_path, cls_name):
    theirs = _bert(cls_name)
    theirs.save_pretrained(tmp_path)
    ours = from_huggingface(tmp_path)
    ids, real = _padded([12, 7], 12, seed=5)
    with torch.no_grad():
        want = theirs.bert(ids, attention_mask=real.long()).last_hidden_state
        _check(f"bert {cls_name} from directory hidden states", ours(ids, mask=real)[real], want[real])


# --------------------------------------------------------------------------------------------- Marian

def _marian(**overrides):
    torch.manual_seed(0)
    args = {"vocab_size": V, "d_model": 32, "encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 4,
            "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
            "pad_token_id": 0, "decoder_start_token_id": 0, "eos_token_id": 2, "forced_eos_token_id": 2,
            "scale_embedding": True, "activation_function": "swish"}
    cfg = transformers.MarianConfig(**{**args, **overrides})
    return _jitter(transformers.MarianMTModel(cfg))


# case -> config overrides, feed-forward class, (encoder/decoder embeddings shared, output tied to them)
MARIAN_CASES = {
    "swish-shared": ({}, SiLUFeedForward, (True, True)),
    "gelu-unshared-vocab": ({"activation_function": "gelu", "share_encoder_decoder_embeddings": False,
                             "decoder_vocab_size": 89, "scale_embedding": False}, GELUFeedForward, (False, True)),
    # transformers 5 unties everything, `shared` included, when tie_word_embeddings=False
    "relu-untied": ({"activation_function": "relu", "tie_word_embeddings": False}, ReLUFeedForward, (False, False)),
}


def _marian_inputs(theirs):
    src, src_real = _padded([13, 8, 5], 13, seed=6)
    tgt, tgt_real = _padded([10, 10, 4], 10, vocab=theirs.config.decoder_vocab_size, seed=7)
    return src, src_real, tgt, tgt_real


def _marian_logits(theirs, src, src_real, tgt, tgt_real):
    return theirs(input_ids=src, attention_mask=src_real.long(), decoder_input_ids=tgt,
                  decoder_attention_mask=tgt_real.long()).logits


@pytest.mark.parametrize("case", list(MARIAN_CASES))
def test_marian_matches_transformers_on_padded_batch(case):
    overrides, ff, (shared, tied) = MARIAN_CASES[case]
    theirs = _marian(**overrides)
    ours = from_huggingface(theirs)
    assert isinstance(ours, EncoderDecoder) and isinstance(ours.encoder.layers[0].feedforward, ff)
    assert _same_eps(ours, theirs)
    assert (ours.src_embedding.tokens is ours.tgt_embedding.tokens) == shared
    assert (ours.output.weight is ours.tgt_embedding.tokens.weight) == tied
    src, src_real, tgt, tgt_real = _marian_inputs(theirs)
    with torch.no_grad():
        got = ours(src, tgt, src_real, tgt_real)
        want = _marian_logits(theirs, src, src_real, tgt, tgt_real)
    _check(f"marian {case} padded batch logits", got[tgt_real], want[tgt_real])


def test_marian_sinusoids_are_the_split_layout():
    theirs = _marian()
    ours = from_huggingface(theirs)
    for mine, hf in ((ours.src_embedding, theirs.model.encoder), (ours.tgt_embedding, theirs.model.decoder)):
        _check("marian sinusoid table", mine.positions.table, hf.embed_positions.weight)
    # and the interleaved layout (the paper's) is not what Marian uses
    with pytest.raises(ValueError, match="embed_positions"):
        with torch.no_grad():
            theirs.model.encoder.embed_positions.weight.copy_(
                theirs.model.encoder.embed_positions.weight.view(64, 2, 16).transpose(1, 2).reshape(64, 32))
        from_huggingface(theirs)


def test_marian_from_directory(tmp_path):
    theirs = _marian()
    theirs.save_pretrained(tmp_path)
    ours = from_huggingface(tmp_path)
    src, src_real, tgt, tgt_real = _marian_inputs(theirs)
    with torch.no_grad():
        _check("marian from directory logits", ours(src, tgt, src_real, tgt_real)[tgt_real],
               _marian_logits(theirs, src, src_real, tgt, tgt_real)[tgt_real])


def test_marian_kv_cache_matches_full_forward():
    theirs = _marian()
    ours = from_huggingface(theirs)
    src, src_real = _padded([13, 6], 13, seed=8)
    tgt = torch.randint(3, V, (2, 20), generator=torch.Generator().manual_seed(9))
    tgt[:, 0] = theirs.config.decoder_start_token_id
    with torch.no_grad():
        want = theirs(input_ids=src, attention_mask=src_real.long(), decoder_input_ids=tgt).logits
        memory = ours.encode(src, src_real)
        cache = ours.new_cache()
        got = torch.cat([ours.decode(tgt[:, t:t + 1], memory, src_real, cache=cache) for t in range(20)], dim=1)
    assert cache.length == 20
    _check("marian kv-cache 20 steps logits", got, want)


# --------------------------------------------------------------------------------------------- errors

def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type='llama' is not supported; supported: bert, gpt2, marian"):
        from_huggingface(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        from_huggingface(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        from_huggingface(tmp_path)


def test_marian_with_different_stack_widths_is_rejected():
    theirs = _marian(decoder_ffn_dim=48)
    with pytest.raises(ValueError, match="encoder_ffn_dim=64 differs from decoder_ffn_dim=48"):
        from_huggingface(theirs)


def test_unsupported_config_values_are_named():
    with pytest.raises(ValueError, match="activation_function='quick_gelu' is not supported"):
        from_huggingface(_gpt2(activation_function="quick_gelu"))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        from_huggingface(_gpt2(scale_attn_by_inverse_layer_idx=True))


def test_missing_and_extra_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _gpt2().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    extra = {**weights, "transformer.h.0.attn.rotary.weight": torch.zeros(2)}
    save_file(extra, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"gpt2: weights our model has no place for: \['h.0.attn.rotary.weight'\]"):
        from_huggingface(tmp_path)
    del weights["transformer.h.1.ln_2.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="gpt2: the checkpoint has no weight 'h.1.ln_2.bias'"):
        from_huggingface(tmp_path)


def test_other_inputs_are_a_type_error():
    with pytest.raises(TypeError, match="expected a transformers model or a directory, got Linear"):
        from_huggingface(torch.nn.Linear(2, 2))
