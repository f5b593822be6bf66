"""A projection-edited (MRP) output folder: no loader mistakes it for the base model.

Plain ``AutoModelForCausalLM.from_pretrained`` refuses it; ``trust_remote_code=True``, lm-eval's
``HFLM`` and our ``load_local`` all give the unlearned model, bit for bit; the modeling code
written into the folder needs nothing from ``unlearn_kernels``.
"""

import ast
import builtins
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from unlearn_kernels.data import entangled  # noqa: E402
from unlearn_kernels.methods import registry  # noqa: E402
from unlearn_kernels.models import export, tiny  # noqa: E402
from unlearn_kernels.models.io import load_local, save_pretrained_atomic  # noqa: E402
from unlearn_kernels.ops import projection_hook  # noqa: E402


@pytest.fixture(scope="module")
def bench(entangled_bench):
    return entangled_bench(0.25)


@pytest.fixture(scope="module")
def mrp(bench, tmp_path_factory):
    """MRP fitted on the shipped model (layer 1, rank 8), saved; plus a batch of forget text."""
    model, tok = tiny.load()
    method = registry["MRP"](model, tok, layer=1, rank=8, train_steps=0, batch_size=8, progress=False)
    method.fit(bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts()))
    out = save_pretrained_atomic(method.model, tok, tmp_path_factory.mktemp("mrp") / "out", method.report(),
                                 method.projections(), method.saved_masks())
    batch = tok(bench.corpus(bench.forget_facts())[:6] + bench.corpus(bench.retain_facts())[:2],
                return_tensors="pt", padding=True)
    return method, tok, out, batch


@pytest.fixture()
def no_prompt(monkeypatch):
    """transformers asks "run the custom code? [y/N]" on a terminal; answer as a script would (no stdin)."""
    def no_stdin(*args, **kwargs):
        raise EOFError("no stdin")

    monkeypatch.setattr(builtins, "input", no_stdin)


# A loaded folder projects with its own plain-torch code, the method's model with the CPU kernel
# (a fixed 16-lane summation order, no fused multiply-add): the same math, a few fp32 roundings
# apart (4.8e-6 at most on these logits). Two loads that project alike are compared at 1e-6.
KERNEL_VS_TORCH = dict(atol=1e-5, rtol=1e-5)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_plain_loaders_refuse_the_folder(mrp, no_prompt):
    _, _, out, _ = mrp
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)   # registering it changes nothing below
    refusal = r"(?s)contains custom code.*Please pass the argument `trust_remote_code=True`"
    with pytest.raises(ValueError, match=refusal) as error:
        AutoModelForCausalLM.from_pretrained(out)
    assert str(out) in str(error.value)
    from lm_eval.models.huggingface import HFLM

    with pytest.raises(ValueError, match="trust_remote_code=True"):
        HFLM(pretrained=str(out), device="cpu", dtype="float32")


def test_every_loader_gives_the_unlearned_model(mrp):
    method, _, out, batch = mrp
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    local, _ = load_local(out)
    base, _ = tiny.load()
    expected = logits(method.model, batch)
    assert type(remote).__name__ == export.ARCHITECTURE and isinstance(remote, type(base))
    assert type(local) is type(base)                        # load_local runs none of the folder's code
    torch.testing.assert_close(logits(remote, batch), expected, **KERNEL_VS_TORCH)
    torch.testing.assert_close(logits(local, batch), expected, **KERNEL_VS_TORCH)
    assert float((logits(base, batch) - expected).abs().max()) > 1e-2   # and that is not the base model
    assert set(local.unlearn_projections) == set(remote.unlearn_projections) == {1}
    assert torch.equal(local.unlearn_projections[1], method.basis)


