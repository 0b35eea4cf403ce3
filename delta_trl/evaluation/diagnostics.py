"""Diagnostics of task vectors, as in the paper (Sommariva et al., ICML 2026, arXiv 2605.18993; how to read
them: docs/MERGING.md §3). Each returns a JSON-ready dict and, given ``output_dir``, writes
``<name>.json`` and ``<name>.png`` there (figures: :mod:`delta_trl.evaluation.plots`).

- :func:`disentanglement_error`: ξ(α1, α2) of Ortiz-Jimenez et al. (https://huggingface.co/papers/2305.12827)::

      ξ(α1, α2) = Σ_{t∈{1,2}} E_{x∼D_t}[ 1( argmax f(x; θ0 + α_t·τ_t) ≠ argmax f(x; θ0 + α1·τ1 + α2·τ2) ) ]

  0 everywhere means adding the other task's vector never changes a prediction (weight disentanglement).
- :func:`alpha_sweep_report`: normalized accuracy against α from :func:`delta_trl.evaluation.selection.select_alpha`.
- :func:`negation_report`: target and control accuracy of ``θ0 − α·τ`` against α, from
  :func:`delta_trl.evaluation.selection.select_negation_alpha`.
- :func:`linearization_error`: for one adapter, over α::

      E‖z(x; α) − f_lin(x; α·τ)‖² / E‖z(x; α) − f(x; θ0)‖²,   z(x; α) = f(x; θ0 + α·τ)

  on the logits (non-padded positions); 0 means the fine-tuned network is exactly linear along its task vector.
- :func:`dpo_front`: helpfulness and verbosity scores of greedy responses of ``θ0 + τ_help + λ2·τ_verb`` as λ2 varies,
  with preference accuracy (implicit reward margin ``[log π(y_w|x) − log π_0(y_w|x)] − [log π(y_l|x) − log π_0(y_l|x)]
  > 0``, π_0 = θ0 = the DPO reference) per objective and the mean response length.
- :func:`coefficient_front`: the scores of ``θ0 + τ_1 + λ·τ_2`` on both tasks as λ varies (the front between two
  objectives, e.g. helpfulness against verbosity, measured by any task score).
- :func:`logp_preference_accuracy`: on tokenized preference pairs, the fraction with ``log π(y_w|x) > log π(y_l|x)``
  (sums over the completion tokens) at ``θ0 + Σ α_t τ_t``. Unlike DPO's reward accuracy it is meaningful for the base
  model itself, where every implicit reward margin is 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from delta_trl._utils import write_json
from delta_trl.core.linearize import linearized_forward
from delta_trl.core.losses import IGNORE_INDEX, completion_logps
from delta_trl.evaluation import plots
from delta_trl.evaluation.scoring import ClassificationSet, class_scores, class_scores_many, merged_logits
from delta_trl.evaluation.selection import AlphaSelection, NegationSelection
from delta_trl.evaluation.task_scores import greedy_token_ids


Predict = Callable[[Mapping[str, float], str], torch.Tensor]
TextScore = Callable[[list[str], list[str]], float]


def _write(result: dict[str, Any], output_dir: str | os.PathLike | None, name: str, plot: Callable) -> dict[str, Any]:
    if output_dir is not None:
        write_json(Path(output_dir) / f"{name}.json", result)
        plot(result, Path(output_dir) / f"{name}.png")
    return result


def _point_key(factors: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((name, float(alpha)) for name, alpha in factors.items() if float(alpha) != 0.0))


def classification_predictor(
    model: torch.nn.Module,
    tokenizer: Any,
    datasets: Mapping[str, ClassificationSet],
    *,
    linearized: bool = False,
    batch_size: int = 16,
    points: Sequence[Mapping[str, float]] = (),
) -> Predict:
    """``predict(factors, task)``: predicted classes on ``datasets[task]`` of the model at ``θ0 + Σ α_t τ_t``.

    The ``points`` known in advance (e.g. :func:`disentanglement_points`) are scored together, one pass per task
    (:func:`~delta_trl.evaluation.scoring.class_scores_many`: one JVP per adapter and batch on the linearized model);
    any other point is scored when asked for.
    """
    known: dict[tuple, torch.Tensor] = {}
    if points:
        for task, data in datasets.items():
            scores = class_scores_many(model, tokenizer, data, points, linearized=linearized, batch_size=batch_size)
            for factors, score in zip(points, scores, strict=True):
                known[(_point_key(factors), task)] = score.argmax(dim=-1)

    def predict(factors: Mapping[str, float], task: str) -> torch.Tensor:
        hit = known.get((_point_key(factors), task))
        if hit is not None:
            return hit
        scores = class_scores(model, tokenizer, datasets[task], factors, linearized=linearized, batch_size=batch_size)
        return scores.argmax(dim=-1)

    return predict


def disentanglement_points(
    tasks: tuple[str, str], alphas_1: Sequence[float], alphas_2: Sequence[float] | None = None
) -> list[dict[str, float]]:
    """Every point :func:`disentanglement_error` scores: each task alone on its grid, and every pair."""
    alphas_2 = list(alphas_1 if alphas_2 is None else alphas_2)
    t1, t2 = tasks
    singles = [{t1: a} for a in sorted(set(alphas_1))] + [{t2: a} for a in sorted(set(alphas_2))]
    return singles + [{t1: a1, t2: a2} for a1 in alphas_1 for a2 in alphas_2]


def disentanglement_error(
    predict: Predict,
    tasks: tuple[str, str],
    alphas_1: Sequence[float],
    alphas_2: Sequence[float] | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """ξ(α1, α2) on a grid (module docstring); ``xi[i][j]`` is at ``(alphas_1[i], alphas_2[j])``.

    Args:
        predict: ``(factors, task) ↦ predicted classes on task's data`` (see :func:`classification_predictor`); the
            task names are also the adapter names.
        tasks: the two task (adapter) names.
        alphas_1, alphas_2: the grids (``alphas_2`` defaults to ``alphas_1``), e.g. ``linspace(-3, 3, 13)``.
    """
    alphas_2 = list(alphas_1 if alphas_2 is None else alphas_2)
    alphas_1 = list(alphas_1)
    if not alphas_1 or not alphas_2:
        raise ValueError("The α grids must not be empty.")
    t1, t2 = tasks
    # One forward pass per single-task point, reused across the other axis.
    alone = {
        (task, a): predict({task: a}, task)
        for task, grid in ((t1, alphas_1), (t2, alphas_2))
        for a in sorted(set(grid))
    }
    xi = []
    for a1 in alphas_1:
        row = []
        for a2 in alphas_2:
            both = {t1: a1, t2: a2}
            error = sum(float((predict(both, t) != alone[(t, both[t])]).double().mean()) for t in (t1, t2))
            row.append(error)
        xi.append(row)
    result = {"tasks": [t1, t2], "alphas_1": alphas_1, "alphas_2": alphas_2, "xi": xi}
    return _write(result, output_dir, "disentanglement_error", plots.plot_disentanglement)


def alpha_sweep_report(selection: AlphaSelection, *, output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The α-selection table as JSON and a normalized-accuracy-vs-α figure."""
    return _write(selection.to_dict(), output_dir, "alpha_sweep", plots.plot_alpha_sweep)


