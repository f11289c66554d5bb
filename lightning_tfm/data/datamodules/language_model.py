"""Language-model data: one token stream per split, cut into blocks of `block_size + 1` tokens.

Training draws blocks at random offsets, a fixed number of batches per epoch (nanoGPT's `get_batch`,
`karpathy/nanoGPT` train.py); evaluation walks the stream in consecutive windows so every token after the
first is predicted exactly once. The default is character-level Tiny Shakespeare with nanoGPT's split:
first 90% of the characters for training, last 10% for validation.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_tfm.data.batching import derive_seed
from lightning_tfm.data.datamodules.base import TextDataModule
from lightning_tfm.data.datamodules.splits import check_file
from lightning_tfm.data.prepare import Example, open_split
from lightning_tfm.data.readers import read_lines, read_text
from lightning_tfm.data.settings import Batching, Tokenization
from lightning_tfm.data.streams import iter_lines
from lightning_tfm.data.tokenize_workers import Framing
from lightning_tfm.data.tokenizers import SpecialTokens


class TokenBlocks(Dataset):
    """Item `offset` is {"ids": tokens[offset : offset + block_size + 1]}, a (block_size + 1,) int64 tensor.

    Args:
        tokens: (N,) the whole split: an int64 tensor, or an unsigned NumPy array (prepared rows, memory-mapped,
            so only the blocks read are loaded).
        block_size: context length; each item has one more token, the last target.
    """

    def __init__(self, tokens: Tensor | np.ndarray, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return len(self.tokens) - self.block_size  # number of valid offsets

    def __getitem__(self, offset: int) -> dict[str, Tensor]:
        block = self.tokens[offset: offset + self.block_size + 1]
        return {"ids": block if isinstance(block, Tensor) else torch.from_numpy(block.astype(np.int64))}


class RandomOffsetSampler(Sampler[int]):
    """`num_samples` offsets drawn uniformly with replacement from [0, num_offsets), new ones every epoch.

    The draw depends on (seed, epoch, rank) only: reproducible, and different on each DDP rank.

    Args:
        num_offsets: how many offsets are valid.
        num_samples: offsets per epoch (batches_per_epoch * batch_size).
        seed: base seed.
        rank: DDP rank, so ranks see different blocks.
    """

    def __init__(self, num_offsets: int, num_samples: int, seed: int = 0, rank: int = 0) -> None:
        self.num_offsets, self.num_samples, self.seed, self.rank = num_offsets, num_samples, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose offsets to draw; Lightning calls this before every training epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank))
        return iter(torch.randint(self.num_offsets, (self.num_samples,), generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def collate_blocks(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """{"ids": (B, block_size + 1)}: the model reads ids[:, :-1] and predicts ids[:, 1:]."""
    return {"ids": torch.stack([it["ids"] for it in items])}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """{"prompts": B id lists, "texts": B strings, "index": (B,)}; prompts differ in length, so no tensor."""
    return {"prompts": [it["prompt"] for it in items], "texts": [it["text"] for it in items],
            "index": torch.tensor([it["index"] for it in items])}


class LanguageModelDataModule(TextDataModule):
    """Token streams for next-token prediction, character-level Tiny Shakespeare by default.

    With `val_path=None`, the last `val_fraction` of the training file's characters is the validation split,
    cut by character position before tokenizing (nanoGPT: `data[:int(n * 0.9)]`, `data[int(n * 0.9):]`),
    and the tokenizer is trained on the first part only. Training batches are `batches_per_epoch` batches of
    blocks at random offsets (each DDP rank draws its own). Validation and test batches are the consecutive
    windows starting at 0, block_size, 2 * block_size, ...; the last `(N - 1) % block_size` tokens, fewer
    than one block, are not evaluated.

    Batches: "ids" (B, block_size + 1) int64; inputs are ids[:, :-1], targets ids[:, 1:]. No padding.
    Predict batches (prompts to continue, one per line of `predict_path`, in file order): "prompts", a list
    of B token id lists of different lengths; "texts", the B prompt strings; "index" (B,) int64.

    Args:
        train_path: a text file read whole, optionally compressed (.gz, .xz, .zst; `input.txt` finds `input.txt.gz`).
        val_path: validation text file, or None to split it off the end of train.
        test_path: test text file, or None.
        predict_path: prompts to continue, one a line (a line's own newline is not part of its prompt).
        val_fraction: with val_path=None, the fraction of the training file's characters (taken from its
            end) used for validation. Ignored when val_path is set.
        block_size: context length of a training example.
        batches_per_epoch: training batches per epoch (per DDP rank).
        tokenization: the tokenizer (`settings.Tokenization`), character-level by default.
        special_tokens: none is required; the default keeps only unk, for characters unseen in training.
        batching: `batch_size` blocks (or prompts) per batch and the DataLoader workers (`settings.Batching`);
            max_tokens must stay None, since every block has block_size tokens.
        seed: seed of the training offsets.
        prepared_dir: read the train, val and test token streams from rows prepared in this folder (`lightning_tfm
            prepare --config CONFIG`, or the first `fit`), memory-mapped, so a corpus larger than memory trains
            with flat memory; a change to the raw files, the tokenizer or val_fraction is refused until the data
            is prepared again. None reads and tokenizes the raw files.
    """

    tokenizer_home = "runs/tokenizers/language_model"

    def __init__(self, train_path: str = "../shared/data/tiny_shakespeare/input.txt", val_path: str | None = None,
                 test_path: str | None = None, predict_path: str | None = None, val_fraction: float = 0.1,
                 block_size: int = 256, batches_per_epoch: int = 1000,
                 tokenization: Tokenization = Tokenization(kind="char"),
                 special_tokens: SpecialTokens = SpecialTokens(pad=None, bos=None, eos=None),
                 batching: Batching = Batching(batch_size=64), seed: int = 0,
                 prepared_dir: str | None = None) -> None:
        super().__init__(tokenization, special_tokens, batching, seed)
        if batching.max_tokens is not None or batching.batch_size is None:
            raise ValueError(f"data.batching.max_tokens={batching.max_tokens}, batch_size={batching.batch_size}: "
                             "a language model's batches are batch_size blocks of block_size tokens; set "
                             "batch_size and leave max_tokens None")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction}, must be in [0, 1)")
        for key, value in (("block_size", block_size), ("batches_per_epoch", batches_per_epoch)):
            if value < 1:
                raise ValueError(f"data.{key}={value}, must be >= 1")
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.predict_path, self.val_fraction = predict_path, val_fraction
        self.block_size, self.batches_per_epoch = block_size, batches_per_epoch
        self.prepared_dir = prepared_dir
        self._texts: dict[str, str] = {}

    def training_files(self) -> list[str]:
        return [self.train_path]

    def training_texts(self) -> Iterator[str]:
        # whole lines, so subword trainers see sentence-sized pieces; "char" does not care. Streamed when the
        # data is prepared, so a corpus larger than memory trains its tokenizer too
        if self.prepared_dir is not None:
            yield from (example.texts[0] for example in self.raw_examples("train"))
        else:
            yield from self._split_text("train").splitlines(keepends=True)

    def tokenizer_source(self) -> dict[str, Any]:
        return {**super().tokenizer_source(), "val_fraction": self.val_fraction if self.val_path is None else 0.0}

    def build_dataset(self, split: str) -> TokenBlocks | list[dict[str, Any]]:
        if not self.has_split(split):
            raise ValueError(f"data.{split}_path is not set")
        if split == "predict":
            return self._prompts()
        if self.prepared_dir is not None:
            return self._blocks(split, open_split(self, split).tokens["ids"].values)
        tokens = torch.tensor(self.tokenizer.encode(self._split_text(split), add_special_tokens=False).ids,
                              dtype=torch.long)                                         # (N,)
        return self._blocks(split, tokens)

    def _blocks(self, split: str, tokens: Tensor | np.ndarray) -> TokenBlocks:
        if len(tokens) < self.block_size + 1:
            raise ValueError(f"data.{split} has {len(tokens)} tokens, fewer than data.block_size + 1 = "
                             f"{self.block_size + 1}; lower data.block_size")
        return TokenBlocks(tokens, self.block_size)

    # --- prepared rows (data/prepare.py's Preparable): each split one stream, stored in pieces of lines ----

    def prepared_fields(self) -> tuple[str, ...]:
        return ("ids",)

    def prepared_values(self) -> dict[str, list[str] | None]:
        return {}

    def prepared_settings(self) -> dict[str, Any]:
        return {"val_fraction": self.val_fraction if self.val_path is None else None,
                "special_tokens": self.special_tokens.tokens()}

    def keeps_text(self, split: str) -> bool:
        return False

    def raw_examples(self, split: str) -> Iterator[Example]:
        """The split's lines with their line ends (they join to the text `_split_text` reads whole); with
        val_path None, train and val are the file's characters before and after the val_fraction cut."""
        (path,) = self.source_files(split)
        cut = None
        if split in ("train", "val") and self.val_path is None:
            cut = int(sum(len(line) for line in iter_lines(path, keep_ends=True)) * (1 - self.val_fraction))
        seen = 0
        for number, line in enumerate(iter_lines(path, keep_ends=True), start=1):
            start, seen = seen, seen + len(line)
            if cut is not None:
                line = line[:max(0, cut - start)] if split == "train" else line[max(0, cut - start):]
            if line:
                yield Example((line,), number)

    def framing(self, split: str, field: str) -> Framing:
        return Framing()        # a stream: no special tokens, no length limit

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        _, rank = self.world()
        batch_size = self.batching.batch_size
        sampler = RandomOffsetSampler(len(dataset), self.batches_per_epoch * batch_size, self.seed, rank)
        return self.resumable(self.data_loader(dataset, batch_size=batch_size, sampler=sampler,
                                               collate_fn=collate_blocks))

    def predict_dataloader(self) -> DataLoader:
        """Prompts in file order, `batch_size` at a time."""
        prompts = self.dataset("predict")
        return self.bucketed_loader(prompts, [1] * len(prompts), collate_prompts, shuffle=False, pool_size=1)

    # --- internals ---------------------------------------------------------------------------------------

    def _split_text(self, split: str) -> str:
        if split not in self._texts:
            if split in ("train", "val") and self.val_path is None:
                text = read_text(check_file("train_path", self.train_path))   # or its .gz/.xz/.zst
                cut = int(len(text) * (1 - self.val_fraction))
                self._texts["train"], self._texts["val"] = text[:cut], text[cut:]
            else:
                self._texts[split] = read_text(check_file(f"{split}_path", getattr(self, f"{split}_path")))
        return self._texts[split]

    def _prompts(self) -> list[dict[str, Any]]:
        path = check_file("predict_path", self.predict_path)
        texts = read_lines(path)
        ids = self.encode(texts)
        for line, prompt in enumerate(ids, start=1):
            if not prompt:
                raise ValueError(f"{path}:{line}: empty prompt; give every line some text")
        return [{"index": i, "prompt": p, "text": t} for i, (p, t) in enumerate(zip(ids, texts))]

    def loader(self, split: str, shuffle: bool = False, pool_size: int = 1) -> DataLoader:
        """Evaluation batches: consecutive windows 0, block_size, 2 * block_size, ... in order, shared across DDP
        ranks (training draws random offsets in `train_dataloader`)."""
        dataset = self.dataset(split)
        starts = list(range(0, len(dataset), self.block_size))
        windows = torch.utils.data.Subset(dataset, starts)
        return self.bucketed_loader(windows, [1] * len(starts), collate_blocks, shuffle=False, pool_size=1)
