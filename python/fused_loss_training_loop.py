"""Recipe: RMU written by hand with the fused misdirection loss in your own training loop.

Runs on the embedded tiny model in a few seconds on a CPU:
    python python/fused_loss_training_loop.py
Swap in any Hugging Face causal LM directory with --model.
"""

import argparse

import torch

from unlearn_kernels.data import entangled
from unlearn_kernels.eval.multiple_choice import accuracy
from unlearn_kernels.models import tiny
from unlearn_kernels.models.io import load_local
from unlearn_kernels.models.layers import FrozenCopy, layer_output, parameters_matching
from unlearn_kernels.ops import misdirection_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(tiny.ASSET_DIR))
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()

    model, tokenizer = load_local(args.model)
    bench = entangled.generate(overlap=0.25)
    forget, retain = bench.corpus(bench.forget_facts()), bench.corpus(bench.retain_facts())

    params = parameters_matching(model, f"layers.{{0,1,{args.layer}}}.mlp.*")
    for p in model.parameters():
        p.requires_grad_(p in set(params.values()))
    frozen = FrozenCopy(model, params)            # copies only the weights that will change
    u = torch.rand(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    control = 100.0 * u / u.norm()                # c · u
    optimizer = torch.optim.AdamW(params.values(), lr=5e-3)
    g = torch.Generator().manual_seed(0)

    for step in range(args.steps):
        f = tokenizer([forget[i] for i in torch.randint(len(forget), (16,), generator=g)], return_tensors="pt", padding=True)
        r = tokenizer([retain[i] for i in torch.randint(len(retain), (16,), generator=g)], return_tensors="pt", padding=True)
        h_forget = layer_output(model, args.layer, f["input_ids"], f["attention_mask"])
        h_retain = layer_output(model, args.layer, r["input_ids"], r["attention_mask"])
        anchor = frozen.layer_output(args.layer, r["input_ids"], r["attention_mask"])
        loss = misdirection_loss(h_forget, control, token_mask=f["attention_mask"]) \
            + 10.0 * misdirection_loss(h_retain, anchor=anchor, token_mask=r["attention_mask"])
        optimizer.zero_grad()
        loss.backward()                           # the gradient comes from the fused forward pass
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}")

    model.eval()
    print(f"forget accuracy {accuracy(model, tokenizer, bench.questions(bench.forget_facts())):.3f} (chance 0.25)")
    print(f"retain accuracy {accuracy(model, tokenizer, bench.questions(bench.retain_facts())):.3f}")


if __name__ == "__main__":
    main()