def negation_report(selection: NegationSelection, *, output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The negation table as JSON and a target/control-accuracy-vs-α figure with the control floor."""
    return _write(selection.to_dict(), output_dir, "negation", plots.plot_negation)


def _position_mask(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """Which logits positions count: decoder positions with a label for seq2seq, attended tokens otherwise."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if getattr(base.config, "is_encoder_decoder", False):
        labels = batch.get("labels")
        return torch.ones(logits.shape[:2], dtype=torch.bool) if labels is None else labels != -100
    mask = batch.get("attention_mask")
    return torch.ones(logits.shape[:2], dtype=torch.bool) if mask is None else mask.bool()


@torch.no_grad()
def linearization_error(
    model: PeftModel,
    batches: Iterable[Mapping[str, torch.Tensor]],
    adapter_name: str,
    alphas: Sequence[float],
    *,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Relative linearization error of ``adapter_name`` along α (module docstring), other adapters at 0.

    ``f_lin`` and ``f(θ0)`` come from one JVP per batch (:func:`delta_trl.core.linearize.linearized_forward`); ``z`` from
    a forward at each α. At α = 0 (0/0) the error is ``None``.
    """
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise ValueError("The α grid is empty.")
    numerator = [0.0] * len(alphas)
    denominator = [0.0] * len(alphas)
    for batch in batches:
        lin = linearized_forward(model, batch, adapter_name)
        mask = _position_mask(model, batch, lin.base_logits).unsqueeze(-1)  # (B, T, 1)
        for i, alpha in enumerate(alphas):
            z = merged_logits(model, batch, {adapter_name: alpha}).float()
            numerator[i] += float(((z - lin.logits(alpha).float()) * mask).pow(2).sum())
            denominator[i] += float(((z - lin.base_logits.float()) * mask).pow(2).sum())
    # At α = 0 both terms are 0 up to kernel round-off (the JVP runs SDPA's MATH kernel), so the ratio is undefined.
    relative = [n / d if d > 0 and a != 0.0 else None for a, n, d in zip(alphas, numerator, denominator, strict=True)]
    result = {
        "adapter": adapter_name,
        "alphas": alphas,
        "relative_error": relative,
        "numerator": numerator,
        "denominator": denominator,
    }
    return _write(result, output_dir, "linearization_error", plots.plot_linearization_error)


@dataclass(frozen=True)
class PreferenceSet:
    """Held-out preference pairs of one objective: the chosen response is preferred to the rejected one."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]

    def __post_init__(self) -> None:
        if not self.prompts or not len(self.prompts) == len(self.chosen) == len(self.rejected):
            raise ValueError("A preference set needs the same (non-zero) number of prompts, chosen and rejected.")


def completion_logp(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    completion: str,
    factors: Mapping[str, float],
    linearized: bool = False,
) -> float:
    """``log π(completion | prompt) = Σ_k log p(y_k | x, y_<k)`` of a causal LM at ``θ0 + Σ α_t τ_t``."""
    x = tokenizer(prompt)["input_ids"]
    y = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([x + y])
    logits = merged_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, factors, linearized)
    return float(completion_logps(logits, torch.tensor([[IGNORE_INDEX] * len(x) + y]))[0])


def preference_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: PreferenceSet,
    factors: Mapping[str, float],
    linearized: bool = False,
) -> float:
    """Fraction of pairs with implicit-reward margin > 0 (module docstring); the reference is θ0 (all factors 0)."""
    wins = 0
    for prompt, chosen, rejected in zip(pairs.prompts, pairs.chosen, pairs.rejected, strict=True):

        def reward(y: str, prompt: str = prompt) -> float:
            return completion_logp(model, tokenizer, prompt, y, factors, linearized) - completion_logp(
                model, tokenizer, prompt, y, {}, linearized
            )

        wins += reward(chosen) - reward(rejected) > 0
    return wins / len(pairs.prompts)


