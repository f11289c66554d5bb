"""Every attention variant and full attention on two synthetic long-range tasks, accuracy and time, one command.

ListOps (bidirectional variants; an EncoderOnly with mean pooling and a 10-way head) and copying (causal
variants; a DecoderOnly scored on the copied half, 64 symbols back), both from scripts/long_range_tasks.py,
drawn fresh from seeds: train, validation and test never overlap in seed. Every
variant trains the same model (2 layers, d_model 64, 4 heads) for the same number of steps with the same data
order, optimizer and schedule; the settings were chosen on the validation split; the table reports test
accuracy, validation accuracy and the training time (seconds, this machine). Rotary positions, except for
variants that cannot take them (they get learned absolute positions). A variant that cannot do a task (a causal
only one on ListOps, a bidirectional only one on copying) is left out of that task, as its `supports` says.

    python scripts/long_range.py                                   # both tasks, every variant: ~60 min on 2 cores
    python scripts/long_range.py --tasks copy --only full window linear
    python scripts/long_range.py --steps 20 --out /tmp/smoke       # a smoke run

Reference (LRA, Tay et al. 2021, Table 1, ListOps at length 2K, much larger models): full attention 36.37,
Linformer 35.70, Performer 18.01, linear 16.13, BigBird 36.05. Ours is shorter (128-256 tokens), the model
smaller and the training far shorter, so expect lower numbers; the majority class alone scores about 18%.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_range_tasks import LISTOPS_VOCAB, Copy, encode_listops, listops  # noqa: E402

from lightning_tfm.blocks import attention_variants as av  # noqa: E402
from lightning_tfm.blocks.attention import MultiHeadAttention  # noqa: E402
from lightning_tfm.blocks.positions import LearnedPositions, RotaryPositions  # noqa: E402
from lightning_tfm.models import DecoderOnly, EncoderOnly  # noqa: E402
from lightning_tfm.models.attention_contract import after_optimizer_step, auxiliary_losses  # noqa: E402
from lightning_tfm.models.heads import ClassificationHead  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
D_MODEL, N_LAYERS, N_HEADS, D_FF = 64, 2, 4, 128


def variants() -> dict[str, tuple]:
    """name -> attention factory, sized for sequences of a few hundred tokens."""
    return {
        "full": MultiHeadAttention,
        "window": partial(av.SlidingWindowAttention, window=32),
        "dilated": partial(av.DilatedWindowAttention, window=16, dilation=4),
        "strided": partial(av.StridedAttention, stride=16),
        "band+strided": partial(av.BandStridedAttention, window=16, stride=16),
        "block": partial(av.BlockLocalAttention, block=32),
        "block+global": partial(av.BlockGlobalAttention, block=32, n_global=4),
        "adaptive_span": partial(av.AdaptiveSpanAttention, max_span=512, ramp=16, init_span=0.1),
        "persistent_memory": partial(av.PersistentMemoryAttention, n_memory=16),
        "routing": partial(av.RoutingAttention, n_clusters=8, window=16, chunk=32),
        "linear": av.LinearAttention,
        "performer": partial(av.PerformerAttention, n_features=64),
        "clustered": partial(av.ClusteredAttention, n_clusters=32),
        "compressed": partial(av.MemoryCompressedAttention, compression=4),
        "linformer": partial(av.LinformerAttention, projected_len=64),
        "inducing_points": partial(av.InducingPointAttention, n_inducing=32),
        "poolingformer": partial(av.PoolingformerAttention, window=16, pool_window=256, pool=4),
    }


def _supports(factory):
    return (factory.func if isinstance(factory, partial) else factory).supports


def _positions(factory, max_len: int):
    cls = RotaryPositions if _supports(factory).rotary else LearnedPositions
    return partial(cls, max_len=max_len)


class ListOpsModel(nn.Module):
    def __init__(self, factory, max_len: int) -> None:
        super().__init__()
        self.encoder = EncoderOnly(len(LISTOPS_VOCAB), D_MODEL, N_LAYERS, N_HEADS, D_FF, dropout=0.0,
                                   attention=factory, positions=_positions(factory, max_len), n_segments=0,
                                   norm_placement="pre")
        self.head = ClassificationHead(D_MODEL, 10, pooling="mean", dropout=0.0)

    def forward(self, ids, real):
        return self.head(self.encoder(ids, mask=real), real)


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(model: nn.Module, loss_of, steps: int, lr: float, desc: str) -> float:
    """Train for `steps` with AdamW and warmup + cosine; return the seconds it took."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, max(1, steps // 20)))
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0):
        loss = loss_of(step)
        loss = loss + sum(auxiliary_losses(model).values(), torch.zeros(()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        after_optimizer_step(model)
    return time.perf_counter() - start


@torch.no_grad()
def _accuracy(predict, batches) -> float:
    right = total = 0
    for inputs, labels in batches:
        pred, keep = predict(*inputs), labels != -100
        right += int((pred[keep] == labels[keep]).sum())
        total += int(keep.sum())
    return right / total


def _batches(tensors, size: int):
    n = tensors[0].shape[0]
    return [tuple(t[i:i + size] for t in tensors) for i in range(0, n, size)]


def run_listops(name: str, factory, data: dict, steps: int, batch: int, lr: float) -> dict:
    torch.manual_seed(0)
    ids, real, labels = data["train"]
    model = ListOpsModel(factory, ids.shape[1])

    def loss_of(step: int):
        rows = torch.arange(step * batch, (step + 1) * batch) % ids.shape[0]
        width = int(real[rows].sum(1).max())          # trim the batch to its longest row
        return F.cross_entropy(model(ids[rows, :width], real[rows, :width]), labels[rows])

    seconds = _train(model, loss_of, steps, lr, f"listops {name}")
    model.eval()
    result = {"task": "listops", "variant": name, "train_s": seconds, "steps": steps}
    for split in ("val", "test"):
        s_ids, s_real, s_labels = data[split]
        batches = [((i, r), y) for i, r, y in _batches((s_ids, s_real, s_labels), 128)]
        result[f"{split}_acc"] = _accuracy(lambda i, r: model(i, r).argmax(-1), batches)
    return result


def run_copy(name: str, factory, task: Copy, data: dict, steps: int, batch: int, lr: float) -> dict:
    torch.manual_seed(0)
    T = 2 * task.length
    model = DecoderOnly(task.vocab_size, D_MODEL, N_LAYERS, N_HEADS, D_FF, dropout=0.0, attention=factory,
                        positions=_positions(factory, T))
    ids, targets = data["train"]

    def loss_of(step: int):
        rows = torch.arange(step * batch, (step + 1) * batch) % ids.shape[0]
        return F.cross_entropy(model(ids[rows]).flatten(0, 1), targets[rows].flatten(), ignore_index=-100)

    seconds = _train(model, loss_of, steps, lr, f"copy {name}")
    model.eval()
    result = {"task": "copy", "variant": name, "train_s": seconds, "steps": steps}
    for split in ("val", "test"):
        batches = [((i,), y) for i, y in _batches(data[split], 128)]
        result[f"{split}_acc"] = _accuracy(lambda i: model(i).argmax(-1), batches)
    return result


def table(records: list[dict]) -> str:
    lines = ["| task | variant | test accuracy | validation accuracy | training time |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['task']} | {r['variant']} | {100 * r['test_acc']:.1f}% | {100 * r['val_acc']:.1f}% "
                     f"| {r['train_s']:.0f} s ({r['steps']} steps) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["listops", "copy"], choices=["listops", "copy"])
    parser.add_argument("--only", nargs="+", help="variants to run (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 700 listops, 600 copy)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: 1e-3 listops, 3e-3 copy)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--listops-len", type=int, nargs=2, default=[128, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--copy-len", type=int, default=64, help="symbols to copy (sequence length 2 x this)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "long_range")
    parser.add_argument("--append", action="store_true",
                        help="keep OUT.json's other records (another task, other variants) and replace these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or list(variants())
    unknown = sorted(set(names) - set(variants()))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(variants())}")
    records = []
    for task in args.tasks:
        steps = args.steps or (700 if task == "listops" else 600)
        lr = args.lr or (1e-3 if task == "listops" else 3e-3)
        n_train = steps * args.batch
        if task == "listops":
            lo, hi = args.listops_len
            data = {split: encode_listops(listops(n, seed, lo, hi))
                    for split, n, seed in (("train", min(n_train, 20000), 0), ("val", 500, 1), ("test", 1000, 2))}
        else:
            copy = Copy(length=args.copy_len)
            data = {split: copy.sample(n, seed) for split, n, seed in
                    (("train", n_train, 10), ("val", 500, 11), ("test", 1000, 12))}
        for name in names:
            factory = variants()[name]
            supports = _supports(factory)
            if not (supports.bidirectional if task == "listops" else supports.causal):
                continue
            record = (run_listops(name, factory, data, steps, args.batch, lr) if task == "listops"
                      else run_copy(name, factory, copy, data, steps, args.batch, lr))
            records.append(record)
            print(f"{task:>8} {name:>18}: test {100 * record['test_acc']:.1f}%, val {100 * record['val_acc']:.1f}%, "
                  f"{record['train_s']:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__}
    old = Path(f"{args.out}.json")
    if args.append and old.is_file():
        done = {(r["task"], r["variant"]) for r in records}
        records = [r for r in json.loads(old.read_text())["records"] if (r["task"], r["variant"]) not in done] + records
        records.sort(key=lambda r: (r["task"], list(variants()).index(r["variant"])))
    Path(f"{args.out}.json").write_text(json.dumps({"machine": machine, "records": records}, indent=1))
    Path(f"{args.out}.md").write_text(table(records) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
