"""Estimate K-FAC / EK-FAC factors of the base model's GGN at θ0 on a task-agnostic reference text set (docs/METHOD.md §4).

For each example ``n`` the model's final hidden states ``h_n`` (``T × H``; the decoder's for encoder-decoder models,
fed ``decoder_input_ids = shift_right(input_ids)``) are contracted with one seeded Gaussian probe ``v_n ~ N(0, I)``
and ``⟨h_n, v_n⟩`` is backpropagated. Since ``E_v[v vᵀ] = I``, the pseudo-gradient ``∇W_n = Σ_t g_t a_tᵀ`` of each
target layer satisfies ``E_v[vec ∇W_n vec ∇W_nᵀ] = J_nᵀ J_n``: its second moments estimate the GGN ``E_n[J_nᵀ J_n]``.
Per layer, with ``M`` real (non-padding) tokens over ``N`` examples::

    A = (1/M) Σ_{n,t} a_t a_tᵀ        G = (1/N) Σ_{n,t} g_t g_tᵀ          (pass 1)
    A = U_A Λ_A U_Aᵀ,  G = U_G Λ_G U_Gᵀ
    D = (1/N) Σ_n (U_Gᵀ ∇W_n U_A)²                                           (pass 2, EK-FAC only)

so ``A ⊗ G ≈ E_n[Σ_t a_t a_tᵀ ⊗ g_t g_tᵀ]`` is on the same per-example scale as ``D``. Padding never counts: tokens
are right-padded, masked out of every sum, and get no probe. Probes are seeded per example index, so the factors do
not depend on the batch size, the padding or the number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import LoraConfig
from tqdm.auto import tqdm

from delta_trl.core.fingerprint import FINGERPRINT_KEY, base_model_fingerprint
from delta_trl.core.linearize import at_theta0, checkpointing_off, hidden_states_of
from delta_trl.curvature.factors import (
    ESTIMATORS,
    CurvatureFactors,
    LayerCurvature,
    base_model_of,
    check_finite,
    linear_base_layer,
    resolve_target_modules,
)


logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32/bfloat16/float16`` from a dtype or a name (``fp32``, ``bf16``, ``fp16``, ``float32``…)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"Unsupported storage dtype {dtype!r}; choose one of {sorted(DTYPES)}.")


def reference_texts(reference: Any, text_column: str | None = None, num_samples: int | None = None) -> list[str]:
    """The first ``num_samples`` texts of a ``datasets.Dataset`` (column ``text_column``, else ``text``) or a list.

    Raises:
        ValueError: no text column, a non-string entry, an empty set, or fewer texts than ``num_samples``.
    """
    if isinstance(reference, str):
        raise ValueError("`reference` must be a datasets.Dataset or a list of strings, not a single string.")
    column_names = getattr(reference, "column_names", None)
    if column_names is not None:
        column = text_column or "text"
        if column not in column_names:
            raise ValueError(
                f"The reference dataset has no text column {column!r} (columns: {column_names}); "
                "pass text_column (--text-column)."
            )
        texts = (
            reference[column]
            if num_samples is None
            else reference.select(range(min(num_samples, len(reference))))[column]
        )
    else:
        texts = list(reference)
        texts = texts if num_samples is None else texts[:num_samples]
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")
    if not texts:
        raise ValueError("The reference set is empty: the curvature needs at least one text.")
    if num_samples is not None and len(texts) < num_samples:
        raise ValueError(f"num_samples={num_samples} but the reference set has only {len(texts)} texts.")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"Reference entry {bad} is a {type(texts[bad]).__name__}, not a string.")
    return list(texts)


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 over the texts, each length-prefixed (so ``["ab", "c"]`` and ``["a", "bc"]`` differ)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def example_probe(index: int, length: int, hidden: int, seed: int) -> torch.Tensor:
    """The Gaussian probe ``v_n`` (``length × hidden``) of example ``index``: depends on nothing but its arguments."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn((length, hidden), generator=generator)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    if _world()[1] > 1:
        for tensor in tensors:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


@contextlib.contextmanager
def _estimation_mode(model: torch.nn.Module) -> Iterator[None]:
    """θ0 exactly (eval mode, every LoRA adapter scaled to 0), activation checkpointing off (its recomputation would
    fire the hooks twice), grad on; all restored on exit."""
    with at_theta0(model), checkpointing_off(model), torch.enable_grad():
        yield


