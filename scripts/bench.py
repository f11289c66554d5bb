"""Speed and memory of our three assemblies against Hugging Face transformers, in one process (issue 7).

For each family, a transformers model with random weights (nothing downloaded) is built and ours is converted
from it with `from_huggingface`, so config and weights are the same; before anything is timed, their logits must
agree to 1e-4. Decoder-only: `DecoderOnly` vs `GPT2LMHeadModel`; encoder-only classifier: `EncoderOnly` +
`ClassificationHead` vs `BertForSequenceClassification`; encoder-decoder: `EncoderDecoder` vs `MarianMTModel`.
Measured, alternating ours and peer after warm-up, as the median of repeats (min and max kept as the spread):
training tokens/s (forward + backward + AdamW), greedy new tokens/s at batch 1 and 16 with the KV cache, beam
search sentences/s (beam 4, length penalty 0.6; GNMT's form in ours, |Y|^alpha in transformers), peak memory,
and tokens/s of our DataModules (tokenize + batch) on the shipped corpora against our training consumption.
Both searches are made to emit exactly the requested number of tokens: EOS is masked out of the scores, as
transformers' `min_new_tokens` does. On a GPU it also reports MFU of a GPT-2-small-sized decoder trained in bf16
with torch.compile (PaLM, Chowdhery et al. 2022, appendix B). fp32 everywhere else.

    python scripts/bench.py                          # default sizes; minutes on 2 CPU cores
    python scripts/bench.py --quick                  # under 3 minutes on 2 idle CPU cores
    python scripts/bench.py --json results/bench.json --threads 2 --data ../shared/data
    python scripts/bench.py --quick --tiny --only decoder data    # a seconds-long check that the script runs
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from lightning_tfm.callbacks import count_tokens
from lightning_tfm.data.datamodules import ClassificationDataModule, LanguageModelDataModule, TranslationDataModule
from lightning_tfm.decoding import beam_search, greedy_search
from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly
from lightning_tfm.models.heads import ClassificationHead
from lightning_tfm.models.hf_convert import from_huggingface

Run = Callable[[], int]          # does one unit of work, returns how many items (tokens, sentences) it produced
PAD, BOS, EOS = 0, 1, 2
FAMILIES = ("decoder", "classifier", "seq2seq", "data", "mfu")
# dense bf16 peak FLOP/s by device name, most specific first (vendor data sheets)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12), ("L4", 121e12))


@dataclass(frozen=True)
class Sizes:
    """Model and workload sizes; `prompt`/`new` are the greedy prompt and output, `beam_*` the beam workload."""

    n_layers: int = 6
    d_model: int = 384
    n_heads: int = 6
    vocab: int = 8192
    seq: int = 256
    cls_seq: int = 128
    batch: int = 8
    prompt: int = 64
    new: int = 128
    beam_batch: int = 8
    beam_src: int = 32
    beam_new: int = 32
    repeats: int = 5
    warmup: int = 2


QUICK = dict(seq=128, cls_seq=64, batch=4, prompt=32, new=32, beam_batch=4, beam_src=16, beam_new=16, repeats=3,
             warmup=1)
TINY = dict(QUICK, n_layers=2, d_model=64, n_heads=4, vocab=512, seq=32, cls_seq=16, batch=2, prompt=8, new=8,
            beam_batch=2, beam_src=8, beam_new=8, repeats=2)


@dataclass
class Record:
    """One measurement; ratio is ours/peer (higher is better), peer/ours for memory."""

    name: str
    ours: float
    peer: float | None
    unit: str
    ratio: float | None
    ours_min: float | None = None
    ours_max: float | None = None
    peer_min: float | None = None
    peer_max: float | None = None
    note: str = ""


class Bench:
    """Device, sizes, timing and memory helpers, and the records collected so far."""

    def __init__(self, sizes: Sizes, device: torch.device) -> None:
        self.s, self.device = sizes, device
        self.records: list[Record] = []
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def rate(self, run: Run) -> float:
        self.sync()
        start = time.perf_counter()
        n = run()
        self.sync()
        return n / (time.perf_counter() - start)

    def compare(self, name: str, unit: str, ours: Run, peer: Run, note: str = "") -> Record:
        """Warm up both, then time them alternately, swapping who goes first every repeat (cancels drift)."""
        for _ in range(self.s.warmup):
            ours(), peer()
        rates: dict[str, list[float]] = {"ours": [], "peer": []}
        for i in range(self.s.repeats):
            for key, run in ((("ours", ours), ("peer", peer)) if i % 2 == 0 else (("peer", peer), ("ours", ours))):
                rates[key].append(self.rate(run))
        o, p = statistics.median(rates["ours"]), statistics.median(rates["peer"])
        return self.add(Record(name, o, p, unit, o / p, min(rates["ours"]), max(rates["ours"]), min(rates["peer"]),
                               max(rates["peer"]), note))

    def compare_memory(self, name: str, ours: Run, peer: Run) -> Record | None:
        """Peak memory of one more call each (after `compare` warmed them up, so optimizer state exists)."""
        if self.device.type != "cuda" and not Path("/proc/self/statm").is_file():
            self.log(f"{name}: skipped, this OS has no /proc/self/statm to read the resident set from")
            return None
        o, p = self.peak_mib(ours), self.peak_mib(peer)
        method = "max_memory_allocated above the level at entry" if self.device.type == "cuda" else \
            "peak RSS above the level at entry, sampled every 0.5 ms, after malloc_trim"
        return self.add(Record(name, o, p, "MiB", p / o if o else None, note=method))

    def peak_mib(self, run: Run) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return _rss_peak_mib(run)

    def add(self, record: Record) -> Record:
        self.records.append(record)
        peer = "" if record.peer is None else f" peer {record.peer:,.1f},"
        self.log(f"{record.name}: ours {record.ours:,.1f},{peer} {record.unit}, ratio {_fmt(record.ratio)}")
        return record


# --- CPU memory ------------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak_mib(run: Run) -> float:
    """CPU has no allocator statistics for tensors, so watch the process's resident set from a thread while
    `run` executes (torch ops release the GIL). glibc keeps freed memory for reuse, which would hide a second
    model's allocations behind the first one's leftovers: malloc_trim returns it to the OS before the baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass                                  # not glibc: the figure may read low
    base = peak = _rss_bytes()
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(5e-4)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run()
    done.set()
    watcher.join()
    return (max(peak, _rss_bytes()) - base) / 2 ** 20


