"""Continual unlearning: a sequence of forget requests applied to one model.

The forget entities of a benchmark split are cut into ``n_requests`` groups. Request k
unlearns group k (MRP grows its basis with ``add_request``; the other methods run ``fit`` on
the already-unlearned model); after each request the accuracy on every request so far, on
the earlier requests alone (do they stay forgotten?) and on the retain facts is recorded.
"""

from __future__ import annotations

from ..data.entangled import EntangledBenchmark
from ..errors import UserError
from .multiple_choice import accuracy


def continual_unlearning(model, tokenizer, method_class, settings: dict, bench: EntangledBenchmark,
                         n_requests: int = 3) -> list[dict]:
    """One row per request: ``request``, ``seen_forget_acc``, ``earlier_forget_acc``, ``retain_acc``."""
    entities = sorted(bench.forget_entities)
    if not 1 <= n_requests <= len(entities):
        raise UserError(f"n_requests must be in [1, {len(entities)}], got {n_requests}")
    groups = [set(entities[k::n_requests]) for k in range(n_requests)]
    forget = bench.forget_facts()
    retain_texts = bench.corpus(bench.retain_facts())
    retain_questions = bench.questions(bench.retain_facts())
    method, rows = None, []
    for k, group in enumerate(groups):
        facts = [f for f in forget if f.entity in group]
        if method is not None and hasattr(method, "add_request"):
            method.add_request(bench.corpus(facts), retain_texts)
        else:
            method = method_class(model, tokenizer, **settings)
            method.fit(bench.corpus(facts), retain_texts)
        seen = [f for f in forget if any(f.entity in g for g in groups[:k + 1])]
        earlier = [f for f in forget if any(f.entity in g for g in groups[:k])]
        rows.append({"request": k + 1,
                     "seen_forget_acc": accuracy(model, tokenizer, bench.questions(seen)),
                     "earlier_forget_acc": accuracy(model, tokenizer, bench.questions(earlier)) if earlier else None,
                     "retain_acc": accuracy(model, tokenizer, retain_questions)})
    return rows
