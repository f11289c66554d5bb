"""The LightningDataModules, one file per task family, on a shared base that owns the tokenizer."""

from lightning_tfm.data.datamodules.base import TextDataModule
from lightning_tfm.data.datamodules.classification import ClassificationDataModule
from lightning_tfm.data.datamodules.classification_data import ClassificationDataset, collate_classification
from lightning_tfm.data.datamodules.language_model import (
                                                           LanguageModelDataModule,
                                                           RandomOffsetSampler,
                                                           TokenBlocks,
                                                           collate_blocks,
                                                           collate_prompts,
)
from lightning_tfm.data.datamodules.masked_lm import MaskedLMDataModule
from lightning_tfm.data.datamodules.masked_lm_data import (
                                                           MaskedLMDataset,
                                                           MaskSeedBatchSampler,
                                                           PreparedMaskedLMDataset,
                                                           collate_fill_mask,
                                                           collate_masked_lm,
                                                           encode_with_masks,
)
from lightning_tfm.data.datamodules.translation import TranslationDataModule, TranslationDataset, collate_translation

__all__ = [
    "ClassificationDataModule", "ClassificationDataset", "LanguageModelDataModule", "MaskSeedBatchSampler",
    "MaskedLMDataModule", "MaskedLMDataset", "PreparedMaskedLMDataset", "RandomOffsetSampler", "TextDataModule",
    "TokenBlocks", "TranslationDataModule", "TranslationDataset", "collate_blocks", "collate_classification",
    "collate_fill_mask", "collate_masked_lm", "collate_prompts", "collate_translation", "encode_with_masks",
]