@torch.no_grad()
def logp_preference_accuracy(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    factors: Mapping[str, float],
    *,
    linearized: bool = False,
) -> dict[str, float | int]:
    """How often the chosen completion is more likely than the rejected one, for the model at ``θ0 + Σ α_t τ_t``.

    Args:
        batches: preference batches as TRL's DPO collator makes them: ``input_ids``, ``attention_mask`` and
            ``completion_mask`` (1 on completion tokens), the chosen sequences in the first half of the rows and the
            rejected ones, in the same order, in the second half.
        factors: ``{adapter: α}``; ``{}`` (or all 0) is the base model.

    Returns:
        ``accuracy``: the fraction of pairs with ``log π(y_w|x) > log π(y_l|x)`` (each a sum over its completion
        tokens; a tie counts as not preferred), ``mean_margin``: the mean of ``log π(y_w|x) − log π(y_l|x)``, and
        ``pairs``.
    """
    wins, margin, pairs = 0, 0.0, 0
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = merged_logits(model, inputs, factors, linearized)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
        chosen, rejected = completion_logps(logits, labels).double().chunk(2)
        wins += int((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        pairs += chosen.numel()
    if pairs == 0:
        raise ValueError("No preference pairs to score.")
    return {"accuracy": wins / pairs, "mean_margin": margin / pairs, "pairs": pairs}


def greedy_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    factors: Mapping[str, float],
    *,
    linearized: bool = False,
    max_new_tokens: int = 32,
) -> tuple[list[str], list[int]]:
    """Greedy decoding at ``θ0 + Σ α_t τ_t`` (:func:`delta_trl.evaluation.task_scores.greedy_token_ids`, which
    decodes the linearized model through the same code); returns the responses and their lengths in tokens."""
    ids = greedy_token_ids(model, tokenizer, prompts, factors, linearized=linearized, max_new_tokens=max_new_tokens)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids], [len(t) for t in ids]


