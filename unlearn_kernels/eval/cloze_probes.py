"""Step 3 of the cloze probes (``data.probes``): the base model picks each probe's distractors."""

from __future__ import annotations

import random
from typing import Sequence

from ..data.loaders import MCQuestion
from ..data.probes import CHOICES, MARGIN, PLAUSIBLE, POOL, ClozePoint
from .multiple_choice import choice_loglikelihoods


def make_probes(model, tokenizer, points: Sequence[ClozePoint], *, choices: int = CHOICES, pool: int = POOL,
                plausible: int = PLAUSIBLE, margin: float = MARGIN, seed: int = 0,
                batch_size: int = 16) -> list[MCQuestion]:
    """Four-choice questions from ``points`` whose distractors are drawn from the ones the base
    ``model`` finds most likely among the other answers (``data.probes`` docstring, step 3); the ones it
    does not know by ``margin`` nats are dropped."""
    rng = random.Random(seed)
    answers = sorted({p.answer for p in points})
    if len(answers) < choices:
        return []
    if len(answers) > pool:
        answers = sorted(rng.sample(answers, pool))
    asked = [MCQuestion(p.context, [p.answer] + [a for a in answers if a.lower() != p.answer.lower()], 0)
             for p in points]
    scores = choice_loglikelihoods(model, tokenizer, asked, batch_size=batch_size, format="text")
    probes = []
    for question, ll in zip(asked, scores):
        ranked = sorted(range(1, len(ll)), key=lambda i: (-ll[i], i))[:max(plausible, choices - 1)]
        drawn = rng.sample(ranked, choices - 1)
        if ll[0] - max(ll[i] for i in drawn) < margin:
            continue
        options = [question.choices[0]] + [question.choices[i] for i in drawn]
        order = list(range(choices))
        rng.shuffle(order)
        probes.append(MCQuestion(question.question, [options[i] for i in order], order.index(0)))
    return probes
