"""Seconds per optimisation step of a loss method on a real model, one configuration per process (issue 20, item 5).

The method (GradAscent, GradDiff, NPO, SOGradDiff, SIMU) is built with no settings, as
``unlearn_kernels.pipeline.run`` builds it (``resolve_defaults``: the MLP band, lr, batch 4,
max_length 512, epochs 5), on the converted SmolLM2-135M-Instruct and the real-knowledge texts
(``assets/real-knowledge/{forget,retain}.txt``). ``fit`` runs ``--warmup + --steps`` steps (its
own setup, batches, checks and optimizer); every ``_step`` call is timed, and the median of the
steps after the warm-up is reported (wall and the process's CPU seconds, which another
process on a shared machine disturbs less) with the default run's step count (``num_steps``) and the
extrapolated training time ``num_steps × median`` (``--full`` runs the whole default run
instead and reports its wall time too).

The package measured is the one Python imports: to time an older commit, extract it elsewhere
and put it first on ``PYTHONPATH`` (``git archive <commit> | tar -x -C /tmp/base``, link the
compiled ``_C`` module in), then run this same script; the record names the package directory.

``--interleave`` (for a machine shared with other work, where two processes minutes apart see
different loads) alternates, step by step in this one process, the package's step with the
plain one written from the math, as the package computed it before issue 20: full ``[b, T, V]``
logits, ``log_softmax`` + ``gather``, NPO's reference as a whole second forward, torch's
per-op AdamW and ``isfinite(p).all()`` on every updated tensor. Both see the same load, so
their ratio is what the change is worth; the record has a median for each.

    OMP_NUM_THREADS=1 python benchmarks/bench_loss_step.py --method GradDiff --threads 1
    python benchmarks/bench_loss_step.py --method NPO --threads 2 --steps 10 --full
    OMP_NUM_THREADS=1 python benchmarks/bench_loss_step.py --method NPO --interleave --steps 16

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

MODEL = Path.home() / ".cache" / "unlearn_kernels" / "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[1] / "unlearn_kernels" / "assets" / "real-knowledge"


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def plain_parts(method) -> dict:
    """The plain computation's replacements: ``{(owner, attribute): value}``."""
    import torch
    import torch.nn.functional as F

    from unlearn_kernels.methods import NPO, base, distributed, loss_based
    from unlearn_kernels.methods.base import model_inputs

    def nll(model, batch):
        lp, mask = loss_based.token_logprobs(model(**model_inputs(batch), use_cache=False).logits, batch)
        return distributed.global_mean(-(lp * mask).sum() / mask.sum().clamp(min=1), mask.sum())

    def npo_loss(self, forget_batch, retain_batch, step):
        inputs = model_inputs(forget_batch)
        lp, mask = loss_based.token_logprobs(self.model(**inputs, use_cache=False).logits, forget_batch)
        ref, _ = loss_based.token_logprobs(self.reference.forward(**inputs).logits, forget_batch)
        log_ratio = ((lp - ref) * mask).sum(-1)
        npo = -(2 / self.config.beta) * F.logsigmoid(-self.config.beta * log_ratio).mean()
        losses = {"forget": distributed.global_mean(npo, log_ratio.shape[0])}
        if self.config.retain_weight:
            losses["retain"] = self.config.retain_weight * nll(self.model, retain_batch)
        return losses

    parts = {(loss_based, "nll"): nll, (base, "all_finite"): lambda t: torch.isfinite(t).all()}
    if isinstance(method, NPO):
        parts[(NPO, "loss")] = npo_loss
    return parts


