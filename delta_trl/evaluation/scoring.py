"""Scoring a model at ``θ0 + Σ_t α_t·τ_t`` on labelled classification data, without re-merging for each α.

All task adapters are loaded side by side on one base model (:func:`load_task_adapters`) and every point of the
merge is reached by scaling their LoRA scalings (:func:`delta_trl.core.adapters.scaled_adapters`): ``{t: α_t}`` gives
exactly the model the concatenated merged adapter of :mod:`delta_trl.merging.merge` would give. Adapters trained in the
``linear`` mode (``delta_trl.json`` with ``"evaluate_linearized": true``) are evaluated on the linearized model::

    f_lin(x; Σ_t α_t·τ_t) = f(x; θ0) + Σ_t α_t·J f(x; θ0)·τ_t      (one JVP per adapter and batch)

Three kinds of classifier are supported: generative with label words (causal LM: ``log p(word | text)`` summed over
the word's tokens; seq2seq: the same on the decoder), and sequence classification heads (``label_words=None``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from delta_trl._utils import read_delta_trl_metadata
from delta_trl.core.adapters import check_linear_lora, lora_layers, scaled_adapters
from delta_trl.core.linearize import linearized_forward, logits_on_rows
from delta_trl.data import read_records
from delta_trl.evaluation.metrics import class_accuracy


Metric = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class ClassificationSet:
    """A labelled split of one task.

    Attributes:
        texts: inputs (for generative classification, the prompt the label word follows).
        labels: class index per text.
        label_words: the verbaliser, one string per class (include a leading space if the tokenizer needs it), or
            ``None`` for a sequence-classification model whose logits are the class scores.
        add_special_tokens: tokenize the texts with the tokenizer's special tokens (BOS...). ``False`` for texts
            already rendered by a chat template, which carries its own, as TRL tokenizes conversational rows.
    """

    texts: list[str]
    labels: list[int]
    label_words: list[str] | None = None
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not self.texts:
            raise ValueError("The evaluation set is empty.")
        if self.labels is None or len(self.labels) != len(self.texts):
            raise ValueError(
                f"The evaluation set needs one label per text (got {len(self.texts)} texts and "
                f"{0 if self.labels is None else len(self.labels)} labels); α selection needs a labelled split."
            )
        if self.label_words is not None:
            bad = [label for label in self.labels if not 0 <= label < len(self.label_words)]
            if bad:
                raise ValueError(f"Labels {sorted(set(bad))[:5]} are not indices of label_words {self.label_words}.")


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose highest score is the label: ``mean(argmax_c scores[n, c] == labels[n])``, computed by
    the shipped ``task_accuracy`` metric of 🤗 ``evaluate``."""
    return class_accuracy(scores.argmax(dim=-1).cpu().tolist(), labels.cpu().tolist())


def load_classification_file(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    label_words: Sequence[str] | None = None,
    *,
    label_prefix: str = "",
    head: bool = False,
) -> ClassificationSet:
    """Read a ``.jsonl``, ``.json`` (list of records) or ``.csv`` file into a :class:`ClassificationSet`.

    Args:
        label_words: the verbaliser in class order; labels in the file may be these words or class indices. If
            ``None`` and every label is a word, the sorted distinct labels of the file become the verbaliser.
        label_prefix: prepended to every label word before scoring (e.g. ``" "`` for byte-level BPE tokenizers).
        head: labels are class indices of a sequence-classification head (no verbaliser).
    """
    rows = read_records(path)
    missing = {c for c in (text_column, label_column) for row in rows if c not in row or row[c] in (None, "")}
    if missing:
        raise ValueError(
            f"{str(path)!r} has rows without the column(s) {sorted(missing)}; α selection needs a text and a label "
            "per row (set --text-column/--label-column)."
        )
    texts = [str(row[text_column]) for row in rows]
    raw = [row[label_column] for row in rows]
    if head:
        return ClassificationSet(texts, [_label_index(v, None) for v in raw], None)
    if label_words is None:
        if any(_is_index(v) for v in raw):
            raise ValueError(
                f"{str(path)!r} has integer labels: give the label words in class order (generative "
                "classification) or use a sequence-classification head (head=True / --head)."
            )
        label_words = sorted({str(v) for v in raw})
    labels = [_label_index(v, label_words) for v in raw]
    return ClassificationSet(texts, labels, [label_prefix + w for w in label_words])


def _is_index(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())


def _label_index(value: Any, label_words: Sequence[str] | None) -> int:
    if label_words is not None and str(value) in label_words:
        return list(label_words).index(str(value))
    if not _is_index(value):
        raise ValueError(f"Label {value!r} is neither a class index nor one of the label words {label_words}.")
    return int(value)


