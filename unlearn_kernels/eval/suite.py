"""One evaluation of a model on an entangled-benchmark split: the numbers of the demo table."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.entangled import EntangledBenchmark
from .multiple_choice import accuracy
from .probe import probe_accuracy
from .relearn import relearn_curve


@dataclass
class Split:
    """Questions and texts of one forget/retain split, with the halves the attacks use."""

    forget_questions: list
    retain_questions: list
    forget_texts: list[str]
    retain_texts: list[str]
    attack_texts: list[str]           # relearning fine-tunes on these forget facts ...
    heldout_questions: list           # ... and is scored on these others
    probe_train_questions: list       # forget-domain facts the model keeps
    shared_retain_questions: list     # retain facts about the forget entities (entanglement)

    @classmethod
    def from_benchmark(cls, bench: EntangledBenchmark) -> "Split":
        forget = bench.forget_facts()
        entities = sorted({f.entity for f in forget})
        attack_entities = set(entities[::2])
        attack = [f for f in forget if f.entity in attack_entities]
        heldout = [f for f in forget if f.entity not in attack_entities]
        chosen = set(bench.forget_entities)
        known = [f for f in bench.facts if f.domain == "forget" and f.entity not in chosen]
        shared = [f for f in bench.retain_facts() if f.entity in chosen]
        return cls(bench.questions(forget), bench.questions(bench.retain_facts()), bench.corpus(forget),
                   bench.corpus(bench.retain_facts()), bench.corpus(attack), bench.questions(heldout),
                   bench.questions(known), bench.questions(shared))


def evaluate(model, tokenizer, split: Split, layer: int, relearn_steps: int = 30, seed: int = 0) -> dict:
    """Forget/retain accuracy, accuracy on the retain facts of the forget entities (None
    without entanglement), relearned held-out accuracy (and curve), probe accuracy."""
    curve = relearn_curve(model, tokenizer, split.attack_texts, split.heldout_questions,
                          steps=relearn_steps, every=max(1, relearn_steps // 3), seed=seed)
    return {
        "forget_acc": accuracy(model, tokenizer, split.forget_questions),
        "retain_acc": accuracy(model, tokenizer, split.retain_questions),
        "shared_retain_acc": (accuracy(model, tokenizer, split.shared_retain_questions)
                              if split.shared_retain_questions else None),
        "relearn_acc": curve[-1][1],
        "relearn_curve": curve,
        "probe_acc": probe_accuracy(model, tokenizer, split.probe_train_questions, split.forget_questions,
                                    layer, seed),
    }
