"""Data: readers (files to records), tokenizers, batching, masked-LM masking and the LightningDataModules."""

from lightning_tfm.data.batching import BucketBatchSampler
from lightning_tfm.data.datamodules import (
                                            ClassificationDataModule,
                                            LanguageModelDataModule,
                                            MaskedLMDataModule,
                                            TextDataModule,
                                            TranslationDataModule,
)
from lightning_tfm.data.masking import IGNORE_INDEX, mask_tokens
from lightning_tfm.data.padding import pad_batch, padded_length
from lightning_tfm.data.readers import Row, is_table, read_lines, read_parallel, read_table, read_text, table_format
from lightning_tfm.data.settings import Batching, Tokenization, Truncation
from lightning_tfm.data.tokenizers import (
                                            SpecialIds,
                                            SpecialTokens,
                                            TokenizerKind,
                                            load_tokenizer,
                                            save_tokenizer,
                                            special_token_ids,
                                            train_tokenizer,
)

__all__ = [
    "Batching", "BucketBatchSampler", "ClassificationDataModule", "IGNORE_INDEX", "LanguageModelDataModule",
    "MaskedLMDataModule", "Row", "SpecialIds", "SpecialTokens", "TextDataModule", "Tokenization", "TokenizerKind",
    "TranslationDataModule", "Truncation", "is_table", "load_tokenizer", "mask_tokens", "pad_batch", "padded_length",
    "read_lines", "read_parallel", "read_table", "read_text", "save_tokenizer", "special_token_ids", "table_format",
    "train_tokenizer",
]
