"""What every text DataModule shares: its tokenizer (trained once on the training split, or loaded), the
DDP rank, and the bucketed DataLoaders.

The tokenizer is trained by `prepare_data` (once per node) and saved as `<tokenization.save_dir>/tokenizer.json`
with a `tokenizer_source.json` beside it recording what it was trained on (files, sizes, settings). Later
runs and the other ranks load that file while the record still matches, and retrain when the data or the
settings change. Properties such as `vocab_size` train or load the tokenizer on first use, so LightningCLI
can link `data.vocab_size` into the model right after building the datamodule.

Every checkpoint records how far training is into its epoch (`state_dict`), and the training loader of a run
resumed from it starts at the next batch (`resumable`), so a crash mid-epoch costs no repeated or skipped data.

Under DDP our batch samplers split the data across ranks themselves (every rank gets the same number of
batches), so the Trainer must not inject its own: use `Trainer(use_distributed_sampler=False)`; otherwise
Lightning stops with a TypeError saying so.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from lightning_tfm.data.batching import BucketBatchSampler, ResumableBatches
from lightning_tfm.data.datamodules.splits import check_file
from lightning_tfm.data.prepare import prepare, read_manifest
from lightning_tfm.data.settings import Batching, Tokenization
from lightning_tfm.data.tokenizers import (
    SpecialIds,
    SpecialTokens,
    load_tokenizer,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

log = logging.getLogger(__name__)
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class TextDataModule(L.LightningDataModule):
    """Base of the text DataModules; subclasses say what to train the tokenizer on and build the datasets.

    Args:
        tokenization: the tokenizer to load, or to train on the training split and keep (`settings.Tokenization`).
        special_tokens: the string of each special role; a trained tokenizer gives them ids 0, 1, ...
        batching: batch sizes and DataLoader workers (`settings.Batching`).
        seed: seed of the batch order (and of any random split).
    """

    #: special roles a subclass cannot work without
    required_specials: tuple[str, ...] = ()
    #: where a trained tokenizer is kept when `tokenization.save_dir` is None
    tokenizer_home = "runs/tokenizers/text"

    def __init__(self, tokenization: Tokenization, special_tokens: SpecialTokens, batching: Batching,
                 seed: int) -> None:
        super().__init__()
        self.tokenization, self.special_tokens = tokenization, special_tokens
        self.batching, self.seed = batching, seed
        self._tokenizer: Tokenizer | None = None
        self._special_ids: SpecialIds | None = None
        self._datasets: dict[str, Dataset] = {}
        self._resume: tuple[int, int] | None = None
        # No save_hyperparameters(): the settings are dataclasses, which `torch.load(weights_only=True)` refuses
        # to unpickle from a checkpoint; LightningCLI's config.yaml records these arguments instead.

    def __str__(self) -> str:
        # LightningDataModule.__str__ builds every DataLoader (tokenizing whole splits) to report their sizes,
        # and jsonargparse formats the datamodule into a log message for each link it skips (data.n_classes
        # of a datamodule without labels), so the default made `predict` tokenize the training set twice.
        return type(self).__name__

    # --- what subclasses provide -------------------------------------------------------------------------

    def training_texts(self) -> Iterator[str]:
        """The texts the tokenizer is trained on (the training split only)."""
        raise NotImplementedError

    def training_files(self) -> list[str]:
        """Files `training_texts` reads, fingerprinted to decide whether a saved tokenizer is stale."""
        raise NotImplementedError

    def tokenizer_source(self) -> dict[str, Any]:
        """Everything a trained tokenizer depends on; subclasses add their split settings."""
        files = []
        for name in self.training_files():
            found = check_file("train_path", name)
            stat = found.stat()
            files.append({"path": str(found.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        return {"kind": self.tokenization.kind, "vocab_size": self.tokenization.vocab_size,
                "special_tokens": self.special_tokens.tokens(), "files": files}

    # --- the tokenizer -----------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, loaded from `tokenization.path`, reused from `tokenization.save_dir`, or trained now."""
        if self._tokenizer is None:
            path = self.tokenization.path
            if path is not None:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"data.tokenization.path={path} does not exist; leave it "
                                            "unset to train one on the training split")
                tokenizer = load_tokenizer(path)
            else:
                tokenizer = self._trained_tokenizer()
            # fail here, naming the missing token, rather than at the first batch
            self._special_ids = special_token_ids(tokenizer, self.special_tokens, self.required_specials)
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def special_ids(self) -> SpecialIds:
        """Ids of the special roles (pad, unk, bos, eos, cls, sep, mask); None where unused."""
        if self._special_ids is None:
            self._special_ids = special_token_ids(self.tokenizer, self.special_tokens, self.required_specials)
        return self._special_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included: the model's embedding size."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token (None if the role is unused)."""
        return self.special_ids.pad

    @property
    def bos_id(self) -> int | None:
        """Id of the begin-of-sequence token (None if the role is unused)."""
        return self.special_ids.bos

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token (None if the role is unused)."""
        return self.special_ids.eos

    def prepare_data(self) -> None:
        """Train and save the tokenizer and, for a datamodule with `prepared_dir` set (`data/prepare.py`'s
        Preparable), prepare the splits if they never were (Lightning calls this on one process per node)."""
        _ = self.tokenizer
        folder = getattr(self, "prepared_dir", None)
        if folder is not None and read_manifest(Path(folder) / "manifest.json") is None:
            print(prepare(self, workers=min(4, os.cpu_count() or 1)))      # type: ignore[arg-type]

    def _trained_tokenizer(self) -> Tokenizer:
        path = Path(self.tokenization.save_dir or self.tokenizer_home) / "tokenizer.json"
        record = path.with_name("tokenizer_source.json")
        source = self.tokenizer_source()
        if path.is_file() and record.is_file() and json.loads(record.read_text(encoding="utf-8")) == source:
            log.info("reusing the tokenizer in %s", path)
            return load_tokenizer(path)
        if path.is_file():
            log.info("retraining %s: its training data or settings changed", path)
        tokenizer = train_tokenizer(self.training_texts(), self.tokenization.kind, self.tokenization.vocab_size,
                                    self.special_tokens)
        save_tokenizer(tokenizer, path)
        tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(source, indent=1), encoding="utf-8")
        os.replace(tmp, record)
        log.info("trained a %s tokenizer with %d tokens, saved to %s", self.tokenization.kind,
                 tokenizer.get_vocab_size(), path)
        return tokenizer

    # --- max_len, for the datamodules whose rows have one (`truncation`; data/prepare.py's Preparable) -------

    #: what one row of each field is called in messages ("source", "target", "input")
    row_names: dict[str, str] = {}

    def too_long(self, split: str, field: str, where: str, length: int) -> ValueError:
        """The error for a row of `length` ids (special tokens included) over `max_len`, at `where`."""
        return ValueError(f"{where}: {self.row_names.get(field, field)} has {length} tokens with its special "
                          f"tokens, more than data.truncation.max_len={self._max_len()}; set "
                          "data.truncation.longer=cut to cut it, or raise data.truncation.max_len")

    def truncated(self, split: str, field: str, count: int, total: int, first: str) -> None:
        """Warn once that `count` of `total` rows were cut to `max_len`, the first at `first`."""
        rank_zero_warn(f"data.{split}: truncated {count} of {total} {self.row_names.get(field, field)}s to "
                       f"data.truncation.max_len={self._max_len()} tokens (first at {first})")

    def _max_len(self) -> int | None:
        truncation = getattr(self, "truncation", None)
        return None if truncation is None else truncation.max_len

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (added by each DataModule where it needs them)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    # --- splits ------------------------------------------------------------------------------------------

    def has_split(self, split: str) -> bool:
        """Whether `split` ("train", "val", "test" or "predict") is configured: its `<split>_path` is set, and for
        "val" alternatively a `val_fraction` to carve from the training split."""
        if split == "val" and getattr(self, "val_fraction", 0.0) > 0:
            return True
        return getattr(self, f"{split}_path", None) is not None

    def prepared_splits(self) -> list[str]:
        """The configured splits that `lightning_tfm prepare` writes (predict files are always read raw)."""
        return [split for split in ("train", "val", "test") if self.has_split(split)]

    def source_files(self, split: str) -> list[str]:
        """The raw file a split is read from (a carved validation split's is the training file)."""
        key = "train" if split == "val" and getattr(self, "val_path", None) is None else split
        return [str(check_file(f"{key}_path", getattr(self, f"{key}_path")))]

    def build_dataset(self, split: str) -> Dataset:
        """Read and tokenize one split."""
        raise NotImplementedError

    def dataset(self, split: str) -> Dataset:
        """The split's dataset, built on first use and kept."""
        if split not in self._datasets:
            self._datasets[split] = self.build_dataset(split)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the splits a stage needs: "fit", "validate", "test", "predict", or None for
        train, val and test."""
        for split in _STAGE_SPLITS.get(stage or "", ("train", "val", "test")):
            if self.has_split(split):
                self.dataset(split)

    # --- loaders -----------------------------------------------------------------------------------------

    def loader(self, split: str, shuffle: bool, pool_size: int = 16384) -> DataLoader:
        """The DataLoader of one split: what each subclass batches and how."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self.resumable(self.loader("train", shuffle=True))

    def val_dataloader(self) -> DataLoader | list:
        return self.loader("val", shuffle=False) if self.has_split("val") else []

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches in input order (no length sorting), so predictions come out in the order of the file."""
        return self.loader("predict", shuffle=False, pool_size=1)

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the training batches done in it (the same on every rank: each has as many batches) and
        the number of processes; Lightning stores this in every checkpoint."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches_done": done, "world_size": trainer.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called by Lightning when fit resumes from a checkpoint, before the training loader is built.

        Raises:
            ValueError: fit resumes a mid-epoch checkpoint written by another number of processes, whose batches
                were cut differently: resuming would skip or repeat examples (validate, test and predict only
                read its weights, on any number).
        """
        self._resume = (state["epoch"], state["batches_done"]) if state else None
        saved, now = state.get("world_size"), self.world()[0]
        fitting = self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING   # not validate/predict
        if fitting and self._resume is not None and self._resume[1] > 0 and saved is not None and saved != now:
            raise ValueError(f"the checkpoint stopped {self._resume[1]} batches into epoch {self._resume[0]} of a "
                             f"run with {saved} processes, and this run has {now}: the epoch's batches are split "
                             f"across processes differently, so resuming there would skip or repeat examples; "
                             f"resume on {saved} devices, or from a checkpoint written at the end of an epoch")

    def resumable(self, loader: DataLoader) -> DataLoader:
        """The training loader, starting at the batch after the checkpoint's when fit resumes mid-epoch."""
        batches = ResumableBatches(loader.batch_sampler)
        if self._resume is not None:
            # Lightning (2.6) draws the first batch of a resumed epoch before it calls set_epoch: set it now
            batches.set_epoch(self._resume[0])
            batches.resume(*self._resume)
            self._resume = None
        return self.data_loader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn)

    def world(self) -> tuple[int, int]:
        """(num_replicas, rank) from the attached Trainer, else torch.distributed, else (1, 0)."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def bucketed_loader(self, dataset: Dataset, lengths: Sequence[int], collate: Callable[[list[Any]], Any],
                        shuffle: bool, pool_size: int = 16384) -> DataLoader:
        """A DataLoader over `dataset` with a `BucketBatchSampler` of `batching`'s sizes, split across this
        process's DDP rank."""
        num_replicas, rank = self.world()
        sampler = BucketBatchSampler(lengths, max_tokens=self.batching.max_tokens,
                                     batch_size=self.batching.batch_size, shuffle=shuffle, seed=self.seed,
                                     pool_size=pool_size, num_replicas=num_replicas, rank=rank)
        return self.data_loader(dataset, batch_sampler=sampler, collate_fn=collate)

    def data_loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        """A DataLoader with this datamodule's worker processes and a generator of its own. Every iterator a
        DataLoader builds draws a seed for its workers; from torch's global generator (the default) that draw
        would shift dropout's random numbers once per epoch and per validation, so a run resumed at an epoch's
        start would drop other units than the uninterrupted run did."""
        workers = self.batching.num_workers
        return DataLoader(dataset, num_workers=workers, persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(self.seed), **kwargs)
