"""Multiple-choice evaluation with lm-evaluation-harness 0.4.13's protocol, exactly.

For a question with choices ``c_0 … c_{k-1}`` the context ``x`` and continuations ``y_i`` come
from the prompt format (``data.prompts``: ``cloze`` or ``mmlu``), and each choice is scored by

    ℓ_i = Σ_t log p(y_i,t | x, y_i,<t)                      (fp32 log-softmax)

    acc      = 1[argmax_i ℓ_i = answer]
    acc_norm = 1[argmax_i ℓ_i / len(c_i) = answer]           (len in characters, no leading space)

``argmax`` returns the lowest index on ties (``numpy.argmax``), and each metric's standard
error is that of a mean, ``s / √n`` with the sample standard deviation ``s`` (ddof = 1), as
lm-eval's ``mean_stderr``. The rules lm-eval's ``HFLM`` applies, reproduced here:

- **Encoding** (``HFLM.tok_encode``): ``tokenizer.encode(s)`` with the tokenizer's own default
  for special tokens, so a BOS token is added exactly when the tokenizer's post-processor adds
  one (Llama's does, GPT-2's does not); if ``s`` already starts with the decoded prefix token
  (BOS, else EOS), no special token is added.
- **Context/continuation split** (``TemplateLM._encode_pair``): trailing whitespace of the
  context moves to the front of the continuation; then ``whole = enc(ctx + cont)``,
  ``ctx_ids = enc(ctx)`` and ``cont_ids = whole[len(ctx_ids):]`` — the context is encoded on
  its own, the continuation is what the joint encoding adds after it.
- **Truncation** (``_loglikelihood_tokens``): the model reads ``(ctx_ids + cont_ids)[-(L+1):][:-1]``
  with ``L`` the model's maximum length (``n_positions``, ``max_position_embeddings`` or
  ``n_ctx`` of the config, else the tokenizer's ``model_max_length``, else 2048).

Speed without changing a number: all strings are tokenised in one batched call; questions are
length-sorted and batched, ``batch_size`` questions per batch (padding on the right, on the
model's device and dtype); the choices of a question
share one forward of their context (extended by the tokens all choices start with; its
key/value cache is copied to each choice and the choices' remaining tokens run after it with
explicit positions), and the first own token of every choice is read from that same forward,
so choices that differ only in their last token (the ``mmlu`` letters) cost no second forward.
The first shared batch a model (object, dtype and device) scores is checked against plain full
forwards, once: the verdict is remembered for that model object, whose weights may change
between evaluations (a run measures the same model many times) while its attention code does
not. A model whose cache cannot be shared this way falls back to the full forwards.
``bfloat16``/``float16`` models run in their dtype; log-probabilities are taken in fp32
(lm-eval takes them in the model's dtype, so its low-precision numbers are slightly noisier).
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..data.prompts import FORMATS, request

DEFAULT_MAX_LENGTH = 2048
TOKENIZER_INFINITY = 1000000000000000019884624838656
_SHARING_TOLERANCE = 1e-3
# model -> {(dtype, device): whether its shared-context scores matched full forwards}
_SHARING_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --- lm-eval's encoding rules ---------------------------------------------------------------
def prefix_token_id(tokenizer) -> int | None:
    """lm-eval's loglikelihood prefix token: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
    """``HFLM.tok_encode(text)``: the tokenizer's default special tokens, none when ``text``
    already starts with the decoded prefix token (:func:`encode_many` of one text)."""
    return encode_many(tokenizer, [text])[0]


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: trailing whitespace of the context belongs to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``TemplateLM._encode_pair``: trailing context whitespace goes to the continuation, and the
    continuation's tokens are those the joint encoding adds after the context's own."""
    if not context:
        raise ValueError("the context is empty: every prompt format gives a non-empty context")
    context, continuation = _move_trailing_space(context, continuation)
    context_ids, whole = encode_many(tokenizer, [context, context + continuation])
    return context_ids, whole[len(context_ids):]


def max_length(model, tokenizer) -> int:
    """lm-eval's ``resolve_max_length``: the config's positional limit, else the tokenizer's."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


# --- requests ------------------------------------------------------------------------------
@dataclass
class Request:
    """One question as token ids: its context and one continuation per choice."""

    index: int
    context: str
    continuations: list[str]
    normalisers: list[str]
    context_ids: list[int]
    continuation_ids: list[list[int]]


def encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """:func:`encode` of every text, in one batched tokenizer call per special-token setting."""
    prefix = prefix_token_id(tokenizer)
    marker = tokenizer.decode(prefix) if prefix is not None else None
    plain = [i for i, t in enumerate(texts) if marker is None or not t.startswith(marker)]
    out: list[list[int] | None] = [None] * len(texts)
    # A fast tokenizer's Rust core gives the same ids without building Python encodings, as
    # long as no truncation or padding is configured on it.
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and (backend.truncation is not None or backend.padding is not None):
        backend = None
    for indices, special in ((plain, True), (sorted(set(range(len(texts))) - set(plain)), False)):
        if not indices:
            continue
        batch = [texts[i] for i in indices]
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch(batch, add_special_tokens=special)]
        else:
            ids = tokenizer(batch, add_special_tokens=special)["input_ids"]
        for i, row in zip(indices, ids):
            out[i] = list(row)
    return out


def build_requests(tokenizer, questions: Sequence, format: str = "cloze", subject: str | None = None) -> list[Request]:
    """Context, continuations and their token ids for every question (``subject`` is used by
    ``mmlu``; a question's own ``subject`` attribute wins over it). Same ids as
    :func:`encode_pair` on each (context, continuation), with the context encoded once."""
    if format not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}, got {format!r}")
    prompts, texts = [], []
    for q in questions:
        ctx, conts, norms = request(q.question, list(q.choices), format, getattr(q, "subject", None) or subject)
        if not ctx:
            raise ValueError("the context is empty: every prompt format gives a non-empty context")
        head = _move_trailing_space(ctx, "")[0]
        prompts.append((ctx, conts, norms))
        texts += [head] + [head + _move_trailing_space(ctx, c)[1] for c in conts]
    ids = encode_many(tokenizer, texts)
    out, k = [], 0
    for i, (ctx, conts, norms) in enumerate(prompts):
        context_ids = ids[k]
        continuation_ids = [whole[len(context_ids):] for whole in ids[k + 1:k + 1 + len(conts)]]
        k += 1 + len(conts)
        for c, cont in zip(conts, continuation_ids):
            if not cont:
                raise UserError(f"question {i}: continuation {c!r} encodes to no token after the context")
        out.append(Request(i, ctx, conts, norms, context_ids, continuation_ids))
    return out


# --- scoring -------------------------------------------------------------------------------
def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _common_prefix(continuations: list[list[int]]) -> list[int]:
    """The tokens every continuation starts with, leaving each at least one of its own."""
    limit = min(map(len, continuations)) - 1
    prefix = []
    for t in range(limit):
        token = continuations[0][t]
        if any(c[t] != token for c in continuations):
            break
        prefix.append(token)
    return prefix


