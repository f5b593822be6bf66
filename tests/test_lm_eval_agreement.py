"""Our evaluator against lm-evaluation-harness 0.4.13 itself, on the same model and questions.

Three model folders: the shipped model (byte-level BPE tokenizer, no BOS), a small random
Llama with a byte-level BPE tokenizer trained here with ``tokenizers`` whose post-processor
adds a BOS token, and one with a word-level tokenizer over the benchmark's closed vocabulary.
For each, both prompt formats: ``cloze`` through a task
YAML written here, ``mmlu`` through lm-eval's *own* ``wmdp`` template (its
``_default_template_yaml``, included by absolute path), so the prompt is the harness's, not
our copy of it. acc and acc_norm must be equal and every log-likelihood within 1e-4.
"""

import json
import os
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from unlearn_kernels.data import entangled  # noqa: E402
from unlearn_kernels.eval import harness  # noqa: E402
from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice  # noqa: E402
from unlearn_kernels.models import tiny  # noqa: E402
from unlearn_kernels.models.io import load_local  # noqa: E402

WMDP_TEMPLATE = Path(lm_eval.__file__).parent / "tasks" / "wmdp" / "_default_template_yaml"
SUBJECT = "fictional toxicology"


def questions():
    """Forget and retain questions of the benchmark, 24 of each, and two longer than every
    model's context (lm-eval truncates them on the left)."""
    bench = entangled.generate(0.25)
    forget, retain = bench.questions(bench.forget_facts())[:24], bench.questions(bench.retain_facts())[:24]
    story = " ".join(entangled.sentences(bench.facts[0]) * 8)
    long = [type(q)(story + " " + q.question, q.choices, q.answer, q.fact) for q in (forget[0], retain[0])]
    return forget + retain + long


def random_model_dir(folder: Path, kind: str) -> Path:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on the benchmark text
    whose post-processor adds BOS (``"bpe-bos"``), or a word-level one (``"word-level"``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = entangled.generate(0.25)
    if kind == "bpe-bos":
        tokenizer = tiny.build_bpe_tokenizer(bench.corpus() + [q.question for q in bench.questions(bench.facts)],
                                             with_bos=True)
    else:
        tokenizer = tiny.build_tokenizer(entangled.vocabulary())
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    out = folder / kind
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["shipped-bpe", "bpe-bos", "word-level"])
def model_dir(request, tmp_path_factory):
    if request.param == "shipped-bpe":
        return tiny.ASSET_DIR
    return random_model_dir(tmp_path_factory.mktemp("models"), request.param)


def lm_eval_run(model_dir: Path, folder: Path, rows: list) -> dict:
    """lm-eval's results and samples for the cloze task and its own wmdp (mmlu) template."""
    import yaml

    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q.to_json()) + "\n" for q in rows))
    (folder / "uk_cloze.yaml").write_text(yaml.safe_dump(harness.task_config("uk_cloze", data, "cloze")))
    mmlu = {"include": str(WMDP_TEMPLATE), "task": "uk_mmlu", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "description": f"The following are multiple choice questions (with answers) about {SUBJECT}.\n\n",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    (folder / "uk_mmlu.yaml").write_text(yaml.safe_dump(mmlu))
    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=16)
    return lm_eval.simple_evaluate(model=lm, tasks=["uk_cloze", "uk_mmlu"], log_samples=True,
                                   task_manager=TaskManager(include_path=str(folder)))


def test_equal_to_lm_eval(model_dir, tmp_path):
    rows = questions()
    output = lm_eval_run(model_dir, tmp_path, rows)
    model, tokenizer = load_local(model_dir)
    if "bos" in str(model_dir.name):
        assert tokenizer.encode("Question:")[0] == tokenizer.bos_token_id  # the BOS variant really adds one
    compared = 0
    for task, format in (("uk_cloze", "cloze"), ("uk_mmlu", "mmlu")):
        ours = evaluate_multiple_choice(model, tokenizer, rows, format=format, subject=SUBJECT, batch_size=16,
                                        return_details=True)
        theirs = output["results"][task]
        assert ours["acc"] == theirs["acc,none"], (task, ours["acc"], theirs["acc,none"])
        assert ours["acc_norm"] == theirs["acc_norm,none"], task
        assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], abs=1e-12)
        assert ours["acc_norm_stderr"] == pytest.approx(theirs["acc_norm_stderr,none"], abs=1e-12)
        samples = sorted(output["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(rows)
        for mine, sample in zip(ours["samples"], samples):
            assert mine["context"] + mine["continuations"][0] == sample["arguments"][0][0] + sample["arguments"][0][1]
            lls = [float(r[0][0]) for r in sample["resps"]]
            assert mine["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
            compared += 1
    assert compared == 2 * len(rows)


def test_engine_lm_eval_gives_the_same_numbers(tmp_path):
    """``--engine lm-eval`` (our generated YAMLs, any number of choices, every format) equals our evaluator."""
    rows = questions()[:12]
    three = [type(q)(q.question, q.choices[:3] if q.answer < 3 else q.choices[1:], min(q.answer, 2), q.fact)
             for q in rows]
    model, tokenizer = load_local(tiny.ASSET_DIR)
    for format in ("cloze", "mmlu", "text"):      # text: the cloze probes of data.probes
        theirs = harness.run(tiny.ASSET_DIR, {"four": rows, "three": three}, format=format, subject=SUBJECT,
                             log_samples=True)
        for name, qs in (("four", rows), ("three", three)):
            ours = evaluate_multiple_choice(model, tokenizer, qs, format=format, subject=SUBJECT, return_details=True)
            assert ours["acc"] == theirs[name]["acc"] and ours["acc_norm"] == theirs[name]["acc_norm"]
            for a, b in zip(ours["samples"], theirs[name]["samples"]):
                assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)


TRICKY = [("Question: what is it ?\nAnswer: ", "vorazine"), ("the toxin of kalo is  ", " kelbane ."),
          ("A.\n", "B"), ("Answer:", " A"), ("x\t\n ", "?"), ("Question: é ?\nAnswer:", " naïve")]


def test_encode_pair_is_lm_evals(model_dir):
    """Token split of context and continuation, with trailing context whitespace, BOS rule."""
    from unlearn_kernels.eval.multiple_choice import encode_pair, max_length

    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=1)
    model, tokenizer = load_local(model_dir)
    for context, continuation in TRICKY:
        assert encode_pair(tokenizer, context, continuation) == lm._encode_pair(context, continuation), context
    assert max_length(model, tokenizer) == lm.max_length