# --- building the pairs and checking they compute the same thing ----------------------------------------------

def _check_parity(name: str, got: Tensor, want: Tensor, log: Callable[[str], None]) -> None:
    diff = (got - want).abs().max().item()
    if not diff < 1e-4:
        raise SystemExit(f"{name}: ours and transformers differ by {diff:.3g} (bound 1e-4); the comparison would "
                         "not time the same computation")
    log(f"{name}: logits agree, max abs diff {diff:.2g}")


def _gpt2_pair(s: Sizes, positions: int, dropout: float = 0.1) -> tuple[nn.Module, DecoderOnly]:
    cfg = transformers.GPT2Config(vocab_size=s.vocab, n_positions=positions, n_embd=s.d_model, n_layer=s.n_layers,
                                  n_head=s.n_heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    peer = transformers.GPT2LMHeadModel(cfg)
    return peer, from_huggingface(peer)


class _Classifier(nn.Module):
    """Our encoder and head, wired as `ClassificationModule.forward` does."""

    def __init__(self, encoder: EncoderOnly, head: ClassificationHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.encoder(ids, mask), mask)


def _bert_pair(s: Sizes) -> tuple[nn.Module, _Classifier]:
    cfg = transformers.BertConfig(vocab_size=s.vocab, hidden_size=s.d_model, num_hidden_layers=s.n_layers,
                                  num_attention_heads=s.n_heads, intermediate_size=4 * s.d_model, num_labels=2,
                                  max_position_embeddings=max(512, s.cls_seq), pad_token_id=PAD)
    peer = transformers.BertForSequenceClassification(cfg)
    head = ClassificationHead(s.d_model, 2, pooling="cls", dropout=cfg.hidden_dropout_prob, pooler=True)
    encoder = from_huggingface(peer)
    head.load_state_dict(encoder.classification_head)        # BERT's pooler and classifier
    return peer, _Classifier(encoder, head)


def _marian_pair(s: Sizes) -> tuple[nn.Module, EncoderDecoder]:
    # the paper's recipe where Marian can express it: ReLU, post-norm, scaled and shared, tied embeddings
    cfg = transformers.MarianConfig(
        vocab_size=s.vocab, d_model=s.d_model, encoder_layers=s.n_layers, decoder_layers=s.n_layers,
        encoder_attention_heads=s.n_heads, decoder_attention_heads=s.n_heads, encoder_ffn_dim=4 * s.d_model,
        decoder_ffn_dim=4 * s.d_model, max_position_embeddings=1024, activation_function="relu",
        scale_embedding=True, pad_token_id=PAD, decoder_start_token_id=BOS, eos_token_id=EOS, forced_eos_token_id=None)
    peer = transformers.MarianMTModel(cfg)
    return peer, from_huggingface(peer)


def _ids(*shape: int, vocab: int, device: torch.device) -> Tensor:
    return torch.randint(3, vocab, shape, device=device)            # above the special ids


# --- the three workloads --------------------------------------------------------------------------------------

def _trainer(forward: Callable[[], Tensor], labels: Tensor, model: nn.Module, n_tokens: int) -> Run:
    """One optimizer step of cross-entropy; the loss is computed by the same code for ours and the peer. Both
    use fused AdamW: our tasks' default, and transformers' Trainer default (`adamw_torch_fused`, torch >= 2.8)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> int:
        logits = forward()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)        # frees the gradients, so peak memory sees them each step
        return n_tokens
    return step


def _no_eos(scores: Tensor) -> Tensor:
    """Mask EOS, as transformers' MinNewTokensLogitsProcessor does, so every row runs the full length."""
    scores[:, EOS] = float("-inf")           # an int index: no host-to-device copy per step
    return scores


def _ours_lm_greedy(model: DecoderOnly, prompt: Tensor, new: int) -> Run:
    """Greedy search driven as `LanguageModelModule.generate` drives it."""
    @torch.no_grad()
    def run() -> int:
        cache = model.new_cache(prompt.shape[1] + new)
        def step(tokens: Tensor) -> Tensor:             # the last position only, as generate does
            return _no_eos(model.output(model.hidden(tokens, cache=cache)[:, -1]).float())
        out = greedy_search(step, prompt, EOS, new)
        return _generated(out.shape, prompt.shape[0], new)
    return run


def _incremental(model: EncoderDecoder, src: Tensor, src_mask: Tensor, max_len: int = 0):
    """Step and reorder closures over one KV cache, as `TranslationModule._incremental` builds them."""
    state = {"memory": model.encode(src, src_mask), "src_mask": src_mask}
    cache = model.new_cache(max_len)

    def step(tokens: Tensor) -> Tensor:
        logits = model.decode(tokens, state["memory"], state["src_mask"], cache=cache)[:, -1]
        return _no_eos(logits.float().log_softmax(-1))

    def reorder(index: Tensor) -> None:
        if len(index) == state["memory"].shape[0]:
            cache.reorder(index)                 # parents within a sentence share the encoder side
            return
        cache.select(index)                      # each sentence -> its beams
        state["memory"] = state["memory"].index_select(0, index)
        state["src_mask"] = state["src_mask"].index_select(0, index)
    return step, reorder


def _ours_seq2seq(model: EncoderDecoder, src: Tensor, new: int, beam: int) -> Run:
    @torch.no_grad()
    def run() -> int:
        mask = torch.ones_like(src, dtype=torch.bool)
        step, reorder = _incremental(model, src, mask, new + 1)
        start = torch.full((src.shape[0],), BOS, device=src.device)
        if beam == 1:
            return _generated(greedy_search(step, start, EOS, new, PAD).shape, src.shape[0], new)
        result = beam_search(step, reorder, start, EOS, new, beam_size=beam, alpha=0.6, pad_id=PAD)
        return _generated(result.tokens.shape, src.shape[0], new) // new          # sentences
    return run


def _peer_generate(model: nn.Module, inputs: Tensor, new: int, beam: int, prefix: int) -> Run:
    """transformers' generate; `prefix` is how many leading positions of its output are not new tokens."""
    beam_args = {"num_beams": beam, "length_penalty": 0.6} if beam > 1 else {"num_beams": 1}

    def run() -> int:
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, **beam_args)
        n = _generated((out.shape[0], out.shape[1] - prefix), inputs.shape[0], new)
        return n if beam == 1 else n // new
    return run


