"""The embedded default model and its retrained oracle: small Llamas that know the entangled benchmark.

``python -m unlearn_kernels.models.tiny`` trains the default model on the whole fact universe
(every phrasing of every fact, :mod:`unlearn_kernels.data.entangled`) and saves model and
tokenizer (safetensors) into ``unlearn_kernels/assets/tiny-entangled``; ``--oracle`` trains the
*oracle* into ``assets/tiny-entangled-oracle``: the same recipe on everything except the forget
facts of the default split (``entangled.oracle_facts``), the model unlearning aims at; ``--both``
trains both. The package ships the results, so the demo needs no training.

Recipe (:data:`RECIPE`): a byte-level BPE tokenizer (:func:`build_bpe_tokenizer`, no BOS token,
as GPT-2's) trained on the whole universe's corpus — the oracle's is the same tokenizer, since
it is trained on the same text — and a 6-layer Llama (hidden 128, MLP 256, 4 heads, tied
embeddings) trained with AdamW (weight decay 0.01) under a one-cycle schedule on random
batches of corpus sentences, the causal-LM loss on every non-padding token.

**Bit for bit.** The run is a function of the recipe alone: the tokenizer trainer is
deterministic, the weights come from ``torch.manual_seed(seed)``, the batches from
``random.Random(seed)`` over the corpus in its fixed order, and the training runs on
:data:`THREADS` CPU threads whatever the machine has (a different thread count changes the
order of float reductions). Rebuilding on the same torch version and CPU type reproduces the
shipped ``model.safetensors`` exactly.
"""

from __future__ import annotations

import argparse
import random
from contextlib import contextmanager
from pathlib import Path

import torch

from ..data import entangled
from ..errors import MissingFileError, UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ASSET_DIR = ASSETS / "tiny-entangled"
ORACLE_DIR = ASSETS / "tiny-entangled-oracle"
THREADS = 1
RECIPE = dict(steps=2400, batch_size=32, lr=3e-3, seed=0, hidden=128, layers=6, vocab_size=512)


def build_tokenizer(words: list[str]):
    """A word-level tokenizer over ``words`` (whitespace split). Specials: ``<pad>`` 0, ``<unk>`` 1,
    ``<bos>`` 2, ``<eos>`` 3."""
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


def benchmark_tokenizer(seed: int = 0, vocab_size: int = RECIPE["vocab_size"]):
    """The shipped models' tokenizer: byte-level BPE trained on the whole universe of ``seed``."""
    return build_bpe_tokenizer(entangled.generate(seed=seed).corpus(), vocab_size=vocab_size)


def build_model(tokenizer, hidden: int = 128, layers: int = 6, seed: int = 0):
    """A randomly initialised (``torch.manual_seed(seed)``) Llama for ``tokenizer``: MLP width
    2 × hidden, 4 heads, tied embeddings, 64 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden < 4 or hidden % 4 or layers < 1:
        raise UserError(f"need hidden a positive multiple of 4 (4 heads) and layers >= 1, got {hidden}, {layers}")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


@contextmanager
def fixed_threads(n: int = THREADS):
    """Run the block on ``n`` intra-op threads (then restore the previous count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(model, tokenizer, corpus: list[str], steps: int, batch_size: int, lr: float, seed: int = 0,
        progress: bool = False) -> list[float]:
    """Train ``model`` in place on random batches of ``corpus`` (see the module docstring);
    returns the loss of every step. Deterministic given its arguments and :data:`THREADS`."""
    if steps < 1 or not 1 <= batch_size <= len(corpus) or lr <= 0:
        raise UserError(f"need steps >= 1, 1 <= batch_size <= len(corpus) = {len(corpus)} and lr > 0 "
                        f"(got steps={steps}, batch_size={batch_size}, lr={lr})")
    from tqdm import tqdm

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses = []
    model.train()
    with fixed_threads():
        bar = tqdm(range(steps), desc="training the tiny model", disable=not progress)
        for _ in bar:
            batch = tokenizer(rng.sample(corpus, batch_size), return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def training_facts(oracle: bool = False, seed: int = 0) -> list:
    """The facts a model learns: the whole universe, or the oracle's (no default-split forget facts)."""
    return entangled.oracle_facts(seed) if oracle else entangled.generate(seed=seed).facts


def train(out_dir: Path | None = None, steps: int = RECIPE["steps"], batch_size: int = RECIPE["batch_size"],
          lr: float = RECIPE["lr"], seed: int = RECIPE["seed"], hidden: int = RECIPE["hidden"],
          layers: int = RECIPE["layers"], oracle: bool = False, progress: bool = True) -> dict:
    """Train the default model (or the oracle, or one of another width and depth) and save it
    atomically with a ``report.json`` of its recipe and accuracies; returns that report."""
    import time

    from .io import save_pretrained_atomic
    from ..eval.multiple_choice import accuracy

    out_dir = (ORACLE_DIR if oracle else ASSET_DIR) if out_dir is None else Path(out_dir)
    bench = entangled.generate(seed=seed)
    tokenizer = benchmark_tokenizer(seed)
    model = build_model(tokenizer, hidden=hidden, layers=layers, seed=seed)
    start = time.perf_counter()
    losses = fit(model, tokenizer, bench.corpus(training_facts(oracle, seed)), steps, batch_size, lr, seed, progress)
    recipe = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, hidden=hidden, layers=layers,
                  vocab_size=len(tokenizer), threads=THREADS, oracle=oracle)
    report = {"recipe": recipe, "train_seconds": round(time.perf_counter() - start, 1), "final_loss": losses[-1]}
    split = {"forget-domain": [f for f in bench.facts if f.domain == "forget"],
             "default-split forget": bench.forget_facts(), "retain-domain": bench.retain_facts()}
    with fixed_threads():
        report["accuracy"] = {name: accuracy(model, tokenizer, bench.questions(facts)) for name, facts in split.items()}
    for name, acc in report["accuracy"].items():
        print(f"{name} accuracy: {acc:.3f}")
    save_pretrained_atomic(model, tokenizer, out_dir, report=report)
    return report


def load(path: Path | str = ASSET_DIR, dtype: torch.dtype = torch.float32):
    """The shipped model and tokenizer (``ORACLE_DIR`` for the oracle, or those at ``path``), offline."""
    from .io import load_local

    if Path(path) in (ASSET_DIR, ORACLE_DIR) and not Path(path, "config.json").exists():
        flag = " --oracle" if Path(path) == ORACLE_DIR else ""
        raise MissingFileError(f"no model at {path}: run `python -m unlearn_kernels.models.tiny{flag}` to train it")
    return load_local(path, dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--oracle", action="store_true", help="train the oracle (no default-split forget facts)")
    which.add_argument("--both", action="store_true", help="train the default model, then the oracle")
    parser.add_argument("--out", type=Path, default=None, help="output folder (not with --both)")
    for name in ("steps", "seed", "hidden", "layers"):
        parser.add_argument(f"--{name}", type=int, default=RECIPE[name])
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    args = parser.parse_args(argv)
    if args.both and args.out is not None:
        parser.error("--out names one folder: train the model and the oracle one at a time to choose folders")
    settings = dict(steps=args.steps, lr=args.lr, seed=args.seed, hidden=args.hidden, layers=args.layers)
    for oracle in ((False, True) if args.both else (args.oracle,)):
        train(args.out, oracle=oracle, **settings)


if __name__ == "__main__":
    main()