def test_config_names_method_base_and_projections(mrp):
    _, _, out, _ = mrp
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == export.MODEL_TYPE and config["architectures"] == [export.ARCHITECTURE]
    assert config["base_model_type"] == "llama" and config["base_architectures"] == ["LlamaForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_unlearn.UnlearnProjectedConfig",
                                  "AutoModelForCausalLM": "modeling_unlearn.UnlearnProjectedForCausalLM"}
    unlearning = config["unlearning"]
    assert unlearning["method"] == "MRP" and unlearning["layers_module"] == "model.layers"
    assert unlearning["projections"] == {"1": {"file": "unlearn_projections.safetensors", "key": "layer.1",
                                               "rank": 8, "scale": 1.0}}
    base = json.loads((tiny.ASSET_DIR / "config.json").read_text())
    assert all(config[k] == base[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    assert {"modeling_unlearn.py", "unlearn_projections.safetensors", "model.safetensors"} <= set(os.listdir(out))
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "MRP" and report["loading"]["trust_remote_code"] is True
    assert "trust_remote_code=True" in report["loading"]["how"]


def test_lm_eval_scores_the_unlearned_model(mrp, bench):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from unlearn_kernels.eval.multiple_choice import evaluate_multiple_choice

    _, _, out, batch = mrp
    lm = HFLM(pretrained=str(out), trust_remote_code=True, device="cpu", dtype="float32", batch_size=4)
    local, tok = load_local(out)
    torch.testing.assert_close(logits(lm.model, batch), logits(local, batch), **KERNEL_VS_TORCH)
    questions = bench.questions(bench.forget_facts())[:3]
    ours = evaluate_multiple_choice(local, tok, questions, return_details=True)["samples"]
    base, _ = tiny.load()
    before = evaluate_multiple_choice(base, tok, questions, return_details=True)["samples"]
    requests = [Instance("loglikelihood", {}, (s["context"], c), i)
                for s in ours for i, c in enumerate(s["continuations"])]
    theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    mine = [ll for s in ours for ll in s["loglikelihoods"]]
    assert mine == pytest.approx(theirs, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(mine, (ll for s in before for ll in s["loglikelihoods"]))) > 1e-2


def test_without_projections_the_folder_stays_plain(tmp_path):
    model, tok = tiny.load()
    masks = {"model.layers.1.mlp.up_proj.weight": torch.arange(256) % 4 == 0}
    out = save_pretrained_atomic(model, tok, tmp_path / "plain", {"method": "SIMU"}, projections={}, masks=masks)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "unlearning" not in config
    assert not (out / "modeling_unlearn.py").exists() and not (out / "unlearn_projections.safetensors").exists()
    assert json.loads((out / "report.json").read_text())["loading"]["trust_remote_code"] is False
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = tok(["the a b c", "b c"], return_tensors="pt", padding=True)
    assert torch.equal(logits(plain, batch), logits(model, batch))
    loaded, _ = load_local(out)
    assert torch.equal(loaded.unlearn_masks["model.layers.1.mlp.up_proj.weight"], masks[next(iter(masks))])
    assert not hasattr(loaded, "unlearn_projections")


def test_the_modeling_file_needs_nothing_from_unlearn_kernels(mrp, tmp_path):
    method, _, out, batch = mrp
    text = (out / "modeling_unlearn.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0] if not node.level else ".")
    assert imported <= {"__future__", "os", "torch", "transformers", "safetensors"}, imported
    assert "BASE_ARCHITECTURE = \"LlamaForCausalLM\"" in text
    torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, tmp_path / "in.pt")
    code = (
        "import sys; sys.modules['unlearn_kernels'] = None\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"batch = torch.load({str(tmp_path / 'in.pt')!r})\n"
        "with torch.no_grad():\n"
        "    torch.save(model(**batch).logits, sys.argv[1])\n"
        "assert sys.modules['unlearn_kernels'] is None\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits(method.model, batch), **KERNEL_VS_TORCH)


def test_a_loaded_model_saved_again_keeps_its_projections(mrp, tmp_path, no_prompt):
    method, tok, out, batch = mrp
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    remote.save_pretrained(tmp_path / "again")                 # e.g. after fine-tuning: a relearning attack
    tok.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    expected = logits(method.model, batch)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    torch.testing.assert_close(logits(reloaded, batch), expected, **KERNEL_VS_TORCH)
    torch.testing.assert_close(logits(load_local(tmp_path / "again")[0], batch), expected, **KERNEL_VS_TORCH)


def test_saving_a_loaded_model_without_its_projections_is_refused(mrp, tmp_path):
    _, tok, out, batch = mrp
    local, _ = load_local(out)
    with pytest.raises(ValueError, match="carries a projection after layer 1"):
        save_pretrained_atomic(local, tok, tmp_path / "lost", {"method": "GradDiff"})
    assert not (tmp_path / "lost").exists()
    again = save_pretrained_atomic(local, tok, tmp_path / "kept", {"method": "MRP"},
                                   {"layer.1": local.unlearn_projections[1]})
    torch.testing.assert_close(logits(load_local(again)[0], batch), logits(local, batch), atol=1e-6, rtol=0)


def test_another_architecture_gpt2(tmp_path):
    """GPT-2: Conv1D weights, ``transformer.h``, a LayerNorm model: same guarantees."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = tiny.load()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                       bos_token_id=2, eos_token_id=3)).eval()
    u, _ = torch.linalg.qr(torch.randn(32, 4))
    model.transformer.h[1].register_forward_hook(projection_hook(u))
    out = save_pretrained_atomic(model, tok, tmp_path / "gpt2", {"method": "MRP"}, {"layer.1": u})
    config = json.loads((out / "config.json").read_text())
    assert config["base_model_type"] == "gpt2" and config["unlearning"]["layers_module"] == "transformer.h"
    batch = tok(["the a b c", "b c"], return_tensors="pt", padding=True)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(remote, batch), logits(model, batch), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(load_local(out)[0], batch), logits(model, batch), atol=1e-6, rtol=0)


def test_bad_projections_are_refused_before_anything_is_written(tmp_path):
    model, tok = tiny.load()
    u, _ = torch.linalg.qr(torch.randn(128, 2))
    layers = model.config.num_hidden_layers
    for projections, message in (({"layer.9": u}, f"{layers} decoder layers"), ({"layer.1": u[:64]}, r"\[128, r\]"),
                                 ({"blocks.1": u}, "layer.<index>")):
        with pytest.raises(ValueError, match=message):
            save_pretrained_atomic(model, tok, tmp_path / "bad", {"method": "MRP"}, projections)
        assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))


def test_mrp_through_the_command_line_then_both_eval_engines(tmp_path, capsys):
    import json as _json

    from unlearn_kernels import cli

    bench = entangled.generate(0.25)
    facts = bench.forget_facts()
    (tmp_path / "forget.txt").write_text("\n".join(bench.corpus(facts)))
    (tmp_path / "retain.txt").write_text("\n".join(bench.corpus(bench.retain_facts())))
    (tmp_path / "q.jsonl").write_text("".join(_json.dumps(q.to_json()) + "\n" for q in bench.questions(facts)[:12]))
    out = tmp_path / "mrp"
    assert cli.main(["unlearn", "--model", str(tiny.ASSET_DIR), "--method", "MRP", "--forget",
                     str(tmp_path / "forget.txt"), "--retain", str(tmp_path / "retain.txt"), "--out", str(out),
                     "--set", "layer=1", "--set", "rank=32", "--set", "retain_energy=0.95", "--set", "train_steps=40",
                     "--set", "lr=3e-2", "--set", "batch_size=16", "--set", "progress=false"]) == 0
    capsys.readouterr()
    results = {}
    for engine in ("ours", "lm-eval"):
        assert cli.main(["eval", "--model", str(out), "--questions", str(tmp_path / "q.jsonl"), "--engine", engine,
                         "--json", "-"]) == 0
        results[engine] = _json.loads(capsys.readouterr().out)["results"]["q"]
    assert results["ours"]["acc"] == results["lm-eval"]["acc"] < 1.0   # the projection is applied by both
    assert cli.main(["unlearn", "--model", str(tiny.ASSET_DIR), "--method", "MRP", "--forget",
                     str(tmp_path / "forget.txt"), "--retain", str(tmp_path / "retain.txt"), "--out",
                     str(tmp_path / "mrp2"), "--checkpoint-every", "5"]) == 2


@pytest.mark.parametrize("name", ["RMU", "SRMU", "AdaptiveRMU", "SIMU", "SO-GradDiff", "GradAscent", "GradDiff", "NPO"])
def test_plain_from_pretrained_gives_the_unlearned_model_for_weight_edits(tmp_path, name):
    """Every method but MRP edits weights: a plain transformers load is the unlearned model."""
    from unlearn_kernels.methods import registry

    model, tokenizer = tiny.load()
    bench = entangled.generate(0.25)
    settings = {"update": ["layers.{1,2}.mlp.{up_proj,down_proj}"], "lr": 1e-3, "steps": 2, "batch_size": 4,
                "progress": False}
    if name in ("RMU", "SRMU", "AdaptiveRMU"):
        settings["layer"] = 2
    if name == "SIMU":
        settings.update(fraction=0.25, score_batches=2)
    method = registry[name](model, tokenizer, **settings)
    method.fit(bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts()))
    out = save_pretrained_atomic(method.model, tokenizer, tmp_path / name, method.report(), method.projections(),
                                 method.saved_masks())
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer(["Question: what is the toxin of filopi ?\nAnswer:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, method.model(ids).logits)
        assert not torch.equal(plain(ids).logits, tiny.load()[0](ids).logits)