class _Recorder:
    """Forward hooks on the θ0 linear layers that keep each call's input and output for one batch."""

    def __init__(self, modules: dict[str, torch.nn.Linear]) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                # Frozen weights and inputs: make the output a leaf so ⟨h, v⟩ can be differentiated with respect to it.
                output = output.detach().requires_grad_(True)
            self.inputs[name].append(args[0].detach())
            self.outputs[name].append(output)
            return output

        return hook

    def clear(self) -> None:
        for name in self.inputs:
            self.inputs[name].clear()
            self.outputs[name].clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _batches(input_ids: list[list[int]], indices: list[int], batch_size: int, pad_id: int, device: torch.device):
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        width = max(1, max(len(input_ids[i]) for i in chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # right padding: causal models see the same real tokens as unpadded
            ids[row, : len(input_ids[i])] = torch.tensor(input_ids[i], dtype=torch.long)
            mask[row, : len(input_ids[i])] = 1
        yield chunk, ids.to(device), mask.to(device)


def _probe_objective(model, ids, mask, chunk, lengths, seed, is_encoder_decoder, keep_logits) -> torch.Tensor:
    """``Σ_n ⟨h_n, v_n⟩`` for one batch (padding positions get no probe)."""
    base = base_model_of(model)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True}
    if is_encoder_decoder:
        kwargs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=ids)
        kwargs["decoder_attention_mask"] = mask
    elif keep_logits:
        kwargs["logits_to_keep"] = 1  # the logits are not needed: skip most of the LM head
    outputs = base(**kwargs, return_dict=True)
    hidden = hidden_states_of(outputs, is_encoder_decoder)[-1]  # (B, T, H)
    probe = torch.zeros(hidden.shape, dtype=torch.float32)
    for row, i in enumerate(chunk):
        probe[row, : lengths[i]] = example_probe(i, lengths[i], hidden.shape[-1], seed)
    return (hidden.float() * probe.to(hidden.device)).sum()


