"""Orthonormal bases for MRP's projection, built from Gram matrices (see :func:`masked_gram`).

Retain subspace. With ``G_r = Σ_retain hᵀ h = Q Λ Qᵀ`` (eigenvalues λ₁ ≥ λ₂ ≥ … ≥ 0), the
retain subspace ``V = Q[:, :k]`` keeps the smallest ``k`` with
``λ₁ + … + λ_k ≥ retain_energy · trace(G_r)``: the directions that carry that share of the
retain activations' energy.

Forget basis. The forget directions are the top eigenvectors of the forget Gram matrix after
the retain subspace is projected out, ``P G_f P`` with ``P = I − V Vᵀ``. Since ``P = W Wᵀ``
for an orthonormal basis ``W`` ``[d, d − k]`` of ``span(V)^⊥``, the eigenvectors of
``P G_f P`` with non-zero eigenvalue are ``W E`` where ``E`` are those of the small matrix
``Wᵀ G_f W``; computing them that way keeps ``U = W E[:, :rank]`` exactly orthogonal to ``V``
even when ``P G_f P`` has fewer than ``rank`` non-zero eigenvalues (its null space contains
``span(V)``, so a plain eigendecomposition could return retain directions there).

Growing a basis (continual unlearning). A new request with Gram ``G_n`` adds ``U_new = W E``
with ``W`` now an orthonormal basis of ``span([U_old, V])^⊥`` and ``E`` the top eigenvectors
of ``Wᵀ G_n W``; the result ``[U_old | U_new]`` is orthonormal and the old columns are
returned unchanged, so earlier requests keep exactly the projection they had.

All eigendecompositions run in fp64 on the Grams' device. Eigenvector signs are fixed (the
largest-magnitude entry of each column is positive) so results are reproducible.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import _validation as check
from .low_rank import check_orthonormal


def _symmetric(name: str, gram, d: int | None = None) -> Tensor:
    """``gram`` as a symmetric fp64 ``[d, d]`` matrix (validated)."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(gram).__name__}")
    if not gram.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {gram.dtype}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"{name} must be a square [d, d] matrix with d >= 1, got {tuple(gram.shape)}")
    if d is not None and gram.shape[0] != d:
        raise ValueError(f"{name} must be [{d}, {d}], got {tuple(gram.shape)}")
    g = gram.detach().to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} holds non-finite values")
    return 0.5 * (g + g.T)


def _rank(name: str, value, low: int, high: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}] ({why}), got {value}")
    return int(value)


def _fix_signs(vectors: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    if vectors.shape[1] == 0:
        return vectors
    idx = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, idx[None, :]))
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def _top_eigenvectors(sym: Tensor, k: int) -> Tensor:
    """The ``k`` eigenvectors of the symmetric ``sym`` with the largest eigenvalues."""
    _, vectors = torch.linalg.eigh(sym)
    return _fix_signs(vectors.flip(1)[:, :k])


def retain_subspace(gram_retain: Tensor, retain_energy: float = 0.99) -> Tensor:
    """Orthonormal ``V`` ``[d, k]`` (fp64): the top eigenvectors holding ``retain_energy`` of the trace."""
    g = _symmetric("gram_retain", gram_retain)
    retain_energy = check.finite_scalar("retain_energy", retain_energy)
    if not 0 <= retain_energy <= 1:
        raise ValueError(f"retain_energy must be in [0, 1], got {retain_energy}")
    values, vectors = torch.linalg.eigh(g)
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    total = float(values.sum())
    if retain_energy == 0 or total <= 0:
        return vectors[:, :0]
    share = torch.cumsum(values, 0) / total
    k = int(torch.searchsorted(share, torch.tensor(retain_energy * (1 - 1e-12), dtype=share.dtype,
                                                   device=share.device))) + 1
    return _fix_signs(vectors[:, :min(k, g.shape[0])])


def _complement(avoid: Tensor, d: int, device: torch.device) -> Tensor:
    """Orthonormal fp64 basis ``[d, d − rank(avoid)]`` of ``span(avoid)^⊥``."""
    if avoid.shape[1] == 0:
        return torch.eye(d, dtype=torch.float64, device=device)
    left, singular, _ = torch.linalg.svd(avoid, full_matrices=True)
    tol = float(singular.max()) * max(avoid.shape) * torch.finfo(torch.float64).eps
    return left[:, int((singular > tol).sum()):]


