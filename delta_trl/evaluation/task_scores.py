"""One score per task for the model at ``θ0 + Σ_t α_t·τ_t``: what the experiment runner selects α with and reports.

Three kinds of task, each with one number (higher is better) and, for preferences, a second statistic:

- **closed** (completions from a small set of candidates): accuracy of ``argmax_c log p(candidate_c | prompt)``
  (:func:`delta_trl.evaluation.scoring.class_scores`);
- **open** (free-form short answers): greedy decoding, then exact match after normalising case, whitespace and final
  punctuation (the shipped ``task_accuracy`` metric);
- **preference** (prompt, chosen, rejected): the DPO implicit reward of a completion is
  ``r(y) = β·(log π_θ(y|x) − log π_θ0(y|x))`` with the base model θ0 as reference; the score is the share of pairs
  with ``r(y_w) > r(y_l)``, a tie counting one half (so θ0 itself scores exactly 0.5), and ``mean_margin`` is the
  mean of ``r(y_w) − r(y_l)``.

Linearized adapters (``linear`` mode) are scored on the linearized model, through the same
:func:`~delta_trl.evaluation.scoring.merged_logits`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel

from delta_trl.core.losses import IGNORE_INDEX, completion_logps
from delta_trl.evaluation.metrics import exact_match
from delta_trl.evaluation.scoring import (
    ClassificationSet,
    accuracy,
    class_scores_many,
    merged_logits,
    merged_logits_many,
    pad_rows,
)


TASK_KINDS = ("closed", "open", "preference")


@dataclass
class TaskEvalSet:
    """Labelled rows of one task, ready to score.

    Attributes:
        kind: ``closed``, ``open`` or ``preference``.
        prompts: model inputs (the text the answer follows).
        answers: reference completions (``closed``/``open``).
        candidates: the closed answer set (``closed``), in a fixed order.
        chosen, rejected: completions of each pair (``preference``).
        add_special_tokens: tokenize prompts with the tokenizer's special tokens, as the trainers do.
    """

    kind: str
    prompts: list[str]
    answers: list[str] = field(default_factory=list)
    candidates: list[str] | None = None
    chosen: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    add_special_tokens: bool = True
    _reference_logps: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind must be one of {TASK_KINDS}, got {self.kind!r}.")
        if not self.prompts:
            raise ValueError("A task evaluation set needs at least one row.")
        if self.kind == "preference":
            if not len(self.prompts) == len(self.chosen) == len(self.rejected):
                raise ValueError("A preference set needs one chosen and one rejected completion per prompt.")
        elif len(self.answers) != len(self.prompts):
            raise ValueError("A completion set needs one answer per prompt.")
        if self.kind == "closed":
            if not self.candidates:
                raise ValueError("A closed-set task needs its candidates.")
            unknown = sorted(set(self.answers) - set(self.candidates))
            if unknown:
                raise ValueError(f"Answers {unknown[:5]} are not among the candidates {self.candidates}.")

    def classification(self) -> ClassificationSet:
        assert self.candidates is not None
        labels = [self.candidates.index(a) for a in self.answers]
        return ClassificationSet(self.prompts, labels, list(self.candidates), self.add_special_tokens)


def _is_encoder_decoder(model: torch.nn.Module) -> bool:
    config = model.get_base_model().config if isinstance(model, PeftModel) else model.config
    return bool(getattr(config, "is_encoder_decoder", False))


@torch.no_grad()
def greedy_token_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    factors: Mapping[str, float],
    *,
    linearized: bool = False,
    max_new_tokens: int = 16,
    add_special_tokens: bool = True,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy decoding at ``θ0 + Σ α_t τ_t`` (causal or encoder-decoder): the new token ids of each prompt, up to
    EOS (excluded).

    ``batch_size`` prompts at a time, right-padded, without a KV cache, so that the linearized model decodes through
    the same :func:`~delta_trl.evaluation.scoring.merged_logits_many` as the ordinary one (one JVP per step along
    ``Σ_t τ_t`` when the α_t are equal). Right padding leaves every real position's logits as they are unpadded (the
    padding comes after it, under a causal mask), so each row's next token is read at its own last position, where
    the LM head alone runs; rows leave the batch at EOS or ``max_new_tokens``.
    """
    seq2seq = _is_encoder_decoder(model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt_ids = [tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"] for prompt in prompts]
    out: list[list[int]] = [[] for _ in prompts]

    def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = pad_rows(rows, pad)
        lengths = torch.tensor([len(row) for row in rows])
        return ids, (torch.arange(ids.shape[1]) < lengths[:, None]).long()  # from lengths: pad may be a real token

    for start in range(0, len(prompts), batch_size):
        active = list(range(start, min(start + batch_size, len(prompts))))
        for _ in range(max_new_tokens):
            if not active:
                break
            if seq2seq:
                input_ids, attention_mask = right_padded([prompt_ids[i] for i in active])
                decoded = [[base.config.decoder_start_token_id, *out[i]] for i in active]
                decoder_input_ids, _ = right_padded(decoded)  # equal lengths: every row has decoded as many
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                          "decoder_input_ids": decoder_input_ids}  # fmt: skip
            else:
                decoded = [prompt_ids[i] + out[i] for i in active]
                input_ids, attention_mask = right_padded(decoded)
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            width = max(len(row) for row in decoded)
            last = torch.zeros((len(decoded), width), dtype=torch.bool)
            last[torch.arange(len(decoded)), torch.tensor([len(row) - 1 for row in decoded])] = True
            (logits,) = merged_logits_many(model, inputs, [factors], linearized, positions=last)
            still = []
            for i, token in zip(active, logits.argmax(-1).tolist(), strict=True):
                if token == eos:
                    continue
                out[i].append(token)
                if len(out[i]) < max_new_tokens:
                    still.append(i)
            active = still
    return out


def greedy_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    factors: Mapping[str, float],
    *,
    linearized: bool = False,
    max_new_tokens: int = 16,
    add_special_tokens: bool = True,
    batch_size: int = 16,
) -> list[str]:
    """The decoded text of :func:`greedy_token_ids`."""
    ids = greedy_token_ids(model, tokenizer, prompts, factors, linearized=linearized, max_new_tokens=max_new_tokens,
                           add_special_tokens=add_special_tokens, batch_size=batch_size)  # fmt: skip
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]


