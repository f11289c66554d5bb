"""Seeded synthetic long-range tasks nobody can memorise: every split is drawn fresh from its own seed.

ListOps (Nangia & Bowman 2018, as in Long Range Arena, Tay et al. 2021): a nested expression of list operations
over digits, e.g. `[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]` = 5, read as a flat token sequence; the answer
(0-9) is a 10-way classification that needs the whole hierarchy, so a bidirectional model has to route
information over the full length. The generator is LRA's: an operator node with probability 0.25 (else a digit)
down to `max_depth`, 2..`max_args` arguments, lengths kept in [min_len, max_len] by rejection. MED is the lower
median (sorted[(n - 1) // 2]), SM the sum modulo 10.

Multi-query associative recall (after Arora et al. 2023, "Zoology"), for causal models: `n_pairs` key-value
pairs, each one token, scattered over a long context of filler, then every key again in a random order. At
each repeated key the model predicts its value; only those positions are scored. Keys are distinct within a
sequence and pairs are drawn afresh, so the only way to answer is to look back at the pair, wherever it is.

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
class Recall:
    """Multi-query associative recall where a pair is one token: ids 0..K*V-1 are the pairs (key k, value v) =
    k * V + v, then K query tokens (one per key), V answer tokens (one per value) and a filler token.

    A sequence scatters `n_pairs` pairs with distinct keys over a context of filler, `length - n_pairs` tokens
    long, then asks for every key in a random order; at each query the model predicts the answer token of that
    key's value. One attention layer can solve it (match the query's key against the pairs' keys, read the
    value), but only by looking back up to length - 1 positions: a model that cannot see the pair guesses
    (1 / n_values).

    Attributes:
        n_pairs: pairs (and queries) per sequence.
        n_keys: keys K, >= n_pairs.
        n_values: values V.
        length: sequence length, >= 2 * n_pairs.
    """

    n_pairs: int = 8
    n_keys: int = 8
    n_values: int = 8
    length: int = 256

    @property
    def vocab_size(self) -> int:
        return self.n_keys * self.n_values + self.n_keys + self.n_values + 1

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """(ids (n, length), targets (n, length)): targets are -100 except at the queries, where they hold the
        answer token (the next-token prediction at that position)."""
        K, V, P, L = self.n_keys, self.n_values, self.n_pairs, self.length
        if K < P:
            raise ValueError(f"Recall: n_keys={K} < n_pairs={P}: keys must be distinct")
        if L < 2 * P:
            raise ValueError(f"Recall: length={L} < 2 * n_pairs={2 * P}")
        g = torch.Generator().manual_seed(seed)
        keys = torch.rand(n, K, generator=g).argsort(1)[:, :P]                     # distinct per row
        values = torch.randint(0, V, (n, P), generator=g)
        slots = torch.rand(n, L - P, generator=g).argsort(1)[:, :P].sort(1).values  # where the pairs sit
        context = torch.full((n, L - P), K * V + K + V).scatter(1, slots, keys * V + values)
        order = torch.rand(n, P, generator=g).argsort(1)
        ids = torch.cat([context, K * V + keys.gather(1, order)], 1)                 # context, then queries
        targets = torch.full_like(ids, -100)
        targets[:, L - P:] = K * V + K + values.gather(1, order)
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
