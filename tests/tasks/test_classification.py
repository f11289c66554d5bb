"""Multi-label classification: one sigmoid per label (binary cross-entropy, as torch computes it), exact-match
accuracy, and predictions that name every label above one half."""

import torch
import torch.nn.functional as F

from lightning_tfm.models.presets import TinyEncoder
from lightning_tfm.tasks import ClassificationModule


def batch():
    torch.manual_seed(0)
    return {"ids": torch.randint(4, 50, (4, 9)), "mask": torch.ones(4, 9, dtype=torch.bool),
            "labels": torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.float)}


def test_multi_label_loss_is_binary_cross_entropy_per_label():
    task = ClassificationModule(TinyEncoder, 50, n_classes=3, multi_label=True).eval()
    b = batch()
    logits = task(b["ids"], b["mask"])
    torch.testing.assert_close(task._loss(logits, b["labels"]), F.binary_cross_entropy_with_logits(logits, b["labels"]))


def test_multi_label_accuracy_is_exact_match_and_predictions_list_the_labels():
    task = ClassificationModule(TinyEncoder, 50, n_classes=3, multi_label=True).eval()
    task.label_names = ["art", "sport", "tech"]
    b = batch()
    with torch.no_grad():
        task.head.classifier.weight.zero_()
        task.head.classifier.bias.copy_(torch.tensor([2.0, -2.0, 2.0]))       # always predicts {art, tech}
    task.val_metrics.update((task._logits(b)).sigmoid(), b["labels"].long())
    assert task.val_metrics.compute()["val_acc"].item() == 0.25              # only row 0 is exactly right
    predictions = task.predict_step(b, 0)
    assert [p["labels"] for p in predictions] == [["art", "tech"]] * 4
    assert abs(predictions[0]["probabilities"]["sport"] - torch.sigmoid(torch.tensor(-2.0)).item()) < 1e-6
