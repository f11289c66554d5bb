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
with torch.compile (PaLM, Chowdhery et al. 2022, appendix B). fp32 everywhere else. On request (`--only maps`)
it measures what attention maps cost in the encoder-decoder's forward pass.

One module per family (`decoder`, `classifier`, `seq2seq`, `data`, `mfu`, `maps`); `timing` holds the shared
timing and memory helper, `pairs` the model pairs and the parity check, `workloads` the runs several families
share, `report` the table and JSON, `cli` the command line.

    python scripts/bench.py                          # default sizes; minutes on 2 CPU cores
    python scripts/bench.py --quick                  # under 3 minutes on 2 idle CPU cores
    python scripts/bench.py --json results/bench.json --threads 2 --data ../shared/data
    python scripts/bench.py --quick --tiny --only decoder data    # a seconds-long check that the script runs
    python scripts/bench.py --only maps --json results/bench_maps.json    # about a minute on 2 CPU cores
    python scripts/bench.py --only maps --tiny                           # seconds: checks the maps family runs
"""
