"""Self-check: every op on every available backend against the plain-PyTorch reference, on
fresh inputs of odd sizes with masked tokens.

Used by ``unlearn-kernels demo`` and ``unlearn-kernels selfcheck`` so a user can see, on
their own machine, which backends run and that they agree with the reference.
"""

from __future__ import annotations

import torch

from .ops import (_backend, class_means, disruption_mask, hessian_ema_, low_rank_project, masked_edit,
                  masked_gram, masked_moments, masked_sophia_step_, misdirection_loss, neuron_scores)

_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _errors(backend: str, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, float]:
    """Largest relative error of each op (loss, gradient, moments, edit) against the reference."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (3, 37, 131)
    h = torch.randn(shape, generator=g).to(device, dtype)
    anchor = torch.randn(shape, generator=g).to(device, dtype)
    control = torch.randn(131, generator=g).to(device)
    importance = torch.rand(131, generator=g).to(device)
    mask = (torch.rand(shape[:-1], generator=g) > 0.25).to(device)

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))

    results = {}
    grads = []
    for name in (backend, "torch"):
        x = h.clone().requires_grad_(True)
        loss = misdirection_loss(x, control, importance, anchor, mask, backend=name)
        loss.backward()
        grads.append((loss, x.grad))
    results["misdirection loss"] = rel(grads[0][0], grads[1][0])
    results["misdirection grad"] = rel(grads[0][1], grads[1][1])
    got, ref = masked_moments(h, mask, backend=backend), masked_moments(h, mask, backend="torch")
    results["moments mean"] = rel(got.mean, ref.mean)
    results["moments m2"] = rel(got.m2, ref.m2)
    results["masked_edit"] = rel(masked_edit(h, importance, control, 0.6, mask, backend=backend),
                                 masked_edit(h, importance, control, 0.6, mask, backend="torch"))
    basis, _ = torch.linalg.qr(torch.randn(131, 8, generator=g))
    basis = basis.to(device)
    results["low_rank_project"] = rel(low_rank_project(h, basis, backend=backend),
                                      low_rank_project(h, basis, backend="torch"))
    results["masked_gram"] = rel(masked_gram(h, mask, backend=backend), masked_gram(h, mask, backend="torch"))
    weight = torch.randn(67, 131, generator=g).to(device, dtype)
    h_f, h_r = (torch.rand(67, 131, generator=g).to(device) for _ in range(2))
    for dim in (0, 1):
        got, ref = neuron_scores(weight, h_f, h_r, dim=dim, backend=backend), \
            neuron_scores(weight, h_f, h_r, dim=dim, backend="torch")
        results[f"neuron_scores dim={dim}"] = max(rel(got[0], ref[0]), rel(got[1], ref[1]))
    ema = [h_f.clone(), h_f.clone()]
    hessian_ema_(ema[0], weight, beta=0.9, backend=backend)
    hessian_ema_(ema[1], weight, beta=0.9, backend="torch")
    results["hessian_ema_"] = rel(ema[0], ema[1])
    retain = (h_f - 0.5).to(dtype)
    results["disruption_mask"] = rel(disruption_mask(weight, retain, 0.3, backend=backend),
                                     disruption_mask(weight, retain, 0.3, backend="torch"))
    labels = torch.randint(0, 5, (h.shape[0] * h.shape[1],), generator=g).to(device)
    results["class_means"] = rel(class_means(h.reshape(-1, 131), labels, 6, backend=backend)[0],
                                 class_means(h.reshape(-1, 131), labels, 6, backend="torch")[0])
    states = []
    for name in (backend, "torch"):
        p, m = weight.clone(), torch.randn(67, 131, generator=torch.Generator().manual_seed(seed)).to(device)
        masked_sophia_step_([p], [weight * 0.5], [m], [h_f.clone()], [torch.arange(67, device=device) % 3 == 0],
                            lr=0.05, backend=name)
        states.append((p, m))
    results["masked_sophia_step_"] = max(rel(states[0][0], states[1][0]), rel(states[0][1], states[1][1]))
    return results


def run(out=print, seed: int = 0) -> bool:
    """Check every backend available here in every dtype it runs; True when all pass."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ok = True
    out("| backend | device | dtype | ops | worst op | its relative error | tolerance | result |")
    out("|---|---|---|---|---|---|---|---|")
    for device in devices:
        for backend in ("cuda", "triton", "cpu"):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                if not _backend.available(backend, device, dtype):
                    continue
                if backend == "triton" and device.type == "cpu" and dtype != torch.float32:
                    continue  # the Triton interpreter handles fp32 only
                errors = _errors(backend, device, dtype, seed)
                op, worst = max(errors.items(), key=lambda item: item[1])
                passed = worst <= _TOLERANCE[dtype]
                ok &= passed
                out(f"| {backend} | {device.type} | {str(dtype).split('.')[-1]} | {len(errors)} | {op} | "
                    f"{worst:.2e} | {_TOLERANCE[dtype]:.0e} | {'ok' if passed else 'FAIL'} |")
    return ok


def info(out=print) -> None:
    """What ``unlearn-kernels info`` prints: versions, whether the C++/CUDA code is compiled, the CPU
    kernels' instruction set, and the backends usable on each device."""
    import unlearn_kernels as uk

    out(f"unlearn_kernels {uk.__version__}, torch {torch.__version__}")
    out(f"compiled C++: {uk.compiled()}, compiled CUDA: {uk.compiled_with_cuda()}")
    if uk.compiled():
        from ._extension import cpu_capability

        out(f"CPU kernels: {cpu_capability()} (UNLEARN_KERNELS_CPU_CAPABILITY=default|avx2|avx512 to cap)")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        usable = [name for name, ok in uk.backends(device).items() if ok]
        out(f"backends on {device}: {', '.join(usable)}")