def interleaved(method, forget, retain, args) -> dict:
    """Alternate the package's step and the plain one (module docstring); medians of each."""
    import torch

    from unlearn_kernels.methods import NPO, base, loss_based

    method.prepare(forget, retain)       # fit's preparation, without its loop
    ours_optimizer = method.optimizer
    plain_optimizer = (torch.optim.AdamW(list(method.optimized.values()), lr=method.config.lr, weight_decay=0.0)
                       if isinstance(ours_optimizer, torch.optim.AdamW) else ours_optimizer)
    plain = plain_parts(method)
    ours = {key: getattr(*key) for key in plain}
    forget_batches, retain_batches = method.batches(forget), method.batches(retain, 1)

    class Bar:
        def set_postfix(self, _):
            pass

    times = {"ours": ([], []), "plain": ([], [])}
    for step in range(args.warmup + args.steps):
        for name, parts, optimizer in (("plain", plain, plain_optimizer), ("ours", ours, ours_optimizer)):
            for (owner, attribute), value in parts.items():
                setattr(owner, attribute, value)
            method.optimizer = optimizer
            start, cpu = time.perf_counter(), time.process_time()
            method._step(2 * step, forget_batches, retain_batches, Bar())
            if step >= args.warmup:
                times[name][0].append(time.perf_counter() - start)
                times[name][1].append(time.process_time() - cpu)
    for (owner, attribute), value in ours.items():
        setattr(owner, attribute, value)
    out = {}
    for name, (wall, cpu) in times.items():
        out[name] = {"median_step_s": round(statistics.median(wall), 4),
                     "median_step_cpu_s": round(statistics.median(cpu), 4), "step_s": [round(t, 3) for t in wall]}
    out["plain_over_ours"] = {"wall": round(out["plain"]["median_step_s"] / out["ours"]["median_step_s"], 3),
                              "cpu": round(out["plain"]["median_step_cpu_s"] / out["ours"]["median_step_cpu_s"], 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="GradDiff")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    parser.add_argument("--full", action="store_true", help="run the whole default-length run")
    parser.add_argument("--interleave", action="store_true",
                        help="alternate the package's step and the plain one in this process")
    parser.add_argument("--model", default=str(MODEL))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import unlearn_kernels
    from unlearn_kernels.methods import registry
    from unlearn_kernels.models.io import load_local

    model, tokenizer = load_local(args.model)
    forget, retain = lines(DATA / "forget.txt"), lines(DATA / "retain.txt")
    method = registry[args.method](model, tokenizer, progress=False)
    default_steps = method.num_steps(forget)
    if args.interleave:
        record = {"method": args.method, "threads": args.threads, "torch": torch.__version__,
                  "package": str(Path(unlearn_kernels.__file__).parent), "default_steps": default_steps,
                  **interleaved(method, forget, retain, args)}
        print(json.dumps(record))
        return
    if not args.full:
        method.config.steps = args.warmup + args.steps
    times: list[float] = []
    cpu_times: list[float] = []      # the process's CPU seconds: less disturbed by other processes than wall time
    shapes: list[list[int]] = []
    step, batches = method._step, method.batches

    def timed_step(*a, **k):
        start, cpu = time.perf_counter(), time.process_time()
        step(*a, **k)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)

    def recorded_batches(*a, **k):     # the padded widths the steps see
        for batch in batches(*a, **k):
            shapes.append(list(batch["input_ids"].shape))
            yield batch

    method._step, method.batches = timed_step, recorded_batches
    start = time.perf_counter()
    method.fit(forget, retain)
    wall = time.perf_counter() - start
    median = statistics.median(times[args.warmup:])
    record = {"method": args.method, "threads": args.threads, "torch": torch.__version__,
              "package": str(Path(unlearn_kernels.__file__).parent),
              "config": {k: v for k, v in vars(method.config).items() if k in ("update", "lr", "batch_size",
                                                                               "max_length", "epochs")},
              "median_step_s": round(median, 4),
              "median_step_cpu_s": round(statistics.median(cpu_times[args.warmup:]), 4),
              "timed_steps": len(times) - args.warmup,
              "step_s": [round(t, 3) for t in times],
              "mean_width": round(statistics.mean(s[1] for s in shapes), 2),
              "default_steps": default_steps, "extrapolated_run_s": round(median * default_steps, 1)}
    if args.full:
        record["full_run_wall_s"] = round(wall, 1)
        record["fit_steps_s"] = round(sum(times), 1)
        record["fit_steps_cpu_s"] = round(sum(cpu_times), 1)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