def estimate_curvature(
    model: torch.nn.Module,
    tokenizer: Any,
    reference: Any,
    *,
    target_modules: LoraConfig | Sequence[str] | str | None = None,
    text_column: str | None = None,
    num_samples: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    estimator: str = "ekfac",
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    progress: bool = True,
) -> CurvatureFactors:
    """Estimate θ0's K-FAC / EK-FAC factors for the target linear modules on a reference text set.

    Every LoRA adapter of ``model`` is scaled to 0 during estimation (θ0 exactly); hooks sit on the ``nn.Linear``
    layers (a LoRA layer's ``base_layer``). With ``torch.distributed`` initialised and several processes (e.g. under
    ``accelerate launch`` or ``torchrun``), example ``n`` goes to rank ``n mod world_size`` and the sums are
    all-reduced, so every rank returns the same factors, equal to a single-process estimate up to summation order.

    Args:
        model: a transformers causal LM or encoder-decoder model, or a ``PeftModel`` (not wrapped in DDP).
        tokenizer: its tokenizer (needs a pad or eos token).
        reference: a ``datasets.Dataset`` with a text column, or a list of strings.
        target_modules: see :func:`delta_trl.curvature.factors.resolve_target_modules` (``None``: the LoRA layers).
        text_column: the dataset column with the texts (default ``text``).
        num_samples: how many reference texts to use, from the start (default: all).
        max_length: tokens per text (longer texts are truncated).
        batch_size: texts per forward/backward pass (per process).
        estimator: ``"ekfac"`` (two passes) or ``"kfac"`` (one pass).
        dtype: storage dtype of the factors (statistics are always accumulated in float64).
        seed: seeds the per-example probes.
        progress: show a tqdm bar (main process only).

    Returns:
        :class:`~delta_trl.curvature.factors.CurvatureFactors` whose ``metadata`` records how they were made.

    Raises:
        ValueError: bad reference data, unknown target modules, or non-finite statistics.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; choose one of {ESTIMATORS}.")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}.")
    out_dtype = storage_dtype(dtype)
    texts = reference_texts(reference, text_column, num_samples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an eos token to pad with.")
    names = resolve_target_modules(model, target_modules)
    base = base_model_of(model)
    all_modules = dict(base.named_modules())
    modules = {name: linear_base_layer(all_modules[name], name) for name in names}
    is_encoder_decoder = bool(getattr(base.config, "is_encoder_decoder", False))
    if is_encoder_decoder and not hasattr(base, "prepare_decoder_input_ids_from_labels"):
        raise ValueError(
            f"{type(base).__name__} cannot build decoder inputs (no prepare_decoder_input_ids_from_labels)."
        )
    keep_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
    device = next(base.parameters()).device

    input_ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    lengths = [len(ids) for ids in input_ids]
    rank, world = _world()
    # longest first within each rank: fewer padded positions per batch, and an early out-of-memory
    indices = sorted(range(rank, len(texts), world), key=lambda i: -lengths[i])
    num_batches = math.ceil(len(indices) / batch_size)

    sums = {name: {"A": torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device),
                   "G": torch.zeros(m.out_features, m.out_features, dtype=torch.float64, device=device)}
            for name, m in modules.items()}  # fmt: skip
    rotations: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def run_pass(description: str, accumulate) -> None:
        recorder = _Recorder(modules)
        try:
            bar = tqdm(total=num_batches, desc=description, disable=not progress or rank != 0)
            for chunk, ids, mask in _batches(input_ids, indices, batch_size, pad_id, device):
                objective = _probe_objective(model, ids, mask, chunk, lengths, seed, is_encoder_decoder, keep_logits)
                outputs = [o for name in names for o in recorder.outputs[name]]
                grads = iter(torch.autograd.grad(objective, outputs, allow_unused=True, materialize_grads=True))
                valid = mask.bool()
                for name in names:
                    for a, _ in zip(recorder.inputs[name], recorder.outputs[name], strict=True):
                        g = next(grads)
                        if a.shape[:2] != valid.shape:
                            raise ValueError(f"{name} sees inputs of shape {tuple(a.shape)}, not (batch, tokens, d).")
                        accumulate(name, a.float(), g.float(), valid)
                recorder.clear()
                bar.update(1)
            bar.close()
        finally:
            recorder.remove()

    def accumulate_kfac(name: str, a: torch.Tensor, g: torch.Tensor, valid: torch.Tensor) -> None:
        a, g = a[valid], g[valid]  # (tokens, d): padding dropped
        sums[name]["A"] += (a.T @ a).double()
        sums[name]["G"] += (g.T @ g).double()

    def accumulate_ekfac(name: str, a: torch.Tensor, g: torch.Tensor, valid: torch.Tensor) -> None:
        u_a, u_g = rotations[name]
        a_rot, g_rot = a @ u_a, (g * valid.unsqueeze(-1)) @ u_g  # (B, T, d_in), (B, T, d_out)
        # per-example pseudo-gradients U_Gᵀ ∇W_n U_A = Σ_t (U_Gᵀ g_t)(U_Aᵀ a_t)ᵀ, batched in chunks of ≤ 2^26 numbers
        chunk = max(1, (1 << 26) // (u_g.shape[0] * u_a.shape[0]))
        for start in range(0, a.shape[0], chunk):
            rotated = torch.bmm(g_rot[start : start + chunk].transpose(1, 2), a_rot[start : start + chunk])
            sums[name]["D"] += rotated.square().sum(0).double()

    with _estimation_mode(model):
        run_pass("curvature: A, G", accumulate_kfac)
        num_tokens, num_examples = sum(lengths), len(texts)
        _all_reduce([t for layer in sums.values() for t in layer.values()])
        if num_tokens == 0:
            raise ValueError("The reference texts tokenize to zero tokens.")
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for name in names:
            a_cov, g_cov = sums[name]["A"] / num_tokens, sums[name]["G"] / num_examples
            check_finite({f"{name} A": a_cov, f"{name} G": g_cov}, "curvature statistic")
            if estimator == "kfac":
                factors[name] = {"A": a_cov, "G": g_cov}
                continue
            lambda_a, u_a = torch.linalg.eigh(a_cov)
            lambda_g, u_g = torch.linalg.eigh(g_cov)
            rotations[name] = (u_a.float(), u_g.float())
            sums[name]["D"] = torch.zeros(u_g.shape[0], u_a.shape[0], dtype=torch.float64, device=device)
            factors[name] = {"U_A": u_a, "lambda_A": lambda_a, "U_G": u_g, "lambda_G": lambda_g}
        if estimator == "ekfac":
            run_pass("curvature: EK-FAC correction", accumulate_ekfac)
            _all_reduce([sums[name]["D"] for name in names])
            for name in names:
                factors[name]["D"] = sums[name]["D"] / num_examples
                check_finite({f"{name} D": factors[name]["D"]}, "curvature statistic")
    config = base.config
    metadata = {
        "estimator": estimator,
        "base_model": {
            "name_or_path": getattr(config, "_name_or_path", "") or "",
            "revision": getattr(config, "_commit_hash", None),
            "model_type": getattr(config, "model_type", None),
            FINGERPRINT_KEY: base_model_fingerprint(model),
        },
        "target_modules": names,
        "shapes": {name: [m.out_features, m.in_features] for name, m in modules.items()},
        "reference": {
            "texts_sha256": texts_fingerprint(texts),
            "dataset_fingerprint": getattr(reference, "_fingerprint", None),
            "text_column": text_column or ("text" if hasattr(reference, "column_names") else None),
        },
        "num_samples": num_examples,
        "num_tokens": num_tokens,
        "max_length": max_length,
        "seed": seed,
        "dtype": str(out_dtype).removeprefix("torch."),
        "world_size": world,
    }
    result = CurvatureFactors(
        layers={
            name: LayerCurvature(estimator, {k: t.to(device="cpu", dtype=out_dtype) for k, t in tensors.items()})
            for name, tensors in factors.items()
        },
        metadata=metadata,
    )
    for name, layer in result.layers.items():  # a bf16/fp16 cast can overflow
        check_finite({f"{name} {k}": t for k, t in layer.tensors.items()}, f"{metadata['dtype']} curvature factor")
    logger.info(
        "Curvature factors (%s samples, %s tokens):\n%s", num_examples, num_tokens, result.format_size_report()
    )
    return result