def _directions(gram: Tensor, avoid: Tensor, rank: int, name: str, what: str) -> Tensor:
    """Top-``rank`` eigenvectors of ``gram`` restricted to ``span(avoid)^⊥`` (fp64 ``[d, rank]``)."""
    d = gram.shape[0]
    w = _complement(avoid, d, gram.device)
    rank = _rank(name, rank, 1, w.shape[1], f"{w.shape[1]} of d={d} dimensions are left after {what}")
    return w @ _top_eigenvectors(w.T @ gram @ w, rank)


def forget_basis(gram_forget: Tensor, gram_retain: Tensor | None, rank: int, *,
                 retain_energy: float = 0.99) -> Tensor:
    """Orthonormal ``U`` ``[d, rank]``: the top forget directions outside the retain subspace.

    Args:
        gram_forget: ``Σ hᵀh`` over forget-set activations, ``[d, d]`` (:func:`masked_gram`).
        gram_retain: the same over retain-set activations, or None (no retain constraint).
        rank: number of directions, 1 ≤ rank ≤ d − k (k = dim of the retain subspace).
        retain_energy: share of ``trace(G_r)`` the removed retain subspace must hold.

    Returns:
        fp32 ``U`` on the Grams' device (math in the module docstring); ``U ⟂ V``.

    Example:
        >>> hf, hr = torch.randn(200, 16), torch.randn(200, 16)
        >>> hf[:, 0] += 5                        # forget data lives along feature 0
        >>> hr[:, 1] *= 10                       # retain data's dominant feature 1
        >>> u = forget_basis(hf.T @ hf, hr.T @ hr, rank=1, retain_energy=0.3)
        >>> int(u[:, 0].abs().argmax())
        0
    """
    g_f = _symmetric("gram_forget", gram_forget)
    avoid = g_f.new_zeros((g_f.shape[0], 0))
    if gram_retain is not None:
        _symmetric("gram_retain", gram_retain, g_f.shape[0])
        check.same_device("gram_retain", gram_retain, gram_forget, "gram_forget")
        avoid = retain_subspace(gram_retain, retain_energy)
    what = f"removing the {avoid.shape[1]}-dim retain subspace"
    return _directions(g_f, avoid, rank, "rank", what).to(torch.float32)


def grow_basis(basis: Tensor, gram_new: Tensor, rank_new: int, gram_retain: Tensor | None = None, *,
               retain_energy: float = 0.99) -> Tensor:
    """Continual unlearning: ``[U_old | U_new]`` with ``U_new`` ⟂ ``U_old`` (and the retain subspace).

    Args:
        basis: the current orthonormal ``U_old`` ``[d, r_old]``; returned unchanged in the
            first ``r_old`` columns.
        gram_new: Gram matrix of the new request's forget activations, ``[d, d]``.
        rank_new: directions to add, 1 ≤ rank_new ≤ d − r_old − k.
        gram_retain: retain Gram matrix, or None.
        retain_energy: as in :func:`forget_basis`.

    Returns:
        ``[d, r_old + rank_new]`` in basis' dtype and device, orthonormal.

    Example:
        >>> g = torch.diag(torch.tensor([9.0, 4.0, 1.0, 0.5]))
        >>> u = forget_basis(g, None, rank=1)            # e0
        >>> grown = grow_basis(u, g, rank_new=1)         # adds e1, keeps e0
        >>> grown.abs().argmax(0).tolist()
        [0, 1]
    """
    if not isinstance(basis, Tensor) or basis.dim() != 2 or not basis.is_floating_point():
        raise TypeError("basis must be a floating [d, r_old] tensor (the current orthonormal basis)")
    check_orthonormal(basis)
    g_n = _symmetric("gram_new", gram_new, basis.shape[0])
    check.same_device("gram_new", gram_new, basis, "basis")
    avoid = basis.detach().to(torch.float64)
    if gram_retain is not None:
        _symmetric("gram_retain", gram_retain, basis.shape[0])
        check.same_device("gram_retain", gram_retain, basis, "basis")
        avoid = torch.cat([avoid, retain_subspace(gram_retain, retain_energy)], dim=1)
    what = f"excluding the {basis.shape[1]} old directions and the retain subspace"
    new = _directions(g_n, avoid, rank_new, "rank_new", what)
    return torch.cat([basis.detach(), new.to(basis.dtype)], dim=1)