def _generated(shape: tuple[int, ...], rows: int, new: int) -> int:
    if tuple(shape) != (rows, new):
        raise SystemExit(f"a search produced {tuple(shape)} tokens instead of {(rows, new)}; the rates would "
                         "not compare equal work")
    return rows * new


# --- per family -----------------------------------------------------------------------------------------------

def bench_decoder(b: Bench) -> float:
    s, dev = b.s, b.device
    peer, ours = _gpt2_pair(s, max(1024, s.seq, s.prompt + s.new))
    peer, ours = peer.to(dev).eval(), ours.to(dev).eval()
    ids = _ids(2, 16, vocab=s.vocab, device=dev)
    with torch.no_grad():
        _check_parity("decoder", ours(ids), peer(ids).logits, b.log)
    ids = _ids(s.batch, s.seq + 1, vocab=s.vocab, device=dev)
    x, y, n = ids[:, :-1], ids[:, 1:], s.batch * s.seq
    peer.train(), ours.train()
    runs = _trainer(lambda: ours(x), y, ours, n), _trainer(lambda: peer(x).logits, y, peer, n)
    train = b.compare("decoder train (fwd+bwd+AdamW)", "tok/s", *runs)
    b.compare_memory("decoder train peak memory", *runs)
    peer.eval(), ours.eval()
    for batch in (1, 16):
        prompt = _ids(batch, s.prompt, vocab=s.vocab, device=dev)
        runs = _ours_lm_greedy(ours, prompt, s.new), _peer_generate(peer, prompt, s.new, 1, s.prompt)
        b.compare(f"decoder greedy b{batch} ({s.prompt}+{s.new})", "new tok/s", *runs)
    b.compare_memory("decoder greedy b16 peak memory", *runs)
    return train.ours


