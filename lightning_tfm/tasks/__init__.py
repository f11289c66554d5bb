"""LightningModules for the three task families, and the learning-rate schedules they use."""

from lightning_tfm.tasks.classification import ClassificationModule
from lightning_tfm.tasks.language_model import LanguageModelModule
from lightning_tfm.tasks.schedules import InverseSqrtSchedule, WarmupCosineSchedule
from lightning_tfm.tasks.translation import TranslationModule

__all__ = ["ClassificationModule", "InverseSqrtSchedule", "LanguageModelModule", "TranslationModule",
           "WarmupCosineSchedule"]