def pad_rows(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the right: ``(ids, attention mask)`` on ``device``."""
    width = max(1, max(map(len, rows)))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


class _Scorer:
    """Sums of continuation log-probabilities, by full forwards or with a shared context."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.device = next(model.parameters()).device
        self.limit = max_length(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # the key/value cache argument is ``cache`` from transformers 5.2x, ``past_key_values`` before
        self.cache_arg = next((n for n in ("cache", "past_key_values") if _accepts(model, n)), None)
        self.share = _accepts(model, "position_ids") and self.cache_arg is not None
        first = next(model.parameters())
        self.setup = (first.dtype, str(first.device))
        verdict = _SHARING_VERDICTS.get(model, {}).get(self.setup)
        self.share = self.share and verdict is not False
        self.checked = verdict is True
        self.shared_batches = 0
        self.keep_logits = _accepts(model, "logits_to_keep")  # the LM head only where it is read

    def full(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """lm-eval's computation: one row ``(ctx + cont)[-(L+1):][:-1]`` per pair."""
        rows = [(c + x)[-(self.limit + 1):][:-1] for c, x in pairs]
        ids, _ = pad_rows(rows, self.pad, self.device)
        # Padding is on the right and attention causal, so it never reaches a scored position:
        # no mask, as lm-eval (and attention keeps its causal fast path).
        logits = self.model(input_ids=ids, use_cache=False).logits
        out = []
        for i, ((_, cont), row) in enumerate(zip(pairs, rows)):
            positions = torch.arange(len(row) - len(cont), len(row), device=self.device)
            logp = F.log_softmax(logits[i, positions].float(), dim=-1)
            out.append(float(logp.gather(-1, torch.tensor(cont, device=self.device)[:, None]).sum()))
        return out

    def shared(self, batch: list[Request]) -> list[list[float]]:
        """One forward of the contexts, extended by the tokens that all choices of the question
        start with (padded on the right), keeps their cache; each choice reads its first own
        token's log-prob there, and the rest of its tokens run after a copy of that cache."""
        prefixes = [_common_prefix(r.continuation_ids) for r in batch]
        heads = [r.context_ids + p for r, p in zip(batch, prefixes)]
        lengths = [len(h) for h in heads]
        ids, mask = pad_rows(heads, self.pad, self.device)
        needed = [range(len(r.context_ids) - 1, n) for r, n in zip(batch, lengths)]
        keep = sorted({p for span in needed for p in span})
        extra = {"logits_to_keep": torch.tensor(keep, device=self.device)} if self.keep_logits else {}
        out = self.model(input_ids=ids, use_cache=True, **extra)  # right padding: no mask needed here
        column = {p: (k if self.keep_logits else p) for k, p in enumerate(keep)}
        rows_of = [i for i, span in enumerate(needed) for _ in span]
        cols_of = [column[p] for span in needed for p in span]
        logp = F.log_softmax(out.logits[torch.tensor(rows_of, device=self.device),
                                        torch.tensor(cols_of, device=self.device)].float(), dim=-1)
        scores, k = [], 0
        for r, prefix in zip(batch, prefixes):
            shared = sum(float(logp[k + t, tok]) for t, tok in enumerate(prefix))
            first = logp[k + len(prefix)]
            scores.append([shared + float(first[cont[len(prefix)]]) for cont in r.continuation_ids])
            k += len(prefix) + 1
        tails = [(i, j, cont[len(prefixes[i]):]) for i, r in enumerate(batch)
                 for j, cont in enumerate(r.continuation_ids) if len(cont) > len(prefixes[i]) + 1]
        if not tails:
            return scores
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None:
            raise TypeError("the model returned no key/value cache")
        rows = torch.tensor([i for i, _, _ in tails], device=self.device)
        cache.reorder_cache(rows)
        tail_ids, tail_mask = pad_rows([rest[:-1] for _, _, rest in tails], self.pad, self.device)
        positions = rows.new_tensor(lengths)[rows][:, None] + torch.arange(tail_ids.shape[1], device=self.device)
        logits = self.model(input_ids=tail_ids, attention_mask=torch.cat([mask[rows], tail_mask], 1),
                            position_ids=positions, use_cache=False, **{self.cache_arg: cache}).logits
        for k, (i, j, rest) in enumerate(tails):
            lp = F.log_softmax(logits[k, :len(rest) - 1].float(), dim=-1)
            scores[i][j] += float(lp.gather(-1, torch.tensor(rest[1:], device=self.device)[:, None]).sum())
        return scores

    def score(self, batch: list[Request]) -> list[list[float]]:
        fits = all(len(r.context_ids) + max(map(len, r.continuation_ids)) <= self.limit + 1 for r in batch)
        if self.share and fits:
            try:
                scores = self.shared(batch)
            except (TypeError, AttributeError, ValueError, RuntimeError) as error:
                warnings.warn(f"the context cache of {type(self.model).__name__} cannot be shared ({error}); "
                              "scoring every choice with its own forward", stacklevel=3)
                self._remember(False)
            else:
                self.shared_batches += 1
                if self.checked:
                    return scores
                reference = self._full_batch(batch)
                worst = max(abs(a - b) / max(1.0, abs(b)) for s, t in zip(scores, reference) for a, b in zip(s, t))
                self._remember(worst <= _SHARING_TOLERANCE)
                if self.share:
                    return scores
                warnings.warn(f"sharing the context cache of {type(self.model).__name__} changes log-likelihoods "
                              f"by {worst:.2g}; scoring every choice with its own forward", stacklevel=3)
                return reference
        return self._full_batch(batch)

    def _remember(self, shares: bool) -> None:
        """Whether this model (in this dtype, on this device) shares its context cache correctly."""
        self.share, self.checked = shares, True
        _SHARING_VERDICTS.setdefault(self.model, {})[self.setup] = shares

    def _full_batch(self, batch: list[Request]) -> list[list[float]]:
        flat = self.full([(r.context_ids, cont) for r in batch for cont in r.continuation_ids])
        out, k = [], 0
        for r in batch:
            out.append(flat[k:k + len(r.continuation_ids)])
            k += len(r.continuation_ids)
        return out


def _batches(requests: list[Request], batch_size: int) -> list[list[Request]]:
    """Length-sorted (longest first, as lm-eval), ``batch_size`` questions each."""
    order = sorted(requests, key=lambda r: -(len(r.context_ids) + max(map(len, r.continuation_ids))))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class NonFiniteScoreError(UserError):
    """The model gave NaN or ±Inf for a continuation: no accuracy can be read from it."""


@torch.no_grad()
def score_requests(model, tokenizer, requests: list[Request], batch_size: int = 16,
                   progress: bool | None = None, share_context: bool = True,
                   stats: dict | None = None) -> list[list[float]]:
    """``ℓ_i`` for every continuation of every request, in request order; ``stats``, when given,
    receives how many batches ran and how many of them shared their context.
    :class:`NonFiniteScoreError` when any ``ℓ_i`` is NaN or infinite."""
    from tqdm import tqdm

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    scorer = _Scorer(model, tokenizer)
    scorer.share = scorer.share and share_context
    was_training = model.training
    model.eval()
    results: dict[int, list[float]] = {}
    batches = _batches(requests, batch_size)
    try:
        # progress None: a bar only on a terminal, and only when there is a lot to score
        for batch in tqdm(batches, desc="scoring choices", leave=False,
                          disable=(None if len(batches) >= 50 else True) if progress is None else not progress):
            for r, s in zip(batch, scorer.score(batch)):
                if not all(math.isfinite(v) for v in s):
                    raise NonFiniteScoreError(f"question {r.index + 1}: the model gives a non-finite log-likelihood "
                                              f"({s}): its weights or config are broken")
                results[r.index] = s
    finally:
        model.train(was_training)
    if stats is not None:
        stats.update(batches=len(batches), shared_batches=scorer.shared_batches)
    return [results[r.index] for r in requests]


# --- metrics -------------------------------------------------------------------------------
def mean_stderr(values: Sequence[float]) -> float:
    """``s / √n`` with the sample standard deviation (lm-eval's ``mean_stderr``); nan for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def _check(questions: Sequence) -> None:
    if not questions:
        raise UserError("questions is empty: nothing to evaluate")
    for i, q in enumerate(questions):
        if len(q.choices) < 2 or not all(isinstance(c, str) and c for c in q.choices):
            raise UserError(f"question {i}: choices must be at least two non-empty strings")
        if isinstance(q.answer, bool) or not isinstance(q.answer, (int, np.integer)) \
                or not 0 <= q.answer < len(q.choices):
            raise UserError(f"question {i}: answer must be an index into its {len(q.choices)} choices, "
                            f"got {q.answer!r}")


def predictions(request: Request, loglikelihoods: Sequence[float]) -> tuple[int, int]:
    """``(pred, pred_norm)``: the choice of highest ``ℓ_i`` and of highest ``ℓ_i / len(c_i)``
    (lowest index on ties, as lm-eval)."""
    norm = [v / len(c) for v, c in zip(loglikelihoods, request.normalisers)]
    return int(np.argmax(loglikelihoods)), int(np.argmax(norm))


def evaluate_multiple_choice(model, tokenizer, questions: Sequence, *, format: str = "cloze",
                             subject: str | None = None, batch_size: int = 16, limit: int | None = None,
                             progress: bool | None = None, return_details: bool = False,
                             share_context: bool = True) -> dict:
    """Every metric in one pass (``batch_size`` questions per forward, their choices sharing
    it): ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n",
    "format"}`` and, with ``return_details``, ``"samples"``: per question its context,
    continuations, log-likelihoods and correctness (compare with lm-eval's ``--log_samples``).

    >>> from unlearn_kernels.models import tiny
    >>> from unlearn_kernels.data import entangled
    >>> model, tokenizer = tiny.load()
    >>> bench = entangled.generate(0.25)
    >>> r = evaluate_multiple_choice(model, tokenizer, bench.questions(bench.retain_facts()))
    >>> r["acc"] > 0.9
    True

    A model with a NaN or Inf weight is refused (a UserError naming the first one).
    """
    from ..models.integrity import check_finite

    questions = list(questions)[:limit] if limit is not None else list(questions)
    _check(questions)
    check_finite(model, "the model")
    requests = build_requests(tokenizer, questions, format, subject)
    lls = score_requests(model, tokenizer, requests, batch_size, progress, share_context)
    acc, acc_norm, samples = [], [], []
    for q, r, ll in zip(questions, requests, lls):
        pred, pred_norm = predictions(r, ll)
        acc.append(float(pred == q.answer))
        acc_norm.append(float(pred_norm == q.answer))
        if return_details:
            samples.append({"doc_id": r.index, "context": r.context, "continuations": r.continuations,
                            "loglikelihoods": ll, "answer": int(q.answer), "pred": pred, "pred_norm": pred_norm,
                            "acc": acc[-1], "acc_norm": acc_norm[-1]})
    result = {"acc": sum(acc) / len(acc), "acc_stderr": mean_stderr(acc),
              "acc_norm": sum(acc_norm) / len(acc_norm), "acc_norm_stderr": mean_stderr(acc_norm),
              "n": len(questions), "format": format}
    if return_details:
        result["samples"] = samples
    return result


def choice_loglikelihoods(model, tokenizer, questions: Sequence, batch_size: int = 16, format: str = "cloze",
                          subject: str | None = None) -> list[list[float]]:
    """``ℓ_i`` for every choice of every question."""
    _check(list(questions))
    return score_requests(model, tokenizer, build_requests(tokenizer, questions, format, subject), batch_size)


def accuracy(model, tokenizer, questions: Sequence, normalize: bool = False, batch_size: int = 16,
             format: str = "cloze") -> float:
    """``acc`` (or ``acc_norm``) of :func:`evaluate_multiple_choice`."""
    result = evaluate_multiple_choice(model, tokenizer, questions, format=format, batch_size=batch_size,
                                      progress=False)
    return result["acc_norm" if normalize else "acc"]
