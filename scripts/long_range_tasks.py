"""Seeded synthetic long-range tasks nobody can memorise: every split is drawn fresh from its own seed.

ListOps (Nangia & Bowman 2018, as in Long Range Arena, Tay et al. 2021): a nested expression of list operations
over digits, e.g. `[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]` = 5, read as a flat token sequence; the answer
(0-9) is a 10-way classification that needs the whole hierarchy, so a bidirectional model has to route
information over the full length. The generator is LRA's: an operator node with probability 0.25 (else a digit)
down to `max_depth`, 2..`max_args` arguments, lengths kept in [min_len, max_len] by rejection. MED is the lower
median (sorted[(n - 1) // 2]), SM the sum modulo 10.

Copy, for causal models: random symbols, a separator, and the same symbols again, each copied symbol predicted
from the past: every scored position must look back `length` positions, and the symbols are drawn afresh,
so nothing can be memorised. (Associative recall was tried first: at this model size it learns only after an
abrupt, seed-dependent phase change that 1,200 steps do not reliably reach.)

    python scripts/long_range_tasks.py --out data/long_range      # writes listops_{train,val,test}.tsv
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(d) for d in range(10))
LISTOPS_VOCAB = ("<pad>",) + DIGITS + OPERATORS + (END,)       # id 0 pads
VALUE_P = 0.25                                                  # LRA: an operator node with probability 0.25


class TooLong(Exception):
    """A tree passed the length limit while being drawn: drop it early instead of finishing it."""


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, budget: list[int]) -> list[str]:
    budget[0] -= 1
    if budget[0] < 0:
        raise TooLong
    if depth >= max_depth or rng.random() > VALUE_P:
        return [rng.choice(DIGITS)]
    tokens = [rng.choice(OPERATORS)]
    for _ in range(rng.randint(2, max_args)):
        tokens += _tree(rng, depth + 1, max_depth, max_args, budget)
    budget[0] -= 1
    if budget[0] < 0:
        raise TooLong
    return tokens + [END]


def evaluate_listops(tokens: list[str]) -> int:
    """The value of a ListOps expression given as tokens."""
    stack: list[list] = [[]]
    for token in tokens:
        if token in OPERATORS:
            stack.append([token])
        elif token == END:
            op, *args = stack.pop()
            stack[-1].append(_apply(op, args))
        else:
            stack[-1].append(int(token))
    (value,) = stack[0]
    return value


def _apply(op: str, args: list[int]) -> int:
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":
        return sorted(args)[(len(args) - 1) // 2]
    return sum(args) % 10


def listops(n: int, seed: int, min_len: int = 256, max_len: int = 512, max_depth: int = 10,
            max_args: int = 10) -> list[tuple[list[str], int]]:
    """n expressions (tokens, value) with min_len <= len(tokens) <= max_len, drawn from `seed`."""
    if not 2 <= min_len <= max_len:
        raise ValueError(f"listops: need 2 <= min_len={min_len} <= max_len={max_len}")
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        try:
            tokens = [rng.choice(OPERATORS)]       # the root is always an operation, as in LRA's files
            for _ in range(rng.randint(2, max_args)):
                tokens += _tree(rng, 1, max_depth, max_args, [max_len - len(tokens) - 1])
            tokens.append(END)
        except TooLong:
            continue
        if min_len <= len(tokens) <= max_len:
            rows.append((tokens, evaluate_listops(tokens)))
    return rows


def encode_listops(rows: list[tuple[list[str], int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(ids (N, L) right-padded with 0, real (N, L) bool, labels (N,)) for `rows`."""
    index = {token: i for i, token in enumerate(LISTOPS_VOCAB)}
    width = max(len(tokens) for tokens, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (tokens, _) in enumerate(rows):
        ids[i, : len(tokens)] = torch.tensor([index[t] for t in tokens])
    return ids, ids != 0, torch.tensor([label for _, label in rows])


@dataclass(frozen=True)
class Copy:
    """Copy a random sequence: `length` random symbols, a separator, then the same symbols again, each predicted
    from what came before. Each scored position must look back exactly `length` positions, to the symbol it
    predicts: a causal model that cannot see that far guesses (1 / n_symbols).

    Attributes:
        length: symbols to copy (sequence length 2 * length).
        n_symbols: symbols, ids 0..n_symbols-1; the separator is id n_symbols.
    """

    length: int = 64
    n_symbols: int = 16

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 1

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """(ids (n, 2 L), targets (n, 2 L)): targets are -100 before the separator; from it on, the next symbol
        of the copy."""
        if self.length < 1 or self.n_symbols < 2:
            raise ValueError(f"Copy: length={self.length} must be >= 1 and n_symbols={self.n_symbols} >= 2")
        L = self.length
        symbols = torch.randint(0, self.n_symbols, (n, L), generator=torch.Generator().manual_seed(seed))
        separator = torch.full((n, 1), self.n_symbols)
        ids = torch.cat([symbols, separator, symbols[:, :-1]], 1)                  # (n, 2L)
        targets = torch.cat([torch.full((n, L), -100), symbols], 1)               # predict the copy
        return ids, targets


def main() -> None:
    parser = argparse.ArgumentParser(description="Write seeded ListOps splits as TSV (expression<TAB>value).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs=3, default=[20000, 1000, 2000], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=512)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, size, seed in zip(("train", "val", "test"), args.sizes, (0, 1, 2)):
        rows = listops(size, seed, args.min_len, args.max_len)
        path = args.out / f"listops_{split}.tsv"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{' '.join(tokens)}\t{label}\n" for tokens, label in rows))
        tmp.replace(path)
        print(f"{path}: {size} rows")


if __name__ == "__main__":
    main()
