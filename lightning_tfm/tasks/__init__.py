"""LightningModules for the task families (translation, classification, language modeling, masked-LM
pretraining), and the learning-rate schedules they use."""

from lightning_tfm.tasks.classification import ClassificationModule
from lightning_tfm.tasks.language_model import LanguageModelModule
from lightning_tfm.tasks.masked_lm import MaskedLanguageModelModule, masked_lm_loss
from lightning_tfm.tasks.schedules import InverseSqrtSchedule, WarmupCosineSchedule
from lightning_tfm.tasks.translation import TranslationModule

__all__ = ["ClassificationModule", "InverseSqrtSchedule", "LanguageModelModule", "MaskedLanguageModelModule",
           "TranslationModule", "WarmupCosineSchedule", "masked_lm_loss"]
