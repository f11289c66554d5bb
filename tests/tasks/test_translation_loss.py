import math

import torch

from lightning_tfm.models.presets import TinyEncoderDecoder
from lightning_tfm.tasks.translation import TranslationModule


def test_label_smoothed_loss_equals_its_formula_and_ignores_padding():
    torch.manual_seed(0)
    task = TranslationModule(TinyEncoderDecoder, vocab_size=20, label_smoothing=0.1).eval()
    src = torch.randint(4, 20, (2, 5))
    tgt = torch.tensor([[1, 7, 8, 9, 2], [1, 5, 2, 0, 0]])                  # BOS .. EOS, then padding
    batch = {"src": src, "src_mask": torch.ones_like(src, dtype=torch.bool), "tgt": tgt, "tgt_mask": tgt != 0}
    loss, n_tokens = task._loss(batch)
    logits = task.model(src, tgt[:, :-1], batch["src_mask"], batch["tgt_mask"][:, :-1])
    eps, V, total, count = 0.1, 20, 0.0, 0
    for b in range(2):
        for t in range(4):
            y = tgt[b, t + 1].item()
            if not batch["tgt_mask"][b, t + 1]:
                continue
            log_p = logits[b, t].log_softmax(-1)
            # Szegedy et al. 2016: q = (1 - eps) one_hot(y) + eps / V, loss = -sum_k q_k log p_k
            total += -((1 - eps) * log_p[y] + eps / V * log_p.sum()).item()
            count += 1
    assert n_tokens == count == 6
    assert math.isclose(loss.item(), total / count, rel_tol=1e-5)


def test_corpus_bleu_equals_sacrebleu_on_the_0_to_100_scale():
    import sacrebleu

    from lightning_tfm.tasks.translation import CorpusBLEU

    hypotheses = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee!", "Eine Frau liest"]
    references = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]
    bleu = CorpusBLEU(tokenize="13a")
    bleu.update(hypotheses[:2], [[r] for r in references[:2]])       # over batches, as in validation
    bleu.update(hypotheses[2:], [[r] for r in references[2:]])
    want = sacrebleu.corpus_bleu(hypotheses, [references], tokenize="13a").score
    assert math.isclose(bleu.compute().item(), want, rel_tol=1e-5)
    assert 10 < want < 100
