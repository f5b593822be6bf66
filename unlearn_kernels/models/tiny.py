"""The embedded default model: a small Llama-architecture LM that knows the entangled benchmark.

``python -m unlearn_kernels.models.tiny`` trains it on the whole fact universe (every
phrasing of every fact) and saves model and tokenizer (safetensors) into
``unlearn_kernels/assets/tiny-entangled``; the package ships the result, so the demo needs
no training. The tokenizer is word-level over the benchmark's closed vocabulary.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from ..data import entangled

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-entangled"


def build_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 400, with_bos: bool = False):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``; with ``with_bos`` its
    post-processor prepends ``<bos>`` as Llama's does. Specials: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        special_tokens=["<pad>", "<bos>", "<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if with_bos:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                            special_tokens=[("<bos>", core.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def build_model(vocab_size: int, hidden: int = 128, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(config)


def train(out_dir: Path = ASSET_DIR, steps: int = 3000, batch_size: int = 32, lr: float = 3e-3,
          seed: int = 0, hidden: int = 128, layers: int = 4) -> None:
    """Train the default model (or one of another width and depth) on the whole universe of
    ``seed`` and save it atomically."""
    from tqdm import tqdm

    from .io import save_pretrained_atomic
    from ..eval.multiple_choice import accuracy

    tokenizer = build_tokenizer(entangled.vocabulary(seed))
    model = build_model(len(tokenizer), hidden=hidden, layers=layers, seed=seed)
    bench = entangled.generate(seed=seed)
    corpus = bench.corpus()
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    bar = tqdm(range(steps), desc="training the tiny model")
    for _ in bar:
        batch = tokenizer(rng.sample(corpus, batch_size), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    for name, facts in (("forget-domain", [f for f in bench.facts if f.domain == "forget"]),
                        ("retain-domain", bench.retain_facts())):
        print(f"{name} accuracy: {accuracy(model, tokenizer, bench.questions(facts)):.3f}")
    save_pretrained_atomic(model, tokenizer, out_dir)


def load(path: Path | str = ASSET_DIR, dtype: torch.dtype = torch.float32):
    """The shipped model and tokenizer (or those at ``path``), offline."""
    from .io import load_local

    if Path(path) == ASSET_DIR and not Path(path, "config.json").exists():
        raise FileNotFoundError(f"no model at {path}: run `python -m unlearn_kernels.models.tiny` to train it")
    return load_local(path, dtype)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    train(args.out, args.steps, lr=args.lr, seed=args.seed, hidden=args.hidden, layers=args.layers)