def load_task_adapters(
    base_model: torch.nn.Module, adapters: Mapping[str, str | os.PathLike]
) -> tuple[PeftModel, bool]:
    """Load every adapter onto ``base_model`` under its task name, all active; say whether to evaluate linearized.

    Returns:
        The ``PeftModel`` and ``True`` when every adapter's ``delta_trl.json`` has ``"evaluate_linearized": true``.

    Raises:
        ValueError: no adapters, a non-linear LoRA variant, or a mix of linearized and non-linearized adapters
            (their sum is neither model).
    """
    if not adapters:
        raise ValueError("Give at least one task adapter.")
    names = list(adapters)
    flags = {
        name: bool(read_delta_trl_metadata(path).get("evaluate_linearized", False)) for name, path in adapters.items()
    }
    if len(set(flags.values())) > 1:
        raise ValueError(
            f"Some adapters must be evaluated linearized and some not ({flags}); merge adapters of one training mode."
        )
    model = PeftModel.from_pretrained(base_model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.base_model.set_adapter(names)
    for name in names:
        check_linear_lora(model, name)
    model.eval()
    return model, flags[names[0]]


def all_factors(model: torch.nn.Module, factors: Mapping[str, float]) -> dict[str, float]:
    """``factors`` completed with 0 for every other adapter of the model (so the model is ``θ0 + Σ α_t τ_t``)."""
    names = {name for layer in lora_layers(model) for name in layer.scaling}
    unknown = set(factors) - names
    if unknown:
        raise ValueError(f"The model has no adapter(s) {sorted(unknown)}; it has {sorted(names)}.")
    return {name: float(factors.get(name, 0.0)) for name in names}


@torch.no_grad()
def merged_logits(
    model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], factors: Mapping[str, float], linearized: bool = False
) -> torch.Tensor:
    """Logits of ``θ0 + Σ_t α_t·τ_t`` (or of its linearization) on one batch."""
    return merged_logits_many(model, inputs, [factors], linearized)[0]


def _generative_batch(
    tokenizer: Any,
    texts: Sequence[str],
    words: Sequence[str],
    is_encoder_decoder: bool,
    model: torch.nn.Module,
    add_special_tokens: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Inputs scoring every (text, word) pair; the target ids and their mask, aligned with the logits."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    if any(not ids for ids in word_ids):
        raise ValueError(f"A label word tokenizes to nothing: {list(words)}.")
    text_ids = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    pairs = [(t, w) for t in text_ids for w in word_ids]
    if is_encoder_decoder:
        enc = pad_rows([t for t, _ in pairs], pad)
        width = max(len(w) for _, w in pairs)
        labels = torch.tensor([w + [-100] * (width - len(w)) for _, w in pairs])
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        inputs = {"input_ids": enc, "attention_mask": (enc != pad).long(), "decoder_input_ids": decoder_input_ids}
        return inputs, labels.clamp(min=0), labels != -100
    # Causal LM: token i is predicted by position i - 1; right padding keeps positions of the text unchanged.
    seqs = [t + w for t, w in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    target = torch.zeros_like(ids)
    target_mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, (t, w) in enumerate(pairs):
        target[row, len(t) - 1 : len(t) - 1 + len(w)] = torch.tensor(w)
        target_mask[row, len(t) - 1 : len(t) - 1 + len(w)] = True
    return {"input_ids": ids, "attention_mask": mask}, target, target_mask


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Token id rows right-padded with ``pad`` to the longest, as one ``(N, T)`` tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows])


