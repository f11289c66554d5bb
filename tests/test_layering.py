"""Imports point one way: blocks <- models <- tasks <- cli; data and decoding are leaves (STYLE.md §1)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_tfm"

# what each part may import from lightning_tfm (its own part always allowed)
ALLOWED = {
    "blocks": set(),
    "models": {"blocks"},
    "decoding": set(),
    "data": set(),
    "tasks": {"blocks", "models", "decoding", "data", "finetune", "checkpoints", "inference"},
    "finetune": {"blocks", "models", "checkpoints"},
    "checkpoints": {"models", "blocks"},
    "viz": {"models", "blocks", "data", "tasks", "finetune", "checkpoints"},
    "callbacks": {"viz"},
    "precision": set(),
    "inference": {"blocks", "precision"},
}
NEVER_LIGHTNING = {"blocks", "models", "decoding"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_point_one_way():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        part = rel.parts[0].removesuffix(".py")
        if part not in ALLOWED:
            continue                       # cli.py and the package __init__ may import anything
        for name in _imports(path):
            if name.startswith("lightning_tfm."):
                target = name.split(".")[1]
                if target != part and target not in ALLOWED[part]:
                    problems.append(f"{rel} imports {name}")
            if part in NEVER_LIGHTNING and name.split(".")[0] in {"lightning", "pytorch_lightning"}:
                problems.append(f"{rel} imports {name}: blocks, models and decoding are plain PyTorch")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_back_edge(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from lightning_tfm.tasks.translation import TranslationModule\nimport lightning\n")
    assert {"lightning_tfm.tasks.translation", "lightning"} <= _imports(bad)
