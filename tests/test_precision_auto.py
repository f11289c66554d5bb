"""`auto_precision` picks bf16-mixed only where the device computes bf16 natively, read from the CPU's flags at
run time, and says why; an explicit trainer.precision wins."""

import pytest

from lightning_tfm.cli import TransformerCLI, main
from lightning_tfm.precision import auto_precision, cpu_flags, native_bf16

LM = "configs/lm/shakespeare_char_small.yaml"
BEFORE_INSTANTIATE = TransformerCLI.before_instantiate_classes


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "32-true"),
    ({"avx2", "avx512f", "avx512_vnni"}, "32-true"),            # int8 dot products, but no bf16
    ({"avx512f", "avx512_bf16"}, "bf16-mixed"),
    ({"amx_tile", "amx_bf16", "amx_int8"}, "bf16-mixed"),
])
def test_bf16_only_where_the_cpu_computes_it(flags, expected):
    precision, reason = auto_precision("cpu", frozenset(flags))
    assert precision == expected
    assert ("emulated" in reason) == (expected == "32-true")


def test_this_machines_flags_are_read():
    flags = cpu_flags()
    assert native_bf16("cpu").bf16 == any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def _resolved(monkeypatch, *args):
    """The trainer precision the CLI resolves, without training: stop right after before_instantiate_classes."""
    seen = {}

    def stop(self):
        seen["precision"] = self.config[self.subcommand]["trainer"]["precision"]
        raise SystemExit(0)
    monkeypatch.setattr(TransformerCLI, "before_instantiate_classes",
                        lambda self: (BEFORE_INSTANTIATE(self), stop(self)))
    monkeypatch.setattr("lightning_tfm.cli.auto_precision", lambda accelerator: ("bf16-mixed", "a test said so"))
    monkeypatch.setattr("sys.argv", ["lightning_tfm"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", LM, *args])
    return seen["precision"]


def test_the_cli_applies_it_only_when_asked_and_never_over_an_explicit_choice(monkeypatch):
    assert _resolved(monkeypatch) is None                                        # the configs ship it off
    assert _resolved(monkeypatch, "--auto_precision", "true") == "bf16-mixed"
    assert _resolved(monkeypatch, "--auto_precision", "true", "--trainer.precision", "32-true") == "32-true"