def bench_classifier(b: Bench) -> float:
    s, dev = b.s, b.device
    peer, ours = _bert_pair(s)
    peer, ours = peer.to(dev).eval(), ours.to(dev).eval()
    ids = _ids(2, 16, vocab=s.vocab, device=dev)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        _check_parity("classifier", ours(ids, mask), peer(ids, attention_mask=mask.long()).logits, b.log)
    ids, labels = _ids(s.batch, s.cls_seq, vocab=s.vocab, device=dev), torch.randint(2, (s.batch,), device=dev)
    mask = torch.ones_like(ids, dtype=torch.bool)     # the task always passes the padding mask
    n = s.batch * s.cls_seq
    peer.train(), ours.train()
    runs = (_trainer(lambda: ours(ids, mask), labels, ours, n),
            _trainer(lambda: peer(ids, attention_mask=mask.long()).logits, labels, peer, n))
    train = b.compare("classifier train (fwd+bwd+AdamW)", "tok/s", *runs)
    b.compare_memory("classifier train peak memory", *runs)
    return train.ours


def bench_seq2seq(b: Bench) -> float:
    s, dev = b.s, b.device
    peer, ours = _marian_pair(s)
    peer, ours = peer.to(dev).eval(), ours.to(dev).eval()
    src, tgt = _ids(2, 16, vocab=s.vocab, device=dev), _ids(2, 12, vocab=s.vocab, device=dev)
    with torch.no_grad():
        _check_parity("seq2seq", ours(src, tgt), peer(input_ids=src, decoder_input_ids=tgt).logits, b.log)
    src, tgt = _ids(s.batch, s.seq, vocab=s.vocab, device=dev), _ids(s.batch, s.seq + 1, vocab=s.vocab, device=dev)
    src_mask, tgt_mask = torch.ones_like(src, dtype=torch.bool), torch.ones_like(tgt[:, :-1], dtype=torch.bool)
    n = s.batch * 2 * s.seq                                         # source and target tokens
    peer.train(), ours.train()
    runs = (_trainer(lambda: ours(src, tgt[:, :-1], src_mask, tgt_mask), tgt[:, 1:], ours, n),
            _trainer(lambda: peer(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt[:, :-1],
                                  decoder_attention_mask=tgt_mask.long()).logits, tgt[:, 1:], peer, n))
    train = b.compare("seq2seq train (fwd+bwd+AdamW)", "tok/s", *runs, note="source + target tokens")
    b.compare_memory("seq2seq train peak memory", *runs)
    peer.eval(), ours.eval()
    for batch in (1, 16):
        src = _ids(batch, s.beam_src, vocab=s.vocab, device=dev)
        runs = _ours_seq2seq(ours, src, s.beam_new, 1), _peer_generate(peer, src, s.beam_new, 1, 1)
        b.compare(f"seq2seq greedy b{batch} ({s.beam_src}->{s.beam_new})", "new tok/s", *runs)
    src = _ids(s.beam_batch, s.beam_src, vocab=s.vocab, device=dev)
    runs = _ours_seq2seq(ours, src, s.beam_new, 4), _peer_generate(peer, src, s.beam_new, 4, 1)
    b.compare(f"seq2seq beam 4 b{s.beam_batch} ({s.beam_src}->{s.beam_new})", "sent/s", *runs,
              note="length penalty 0.6: GNMT form in ours, |Y|^0.6 in transformers")
    b.compare_memory("seq2seq beam 4 peak memory", *runs)
    return train.ours


