"""benchmarks/real_model_rtt.py's attack split, without running SmolLM2: the attacker gets the
``forget.txt`` lines of the ``val_forget`` countries (three phrasings each), the held-out questions
are ``test_forget``, and no held-out country or capital is in an attack text (the script raises
otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import benchmark_script

from unlearn_kernels.data.loaders import read_multiple_choice

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "unlearn_kernels" / "assets" / "real-knowledge"

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def bench():
    return benchmark_script("real_model_rtt")


def test_attack_texts_are_the_val_countries_and_heldout_is_test(bench):
    texts, heldout = bench.attack_split()
    val = [bench.question_fact(q) for q in read_multiple_choice(ASSETS / "val_forget.jsonl")]
    assert sorted(bench.text_fact(t) for t in texts) == sorted(val * 3)
    assert len(set(texts)) == len(texts) == 3 * len(val)
    assert [q.question for q in heldout] == [q.question for q in read_multiple_choice(ASSETS / "test_forget.jsonl")]
    attack_countries = {bench.text_fact(t)[0] for t in texts}
    assert attack_countries.isdisjoint(bench.question_fact(q)[0] for q in heldout)


def test_every_forget_line_parses_to_its_country(bench):
    lines = (ASSETS / "forget.txt").read_text().splitlines()
    facts = [bench.text_fact(line) for line in lines]
    assert facts[12] == ("United Kingdom", "London")            # "The capital of the United Kingdom is London."
    assert len(set(facts)) * 3 == len(facts)
    with pytest.raises(ValueError, match="not a capital fact"):
        bench.text_fact("Paris is a city in France.")


def test_a_leaked_heldout_fact_is_refused(bench):
    texts, heldout = bench.attack_split()
    country, capital = bench.question_fact(heldout[0])
    for leak in (f"{capital} is a large city.", f"People in {country} speak many languages."):
        with pytest.raises(ValueError, match="appears in the attack texts"):
            bench.check_disjoint([*texts, leak], heldout)
