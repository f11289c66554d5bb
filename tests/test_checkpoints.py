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


def _fake_checkpoint(path, step, seed):
    torch.manual_seed(seed)
    state = {"w": torch.randn(3, 4), "half": torch.randn(5).half(), "count": torch.tensor(7)}
    torch.save({"state_dict": state, "global_step": step, "tokenizer": "{}", "optimizer_states": [{}],
                "lr_schedulers": [{}]}, path)
    return state


def test_average_is_the_elementwise_mean_of_the_weights(tmp_path):
    from lightning_tfm.checkpoints import average_checkpoints, load_checkpoint

    states = [_fake_checkpoint(tmp_path / f"s{i}.ckpt", step=10 * i, seed=i) for i in (3, 1, 2)]
    out = tmp_path / "avg" / "averaged.ckpt"
    average_checkpoints([tmp_path / f"s{i}.ckpt" for i in (3, 1, 2)], out)
    averaged = load_checkpoint(out)
    assert torch.allclose(averaged["state_dict"]["w"], sum(s["w"] for s in states) / 3, atol=1e-7)
    # half-precision weights are summed in float64 and stored back in their own dtype
    want = (sum(s["half"].double() for s in states) / 3).half()
    assert averaged["state_dict"]["half"].dtype == torch.float16 and torch.equal(averaged["state_dict"]["half"], want)
    assert torch.equal(averaged["state_dict"]["count"], torch.tensor(7))
    # the rest comes from the newest checkpoint; optimizer states would not match the averaged weights
    assert averaged["global_step"] == 30 and averaged["tokenizer"] == "{}"
    assert "optimizer_states" not in averaged and "lr_schedulers" not in averaged
    assert averaged["averaged_from"][-1].endswith("s3.ckpt")
    assert not list(out.parent.glob(".*tmp"))


def test_average_refuses_checkpoints_of_different_models(tmp_path):
    from lightning_tfm.checkpoints import average_checkpoints

    _fake_checkpoint(tmp_path / "a.ckpt", 1, 0)
    torch.save({"state_dict": {"w": torch.randn(4, 3)}, "global_step": 2}, tmp_path / "b.ckpt")
    torch.save({"state_dict": {"v": torch.randn(3, 4)}, "global_step": 2}, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="hold different weights"):
        average_checkpoints([tmp_path / "a.ckpt", tmp_path / "c.ckpt"], tmp_path / "out.ckpt")
    torch.save({"state_dict": {"w": torch.randn(4, 3), "half": torch.randn(5).half(), "count": torch.tensor(7)},
                "global_step": 2}, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match=r"a.ckpt: weight w is \(3, 4\) torch.float32, but \(4, 3\)"):
        average_checkpoints([tmp_path / "a.ckpt", tmp_path / "b.ckpt"], tmp_path / "out.ckpt")
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints([tmp_path / "a.ckpt"], tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_average_command_keeps_the_newest(tmp_path, capsys):
    from lightning_tfm.checkpoints import load_checkpoint
    from lightning_tfm.cli import main

    states = {step: _fake_checkpoint(tmp_path / f"step-{step}.ckpt", step, step) for step in (5, 40, 20, 30)}
    main(["average", *sorted(map(str, tmp_path.glob("step-*.ckpt"))), "--last", "3", "--output",
          str(tmp_path / "avg.ckpt")])
    assert "averaged 3 checkpoints" in capsys.readouterr().out
    averaged = load_checkpoint(tmp_path / "avg.ckpt")
    assert torch.allclose(averaged["state_dict"]["w"], sum(states[s]["w"] for s in (20, 30, 40)) / 3, atol=1e-7)
    with pytest.raises(SystemExit, match="missing.ckpt does not exist"):
        main(["average", str(tmp_path / "step-5.ckpt"), str(tmp_path / "missing.ckpt"), "--output", "x.ckpt"])


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from lightning_tfm import checkpoints
    from lightning_tfm.checkpoints import AtomicCheckpointIO, load_checkpoint

    path = tmp_path / "last.ckpt"
    writer = AtomicCheckpointIO()
    writer.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, path)
    real_save = torch.save

    def crash_half_way(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)                      # half the bytes reached the disk, then the crash
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        writer.save_checkpoint({"state_dict": {"w": torch.ones(100_000)}, "global_step": 2}, path)
    assert load_checkpoint(path)["global_step"] == 1
    assert list(tmp_path.iterdir()) == [path]          # no temporary file left behind
    monkeypatch.undo()
    writer.save_checkpoint({"state_dict": {"w": torch.ones(5)}, "global_step": 3}, path)
    assert load_checkpoint(path)["global_step"] == 3