def _single_token_batch(
    tokenizer: Any,
    texts: Sequence[str],
    word_ids: Sequence[Sequence[int]],
    is_encoder_decoder: bool,
    model: torch.nn.Module,
    add_special_tokens: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """When every label word is one token, one sequence per text scores all of them: the inputs and the position
    (one per row) whose next-token distribution holds ``log p(word | text)``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    text_ids = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    if is_encoder_decoder:
        enc = pad_rows(text_ids, pad)
        start = model.prepare_decoder_input_ids_from_labels(labels=torch.tensor([[word_ids[0][0]]] * len(texts)))
        inputs = {"input_ids": enc, "attention_mask": (enc != pad).long(), "decoder_input_ids": start}
        return inputs, torch.ones(len(texts), 1, dtype=torch.bool)
    ids = pad_rows(text_ids, pad)
    mask = torch.tensor([[1] * len(t) + [0] * (ids.shape[1] - len(t)) for t in text_ids])
    position = torch.zeros_like(ids, dtype=torch.bool)
    for row, t in enumerate(text_ids):
        position[row, len(t) - 1] = True
    return {"input_ids": ids, "attention_mask": mask}, position


@torch.no_grad()
def merged_logits_many(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    factor_sets: Sequence[Mapping[str, float]],
    linearized: bool = False,
    positions: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """:func:`merged_logits` for several points ``θ0 + Σ_t α_t·τ_t`` of one batch, optionally only at ``positions``
    (a boolean mask over the batch's positions: ``(N, V)`` logits instead of ``(B, T, V)``).

    On the linearized model the logits are affine in the factors, ``f(θ0) + Σ_t α_t·J·τ_t``, so one JVP per adapter
    serves every point; otherwise each point is one forward.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    # the LM head runs on the scored positions only: (N, H) -> (N, V) instead of a (B, T, V) tensor per point
    rows = contextlib.nullcontext() if positions is None else logits_on_rows(base, positions.to(device))

    def forward(factors: Mapping[str, float]) -> torch.Tensor:
        with scaled_adapters(model, all_factors(model, factors)):
            return model(**inputs).logits

    if not linearized:
        with rows:
            return [forward(factors) for factors in factor_sets]
    # Each point as Σ_k c_k·J·(Σ_{t∈S_k} τ_t): a point with one coefficient on all its adapters (α·Σ_t τ_t) needs one
    # JVP along their sum, whatever their number; any other point one JVP per adapter.
    terms = [_tangent_terms(all_factors(model, factors)) for factors in factor_sets]
    directions = sorted({group for point in terms for group, _ in point})
    tangents: dict[tuple[str, ...], torch.Tensor] = {}
    primal = None
    with torch.no_grad(), rows:
        for group in directions:
            out = linearized_forward(model, inputs, list(group), differentiable=False)
            primal, tangents[group] = out.base_logits, out.tangent_logits
        if primal is None:  # every factor is 0: the base model
            primal = forward({})
    result = []
    for point in terms:
        logits = primal.clone()
        for group, coefficient in point:
            logits += coefficient * tangents[group]
        result.append(logits)
    return result


def _tangent_terms(factors: Mapping[str, float]) -> list[tuple[tuple[str, ...], float]]:
    """``[(adapters, c)]`` with ``Σ_t α_t τ_t = Σ c·Σ_{t ∈ adapters} τ_t``: one group when the nonzero α_t are equal."""
    nonzero = {name: alpha for name, alpha in factors.items() if alpha != 0.0}
    if len(set(nonzero.values())) == 1:
        return [(tuple(sorted(nonzero)), next(iter(nonzero.values())))]
    return [((name,), alpha) for name, alpha in sorted(nonzero.items())]


def class_scores_many(
    model: torch.nn.Module,
    tokenizer: Any,
    data: ClassificationSet,
    factor_sets: Sequence[Mapping[str, float]],
    *,
    linearized: bool = False,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """:func:`class_scores` at several points ``θ0 + Σ_t α_t·τ_t`` (one JVP per adapter and batch for all of them
    on the linearized model), one ``(N, C)`` tensor per entry of ``factor_sets``."""
    config = model.get_base_model().config if isinstance(model, PeftModel) else model.config
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    chunks: list[list[torch.Tensor]] = [[] for _ in factor_sets]
    words = data.label_words or []
    word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    # one-token label words (the common case) need one sequence per text instead of one per (text, word) pair
    single_token = bool(words) and all(len(ids) == 1 for ids in word_ids)
    candidates = torch.tensor([ids[0] for ids in word_ids]) if single_token else None
    for start in range(0, len(data.texts), batch_size):
        texts = data.texts[start : start + batch_size]
        if data.label_words is None:
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            for i, logits in enumerate(merged_logits_many(model, dict(enc), factor_sets, linearized)):
                chunks[i].append(logits.float())
            continue
        if single_token:
            inputs, position = _single_token_batch(
                tokenizer, texts, word_ids, is_encoder_decoder, base, data.add_special_tokens
            )
            for i, logits in enumerate(merged_logits_many(model, inputs, factor_sets, linearized, positions=position)):
                chunks[i].append(logits.float().log_softmax(dim=-1)[:, candidates].cpu())
            continue
        inputs, target, target_mask = _generative_batch(
            tokenizer, texts, data.label_words, is_encoder_decoder, base, data.add_special_tokens
        )
        # only the label-word positions are scored: log-softmax over the vocabulary there and nowhere else
        rows = merged_logits_many(model, inputs, factor_sets, linearized, positions=target_mask)
        for i, logits in enumerate(rows):
            token = torch.zeros(target.shape, dtype=torch.float32)
            picked = logits.float().log_softmax(dim=-1).gather(-1, target[target_mask].to(logits.device)[:, None])
            token[target_mask] = picked.squeeze(-1).cpu()
            chunks[i].append(token.sum(dim=-1).view(len(texts), len(data.label_words)))
    return [torch.cat(c) for c in chunks]


def class_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    data: ClassificationSet,
    factors: Mapping[str, float],
    *,
    linearized: bool = False,
    batch_size: int = 16,
) -> torch.Tensor:
    """Class scores ``(N, C)`` of the model at ``θ0 + Σ_t α_t·τ_t``.

    Generative (``label_words`` set): ``score[n, c] = Σ_k log p(w_c,k | text_n, w_c,<k)``, the log-likelihood of label
    word ``c`` after text ``n``. Sequence classification: the model's logits.
    """
    return class_scores_many(model, tokenizer, data, [factors], linearized=linearized, batch_size=batch_size)[0]


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    datasets: Mapping[str, ClassificationSet],
    factors: Mapping[str, float],
    *,
    linearized: bool = False,
    metric: Metric = accuracy,
    batch_size: int = 16,
) -> dict[str, float]:
    """``metric(scores, labels)`` per task (default :func:`accuracy`) for the model at ``θ0 + Σ_t α_t·τ_t``."""
    return {
        task: metric(
            class_scores(model, tokenizer, data, factors, linearized=linearized, batch_size=batch_size),
            torch.tensor(data.labels),
        )
        for task, data in datasets.items()
    }