@torch.no_grad()
def sequence_logps(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    factors: Mapping[str, float],
    *,
    linearized: bool = False,
    batch_size: int = 8,
    add_special_tokens: bool = True,
) -> torch.Tensor:
    """``log π(completion_n | prompt_n) = Σ_k log p(y_k | x, y_<k)`` per row (causal LMs), shape ``(N,)`` float64."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, completion in zip(
            prompts[start : start + batch_size], completions[start : start + batch_size], strict=True
        ):
            x = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
            y = tokenizer(completion, add_special_tokens=False)["input_ids"]
            rows.append((x, y))
        width = max(len(x) + len(y) for x, y in rows)
        ids = torch.tensor([x + y + [pad] * (width - len(x) - len(y)) for x, y in rows])
        mask = torch.tensor([[1] * (len(x) + len(y)) + [0] * (width - len(x) - len(y)) for x, y in rows])
        labels = torch.tensor(
            [[IGNORE_INDEX] * len(x) + y + [IGNORE_INDEX] * (width - len(x) - len(y)) for x, y in rows]
        )
        logits = merged_logits(model, {"input_ids": ids, "attention_mask": mask}, factors, linearized)
        out.append(completion_logps(logits.float(), labels.to(logits.device)).double().cpu())
    return torch.cat(out)


def implicit_reward_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs with a positive reward margin, a tie (margin 0) counting one half."""
    return float(((margins > 0).double() + 0.5 * (margins == 0).double()).mean())


def score_task(
    model: torch.nn.Module,
    tokenizer: Any,
    data: TaskEvalSet,
    factors: Mapping[str, float],
    *,
    linearized: bool = False,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    beta: float = 0.1,
) -> dict[str, float]:
    """``{"score": …}`` of the model at ``θ0 + Σ_t α_t·τ_t`` on one task (module docstring), plus ``mean_margin`` for
    preference tasks."""
    if data.kind == "closed":
        return score_task_many(model, tokenizer, data, [factors], linearized=linearized, batch_size=batch_size)[0]
    if data.kind == "open":
        answers = greedy_answers(model, tokenizer, data.prompts, factors, linearized=linearized,
                                 max_new_tokens=max_new_tokens, add_special_tokens=data.add_special_tokens,
                                 batch_size=batch_size)  # fmt: skip
        return {"score": exact_match(answers, data.answers)}
    if _is_encoder_decoder(model):
        raise ValueError("Preference tasks are scored on causal language models only.")

    def logps(completions: list[str], at: Mapping[str, float]) -> torch.Tensor:
        return sequence_logps(model, tokenizer, data.prompts, completions, at, linearized=linearized,
                              batch_size=batch_size, add_special_tokens=data.add_special_tokens)  # fmt: skip

    # θ0's log-probabilities are the reference of every point: computed once per model and set
    key = ("reference", id(model))
    if key not in data._reference_logps:
        data._reference_logps[key] = torch.stack([logps(data.chosen, {}), logps(data.rejected, {})])
    reference = data._reference_logps[key]
    if not any(float(v) != 0.0 for v in factors.values()):
        margins = torch.zeros(len(data.prompts), dtype=torch.float64)
    else:
        policy = torch.stack([logps(data.chosen, factors), logps(data.rejected, factors)])
        rewards = beta * (policy - reference)
        margins = rewards[0] - rewards[1]
    return {"score": implicit_reward_accuracy(margins), "mean_margin": float(margins.mean())}


def score_task_many(
    model: torch.nn.Module,
    tokenizer: Any,
    data: TaskEvalSet,
    factor_sets: Sequence[Mapping[str, float]],
    *,
    linearized: bool = False,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    beta: float = 0.1,
) -> list[dict[str, float]]:
    """:func:`score_task` at several points ``θ0 + Σ_t α_t·τ_t``; a closed-set task is scored at all of them in one
    pass over its rows (:func:`~delta_trl.evaluation.scoring.class_scores_many`: one JVP per adapter and batch on
    the linearized model, whatever the number of points)."""
    if data.kind == "closed":
        split = data.classification()
        labels = torch.tensor(split.labels)
        scores = class_scores_many(model, tokenizer, split, factor_sets, linearized=linearized, batch_size=batch_size)
        return [{"score": accuracy(s, labels)} for s in scores]
    return [
        score_task(
            model,
            tokenizer,
            data,
            factors,
            linearized=linearized,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            beta=beta,
        )  # fmt: skip
        for factors in factor_sets
    ]
