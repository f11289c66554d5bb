"""Pictures: attention maps of a trained model, what each attention variant lets a query see, positional
encodings, learning-rate schedules, learning curves and scaling plots, each drawn by one command
(`lightning_tfm attention`, `lightning_tfm plot ...`), and attention maps logged during training
(`lightning_tfm.callbacks.AttentionMapImages`)."""

from lightning_tfm.viz.recorder import AttentionRecorder, attention_groups, rollout

__all__ = ["AttentionRecorder", "attention_groups", "rollout"]