def dpo_front(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    help_adapter: str,
    verb_adapter: str,
    lambdas: Sequence[float],
    prompts: Sequence[str],
    helpfulness_score: TextScore,
    verbosity_score: TextScore,
    preference_sets: Mapping[str, PreferenceSet],
    linearized: bool = False,
    max_new_tokens: int = 32,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Reward front of ``θ0 + τ_help + λ2·τ_verb`` (module docstring).

    Args:
        helpfulness_score, verbosity_score: ``(prompts, responses) ↦ float`` (a reward model, a judge, a length
            statistic…), applied to the greedy responses at each λ2.
        preference_sets: held-out pairs per objective, e.g. ``{"helpfulness": …, "verbosity": …}``.
    """
    lambdas = [float(v) for v in lambdas]
    if not lambdas or not prompts:
        raise ValueError("dpo_front needs at least one λ2 and one prompt.")
    result: dict[str, Any] = {
        "help_adapter": help_adapter,
        "verb_adapter": verb_adapter,
        "lambdas": lambdas,
        "helpfulness": [],
        "verbosity": [],
        "mean_response_length": [],
        "preference_accuracy": {name: [] for name in preference_sets},
    }
    for lam in lambdas:
        factors = {help_adapter: 1.0, verb_adapter: lam}
        responses, lengths = greedy_responses(
            model, tokenizer, prompts, factors, linearized=linearized, max_new_tokens=max_new_tokens
        )
        result["helpfulness"].append(float(helpfulness_score(list(prompts), responses)))
        result["verbosity"].append(float(verbosity_score(list(prompts), responses)))
        result["mean_response_length"].append(sum(lengths) / len(lengths))
        for name, pairs in preference_sets.items():
            result["preference_accuracy"][name].append(
                preference_accuracy(model, tokenizer, pairs, factors, linearized)
            )
    return _write(result, output_dir, "dpo_front", plots.plot_dpo_front)


def coefficient_front(
    evaluate: Callable[[Mapping[str, float]], Mapping[str, Mapping[str, float]]],
    tasks: tuple[str, str],
    coefficients: Sequence[float],
    *,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Scores of ``θ0 + τ_1 + λ·τ_2`` for each λ in ``coefficients``.

    Args:
        evaluate: ``factors ↦ {task: {"score": …, optional other statistics}}`` for the model at ``θ0 + Σ α_t τ_t``.
        tasks: the two task (adapter) names; the first keeps coefficient 1.

    Returns:
        ``{"first", "second", "coefficients", "<statistic>": {task: [value per λ]}}`` for every statistic returned.
    """
    coefficients = [float(c) for c in coefficients]
    if not coefficients:
        raise ValueError("coefficient_front needs at least one coefficient.")
    first, second = tasks
    points = [evaluate({first: 1.0, second: lam}) for lam in coefficients]
    result: dict[str, Any] = {"first": first, "second": second, "coefficients": coefficients}
    for statistic in points[0][first]:
        result[statistic] = {t: [float(p[t][statistic]) for p in points] for t in tasks}
    return _write(result, output_dir, "coefficient_front", plots.plot_coefficient_front)
