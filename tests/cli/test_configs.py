"""Every YAML in configs/ (but the variant overrides, tests/test_variant_configs.py) parses with
`--print_config`, and the printed config parses back to itself; `--help` lists the subcommands. Both only parse,
so they run in this process (`in_process`, tests/conftest.py)."""

import os
import re

import pytest
import yaml
from commands import ROOT

# configs/variants/ holds overrides that only parse on top of their base (tests/test_variant_configs.py)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if p.parent.name != "variants" or p.stem.endswith("_base"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses_and_prints_back_the_same(config, in_process, tmp_path):
    printed = in_process("fit", "--config", config, "--print_config").stdout
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["class_path"].startswith("lightning_tfm.tasks.")
    assert resolved["data"]["class_path"].startswith("lightning_tfm.data.")
    assert "${" not in printed                               # interpolations are resolved
    data_args = resolved["data"]["init_args"]
    if "LIGHTNING_TFM_DATA" not in os.environ:               # the shipped paths point at ../shared/data
        for key, value in data_args.items():
            if key.endswith("_path") and value is not None and not value.startswith("my_data/"):  # README makes it
                langs = [data_args[k] for k in ("src_lang", "tgt_lang") if k in data_args]
                assert (ROOT / value).is_file() or langs and all((ROOT / f"{value}.{x}").is_file() for x in langs), \
                    f"{config.name}: data.{key}={value} not found"
    (tmp_path / "printed.yaml").write_text(printed, encoding="utf-8")
    assert in_process("fit", "--config", tmp_path / "printed.yaml", "--print_config").stdout == printed


def test_help_lists_the_subcommands(in_process):
    proc = in_process("--help")
    usage = re.search(r"\{([a-z_,]+)\}", proc.stdout)
    assert usage and {"fit", "validate", "test", "predict"} <= set(usage.group(1).split(","))
    assert "lightning_tfm.tasks.TranslationModule" in proc.stdout
