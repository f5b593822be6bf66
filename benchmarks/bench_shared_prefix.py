"""RMU step time with and without the shared prefix (``share_prefix``), CPU.

A random Llama (16 layers, hidden 512), loss layer 7, the default update band 5–7 (layers
0–4 shared), 4 × ~130-token texts per batch; the two settings alternate, twice each, in one
process; prints the mean step time of each run.

    python benchmarks/bench_shared_prefix.py
"""

from __future__ import annotations

import copy
import time

import torch
import transformers as tf

from unlearn_kernels.methods import registry
from unlearn_kernels.models import tiny


def main(steps: int = 8) -> None:
    torch.manual_seed(0)
    _, tokenizer = tiny.load()
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1024,
                            num_hidden_layers=16, num_attention_heads=8, pad_token_id=0)
    base = tf.LlamaForCausalLM(config)
    texts = [" ".join(["the secret toxin brewed by filopi is kelbane ."] * 12)] * 32
    print("| share_prefix | ms / step |\n|---|---|")
    for share in (False, True, False, True):
        method = registry["RMU"](copy.deepcopy(base), tokenizer, layer=7, steps=steps, batch_size=4,
                                 progress=False, share_prefix=share)
        start = time.perf_counter()
        method.fit(texts, texts)
        print(f"| {share} | {(time.perf_counter() - start) / steps * 1000:.0f} |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