# --- data pipeline --------------------------------------------------------------------------------------------

def bench_data(b: Bench, data: Path, training: dict[str, float], repeats: int) -> None:
    """Tokenize the training split and batch one epoch of it, from a fresh DataModule whose tokenizer was
    trained beforehand (training the tokenizer is a one-off and is not timed). Tokens are counted as the
    `TokensPerSecond` callback counts them (real tokens), against our training rate at this run's sizes."""
    s, shakespeare = b.s, data / "tiny_shakespeare/input.txt"
    lm_batches = max(1, int(0.9 * shakespeare.stat().st_size) // (s.batch * s.seq))   # the 90% split about once
    corpora = {
        "decoder": ("tiny_shakespeare char", lambda tok, d: LanguageModelDataModule(
            str(shakespeare), block_size=s.seq, batch_size=s.batch, tokenizer_path=tok, tokenizer_dir=d,
            batches_per_epoch=lm_batches)),
        "classifier": ("sst2 bpe", lambda tok, d: ClassificationDataModule(
            str(data / "sst2/train.tsv"), val_path=None, max_len=s.cls_seq, batch_size=s.batch,
            tokenizer_path=tok, tokenizer_dir=d, tokenizer_vocab_size=s.vocab)),
        "seq2seq": ("multi30k bpe", lambda tok, d: TranslationDataModule(
            str(data / "multi30k/train"), val_path=None, test_path=None, max_tokens=max(s.batch * s.seq, 256),
            tokenizer_path=tok, tokenizer_dir=d, tokenizer_vocab_size=s.vocab)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for family, (corpus, make) in corpora.items():
            d = str(Path(tmp) / family)
            make(None, d).tokenizer                              # train and save it once
            b.log(f"data {corpus}: tokenizer trained")
            rates = [b.rate(lambda: sum(count_tokens(x) for x in make(f"{d}/tokenizer.json", d).train_dataloader()))
                     for _ in range(repeats)]
            model = training.get(family)
            b.add(Record(f"data {corpus} (tokenize+batch) vs {family} train", statistics.median(rates), model,
                         "tok/s", statistics.median(rates) / model if model else None, min(rates), max(rates),
                         note="peer = our model's training tok/s; ratio > 1: the pipeline keeps up"))


# --- MFU on a GPU ---------------------------------------------------------------------------------------------

def bench_mfu(b: Bench, peak: float | None, quick: bool) -> None:
    """GPT-2 small (12 x 768, 12 heads, 50257 tokens) trained in bf16 autocast with torch.compile. FLOPs per
    token: 6N + 12 L d_model T (PaLM appendix B), N the parameters without the position table (the tied
    embedding counts once, as the output projection)."""
    if b.device.type != "cuda":
        b.log("MFU: skipped, no GPU (torch.cuda.is_available() is False)")
        return
    name = torch.cuda.get_device_name(b.device)
    peak = peak or next((flops for key, flops in PEAK_BF16 if key in name), None)
    B, T = (8, 512) if quick else (16, 1024)
    s = Sizes(n_layers=12, d_model=768, n_heads=12, vocab=50257)
    peer, ours = _gpt2_pair(s, 1024, dropout=0.0)
    peer, ours = peer.to(b.device).train(), ours.to(b.device).train()
    n_params = sum(p.numel() for p in ours.parameters()) - ours.embedding.positions.table.weight.numel()
    flops_per_token = 6 * n_params + 12 * s.n_layers * s.d_model * T
    ids = _ids(B, T + 1, vocab=s.vocab, device=b.device)

    def compiled(model: nn.Module, logits: Callable[[nn.Module], Tensor]) -> Run:
        fast, optimizer = torch.compile(model), torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step() -> int:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = logits(fast)
            F.cross_entropy(out.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return B * T
        return step

    b.log(f"MFU on {name}: compiling (a minute or two)")
    b = _with(b, warmup=3, repeats=5 if quick else 10)
    rec = b.compare(f"gpt2-small bf16 compiled train (B{B} T{T})", "tok/s", compiled(ours, lambda m: m(ids[:, :-1])),
                    compiled(peer, lambda m: m(ids[:, :-1]).logits))
    if peak is None:
        b.log(f"MFU: unknown peak bf16 FLOP/s for {name!r}; pass --peak-tflops")
        return
    ours_mfu, peer_mfu = (100 * rate * flops_per_token / peak for rate in (rec.ours, rec.peer))
    b.add(Record("gpt2-small bf16 compiled MFU", ours_mfu, peer_mfu, "%", ours_mfu / peer_mfu,
                 note=f"{flops_per_token / 1e9:.3f} GFLOP/token, peak {peak / 1e12:.0f} TFLOP/s ({name})"))


def _with(b: Bench, **sizes: int) -> Bench:
    """The same bench (records, clock) with other repeat counts."""
    other = Bench(replace(b.s, **sizes), b.device)
    other.records, other.start = b.records, b.start
    return other


# --- output ---------------------------------------------------------------------------------------------------

def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"


def _table(records: list[Record]) -> str:
    rows = [("measurement", "ours", "peer", "unit", "ratio", "ours min..max", "peer min..max")]
    for r in records:
        spread = [f"{_fmt(lo)}..{_fmt(hi)}" if lo is not None else "-"
                  for lo, hi in ((r.ours_min, r.ours_max), (r.peer_min, r.peer_max))]
        rows.append((r.name, _fmt(r.ours), _fmt(r.peer), r.unit, _fmt(r.ratio), *spread))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _meta(args: argparse.Namespace, s: Sizes, device: torch.device) -> dict[str, Any]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "quick": args.quick, "tiny": args.tiny, "dtype": "float32",
            "sizes": asdict(s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter sequences (< 3 min, 2 cores)")
    parser.add_argument("--tiny", action="store_true", help="2-layer d_model 64 models: only checks the script runs")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shipped corpora")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU, for MFU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    s = Sizes(**(TINY if args.tiny else QUICK if args.quick else {}))
    b = Bench(s, torch.device(args.device))
    b.log(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device}, "
          f"{torch.get_num_threads()} threads, sizes {asdict(s)}")
    training = {}
    for family, bench in (("decoder", bench_decoder), ("classifier", bench_classifier), ("seq2seq", bench_seq2seq)):
        if family in args.only:
            training[family] = bench(b)
    if "data" in args.only:
        bench_data(b, args.data, training, 1 if args.quick else 3)
    if "mfu" in args.only:
        bench_mfu(b, args.peak_tflops and args.peak_tflops * 1e12, args.quick)
    print(_table(b.records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": _meta(args, s, b.device), "records": [asdict(r) for r in b.records]},
                                        indent=1))
        b.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
