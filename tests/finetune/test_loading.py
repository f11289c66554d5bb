"""Starting a task from a pretrained source: what loads, what is new, what is dropped, and the errors."""

import pytest
import torch
from checkpoint_files import TINY_DECODER, TINY_ENCODER, write_checkpoint

from lightning_tfm.finetune import read_source
from lightning_tfm.models.presets import TinyEncoder
from lightning_tfm.tasks import ClassificationModule, LanguageModelModule, MaskedLanguageModelModule


def mlm_checkpoint(tmp_path, tokenizer, seed=0):
    torch.manual_seed(seed)
    mlm = MaskedLanguageModelModule(TinyEncoder, vocab_size=tokenizer.get_vocab_size())
    mlm.tokenizer = tokenizer
    return mlm, write_checkpoint(mlm, tmp_path / "mlm.ckpt", TINY_ENCODER)


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level("INFO")


def test_masked_lm_to_classifier_loads_the_backbone_and_reports_the_new_head(tmp_path, tokenizer, caplog):
    mlm, path = mlm_checkpoint(tmp_path, tokenizer)
    task = ClassificationModule(vocab_size=tokenizer.get_vocab_size(), n_classes=3, init_from=str(path))
    backbone = {k: v for k, v in mlm.state_dict().items() if k.startswith("model.")}
    for name, value in backbone.items():
        assert torch.equal(task.state_dict()[name], value), name
    report = caplog.text
    assert f"init_from {path} (checkpoint): loaded {len(backbone)} weights, 2 new, 6 dropped" in report
    assert "new (initialised here): head.classifier.weight, head.classifier.bias" in report
    assert "head.dense.weight" in report and "head.output.bias" in report
    assert task.tokenizer.to_str() == tokenizer.to_str()
    # the architecture came from the source and is recorded, so this run's checkpoints need no source
    assert task.hparams["model"] == TINY_ENCODER and task.hparams["init_from"] is None
    assert task.pretrained_from == str(path)


def test_a_classifier_checkpoint_loads_whole_and_a_new_label_set_gets_a_new_head(tmp_path, tokenizer):
    torch.manual_seed(0)
    first = ClassificationModule(TinyEncoder, tokenizer.get_vocab_size(), n_classes=3)
    path = write_checkpoint(first, tmp_path / "cls.ckpt", TINY_ENCODER)
    same = ClassificationModule(vocab_size=tokenizer.get_vocab_size(), n_classes=3, init_from=str(path))
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in same.state_dict().items())
    other = ClassificationModule(vocab_size=tokenizer.get_vocab_size(), n_classes=5, init_from=str(path))
    assert not torch.equal(other.head.classifier.bias[:3], torch.ones(3))      # built, not loaded
    assert other.head.classifier.weight.shape == (5, 32)


def test_a_backbone_unlike_the_source_is_an_error_naming_the_weight(tmp_path, tokenizer):
    _, path = mlm_checkpoint(tmp_path, tokenizer)
    wider = lambda v: TinyEncoder.__mro__[1](v, d_model=32, n_layers=2, n_heads=4, d_ff=128)  # noqa: E731
    with pytest.raises(ValueError, match=r"the backbone does not match the source: .*model\.stack\.layers\.0\."
                                         r"feedforward\.fc1\.weight \(64, 32\) in the source, \(128, 32\) here"):
        ClassificationModule(wider, tokenizer.get_vocab_size(), init_from=str(path))


def test_another_tokenizer_is_an_error_that_says_to_use_the_sources(tmp_path, tokenizer):
    _, path = mlm_checkpoint(tmp_path, tokenizer)
    with pytest.raises(ValueError, match=r"the data's tokenizer has 90 tokens but init_from .* has 60; fine-tune "
                                         r"with the source's tokenizer"):
        ClassificationModule(vocab_size=90, init_from=str(path))
    with pytest.raises(ValueError, match=r"model\.embedding\.tokens\.weight \(60, 32\) in the source, \(90, 32\) "
                                         r"here.*the source's vocabulary has 60 tokens"):
        ClassificationModule(TinyEncoder, 90, init_from=str(path))


def test_sources_that_are_not_ours_or_missing_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"init_from=.*nothing\.ckpt does not exist"):
        read_source(tmp_path / "nothing.ckpt")
    with pytest.raises(FileNotFoundError, match=r"is a folder with neither config\.yaml \+ model\.safetensors"):
        read_source(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match=r"does not record its model's architecture"):
        read_source(tmp_path / "foreign.ckpt")


def test_a_task_needs_an_architecture_or_a_source():
    with pytest.raises(ValueError, match=r"give `model` \(an architecture\) or `init_from`"):
        LanguageModelModule(vocab_size=10)


def test_a_decoder_keeps_its_lm_head(tmp_path, tokenizer):
    from lightning_tfm.models.presets import TinyDecoder
    torch.manual_seed(0)
    lm = LanguageModelModule(TinyDecoder, 60)
    path = write_checkpoint(lm, tmp_path / "lm.ckpt", TINY_DECODER)
    again = LanguageModelModule(vocab_size=60, init_from=str(path)).eval()
    ids = torch.randint(0, 60, (2, 9))
    torch.testing.assert_close(again(ids), lm.eval()(ids))


@pytest.fixture
def bert_classifier(tmp_path):
    """A random-weight BertForSequenceClassification (3 labels) saved as save_pretrained writes it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    peer = transformers.BertForSequenceClassification(config).eval()
    peer.save_pretrained(tmp_path / "bert")
    return peer, tmp_path / "bert"


def test_a_hugging_face_classifier_loads_whole_and_computes_its_logits(bert_classifier, caplog):
    peer, path = bert_classifier
    task = ClassificationModule(vocab_size=60, n_classes=3, pooling="cls", pooler=True, init_from=str(path)).eval()
    assert "loaded" in caplog.text and ", 0 new, 0 dropped" in caplog.text
    ids = torch.randint(5, 60, (3, 11))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = mask[2, 4:] = False
    with torch.no_grad():
        want = peer(ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids)).logits
        torch.testing.assert_close(task(ids, mask), want, atol=1e-5, rtol=1e-5)


def test_a_hugging_face_head_that_does_not_fit_is_reported(bert_classifier, caplog):
    _, path = bert_classifier
    ClassificationModule(vocab_size=60, n_classes=2, pooling="cls", init_from=str(path))   # no pooler, 2 labels
    assert "2 new, 2 dropped" in caplog.text
    assert "new (initialised here): head.classifier.weight (shape (3, 32) in the source, (2, 32) here)" in caplog.text
    assert "dropped (not used by this task): head.pooler.bias, head.pooler.weight" in caplog.text
