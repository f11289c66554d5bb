"""to_safetensors / load_safetensors: a round trip restores the outputs exactly and keeps tied weights tied."""

import pytest
import torch

from lightning_tfm.checkpoints import load_safetensors, to_safetensors
from lightning_tfm.models.decoder_only import DecoderOnly
from lightning_tfm.models.encoder_decoder import EncoderDecoder


def _encoder_decoder(seed):
    torch.manual_seed(seed)
    model = EncoderDecoder(53, d_model=32, n_layers=2, n_heads=4, d_ff=64, output_bias=True).eval()
    with torch.no_grad():
        model.output.bias.normal_()                  # starts at zero; make it count
    return model


def test_round_trip_restores_outputs_and_ties(tmp_path):
    saved, fresh = _encoder_decoder(0), _encoder_decoder(1)
    src, tgt = torch.randint(0, 53, (2, 9)), torch.randint(0, 53, (2, 7))
    with torch.no_grad():
        want = saved(src, tgt)
        assert not torch.equal(fresh(src, tgt), want)
    to_safetensors(saved, tmp_path / "model.safetensors")
    assert load_safetensors(fresh, tmp_path / "model.safetensors") is fresh
    with torch.no_grad():
        assert torch.equal(fresh(src, tgt), want)
    # one parameter behind the shared source/target embedding and the output projection, as before
    assert fresh.src_embedding.tokens is fresh.tgt_embedding.tokens
    assert fresh.output.weight is fresh.tgt_embedding.tokens.weight
    for name, tensor in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_tied_weight_is_stored_once(tmp_path):
    from safetensors import safe_open

    model = DecoderOnly(41, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    to_safetensors(model, tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        stored = set(f.keys())
    assert len(stored) == len(model.state_dict()) - 1
    assert {"embedding.tokens.weight", "output.weight"} & stored


def test_wrong_architecture_and_missing_file_are_errors(tmp_path):
    to_safetensors(_encoder_decoder(0), tmp_path / "ed.safetensors")
    with pytest.raises(RuntimeError):
        load_safetensors(DecoderOnly(53, d_model=32, n_layers=2, n_heads=4, d_ff=64), tmp_path / "ed.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        load_safetensors(_encoder_decoder(0), tmp_path / "nope.safetensors")


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path):
    import os

    from lightning_tfm.checkpoints import load_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="refused, since loading it could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints_get_a_clear_error(tmp_path):
    from lightning_tfm.checkpoints import load_checkpoint

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:500])
    foreign = tmp_path / "notes.ckpt"
    foreign.write_text("not a checkpoint")
    for path in (truncated, foreign):
        with pytest.raises(ValueError, match=f"{path.name} is truncated or is not a torch checkpoint"):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    assert torch.equal(load_checkpoint(good)["state_dict"]["w"], torch.ones(1000))
