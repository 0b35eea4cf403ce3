"""Configurations. The DELTA fields are defined once, in :class:`DeltaArguments`, and mixed into each trainer config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import Seq2SeqTrainingArguments
from trl import DPOConfig, SFTConfig

from delta_trl.core.losses import ALPHA_SAMPLINGS, DISTILL_NORMALIZATIONS


DELTA_MODES = ("delta", "nonlinear", "linear", "kd_only", "curvature_only")
MODES_WITH_TEACHER = ("delta", "kd_only")  # `curvature_only` trains the student alone
MODES_WITH_JVP = ("delta", "kd_only", "linear")
CURVATURE_ESTIMATORS = ("ekfac", "kfac")
TEACHER_TANGENTS = ("jvp", "fd")


@dataclass
class DeltaArguments:
    """The DELTA fields shared by :class:`DeltaConfig` and the DPO config (docs/METHOD.md §2-3)."""

    delta_mode: str = field(
        default="delta",
        metadata={
            "help": "What to train. `delta`: LoRA student + linearized teacher, distillation along the path; "
            "`nonlinear`: plain LoRA fine-tuning (identical to the parent trainer); `linear`: tangent-space "
            "fine-tuning of one adapter, evaluated linearized; `kd_only`: `delta` without the curvature penalty; "
            "`curvature_only`: the student's task loss plus the curvature penalty, no teacher.",
            "choices": list(DELTA_MODES),
        },
    )
    distill_weight: float = field(
        default=1.0, metadata={"help": "γ: weight of the hidden-state distillation loss L_KD."}
    )
    distill_normalization: str = field(
        default="relative",
        metadata={
            "help": "How L_KD measures the student-teacher distance per supervised position. `relative`: "
            "‖h_S − h_T‖² / ‖h_T‖², free of the hidden size and activation scale, so γ = 1 serves every model; "
            "`mean`: ‖h_S − h_T‖² / hidden size; `sum`: ‖h_S − h_T‖², the paper's formula (~10³ on SmolLM2-135M, "
            "γ must then be scaled per model).",
            "choices": list(DISTILL_NORMALIZATIONS),
        },
    )
    teacher_loss_weight: float = field(
        default=1.0, metadata={"help": "β_T: weight of the teacher's task loss on the linearized outputs."}
    )
    alpha_sampling: str = field(
        default="curriculum",
        metadata={
            "help": "How the interpolation coefficient α is drawn, once per optimizer step. `curriculum`: "
            "U[1-(1-alpha_min)·√p, 1+(alpha_max-1)·√p] with p the training progress; `uniform`: "
            "U[alpha_min, alpha_max]; `fixed`: α = 1 (along-path distillation off).",
            "choices": list(ALPHA_SAMPLINGS),
        },
    )
    alpha_min: float = field(default=0.5, metadata={"help": "Lower end of the α range."})
    alpha_max: float = field(default=2.0, metadata={"help": "Upper end of the α range."})
    task_loss_at_alpha: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the student's task loss at the sampled α (as the authors' code does). If False it is "
            "evaluated at α = 1, which costs one more student forward when α ≠ 1."
        },
    )
    distill_layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={
            "help": "Indices of the hidden states to distil (decoder's for encoder-decoder models); -1 is the last "
            "hidden state, before the LM head."
        },
    )
    teacher_adapter_name: str = field(
        default="delta_teacher",
        metadata={"help": "Name of the teacher LoRA adapter, created from the student's LoRA config."},
    )
    teacher_r: int | None = field(
        default=None, metadata={"help": "LoRA rank of the teacher adapter (default: the student's rank)."}
    )
    teacher_tangent: str = field(
        default="jvp",
        metadata={
            "help": "How the teacher's tangent J·τ_T is computed. `jvp`: exactly, forward-mode AD in one θ0 pass. "
            "`fd` (opt-in, cheaper): a one-sided finite difference (f(θ0 + ε·τ_T) − f(θ0))/ε with automatic "
            "ε = sqrt(fp32 eps)/ρ (ρ: the teacher's RMS relative size ‖s·B·A‖/‖W‖), two plain forwards instead of "
            "the JVP; ≈ 1e-3 relative error on the tangent, the gradient uses the exact θ0 Jacobian. fp32/fp64 "
            "only: refused with bf16/fp16, TF32 matmuls, DeepSpeed ZeRO-3 and FSDP, and outside delta/kd_only.",
            "choices": list(TEACHER_TANGENTS),
        },
    )
    teacher_every_k_steps: int = field(
        default=1,
        metadata={
            "help": "Run the teacher on one optimizer step in k (global steps 0, k, 2k, ...), the same decision for "
            "every micro-batch and process of a step. On a teacher step the loss is the full DELTA loss. On the other "
            "steps no teacher pass runs: the loss is the student's task loss (at α when task_loss_at_alpha) plus "
            "λ·R(τ_S), without distillation, teacher loss or R(τ_T), and the teacher's gradients are dropped, so "
            "the optimizer does not touch it (no momentum or weight-decay step). 1: every step (the default). "
            "Only for delta/kd_only; refused under DeepSpeed, whose engine steps every parameter."
        },
    )

    curvature_weight: float = field(
        default=0.0,
        metadata={
            "help": "λ: weight of the curvature penalty R(τ_S) + R(τ_T) (EK-FAC GGN of the base model; the authors "
            "used 500 for vision). 0 turns it off; > 0 needs `curvature_path`."
        },
    )
    curvature_path: str | None = field(
        default=None,
        metadata={
            "help": "Curvature cache: a folder (`~` expanded) or a Hub repo id (`delta-trl curvature` writes one). If "
            "it does not exist and `curvature_dataset` is set, it is estimated before the first step and saved there."
        },
    )
    curvature_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Reference text set for estimating the curvature: a json/jsonl/csv/txt file (`~` expanded) or a "
            "Hub id."
        },
    )
    curvature_text_column: str | None = field(
        default=None, metadata={"help": "Text column of `curvature_dataset` (default: `text`)."}
    )
    curvature_num_samples: int = field(
        default=10_000, metadata={"help": "Reference samples used to estimate the curvature (paper: 10^5 of C4)."}
    )
    curvature_max_length: int = field(default=512, metadata={"help": "Token length of each reference sample."})
    curvature_estimator: str = field(
        default="ekfac",
        metadata={"help": "`ekfac` (eigenvalue-corrected K-FAC) or `kfac`.", "choices": list(CURVATURE_ESTIMATORS)},
    )

    def validate_delta_fields(self) -> None:
        """Raise ``ValueError`` on a bad combination, before any work starts (and expand ``~`` in local paths)."""
        for name in ("curvature_path", "curvature_dataset"):  # local paths in YAML files; Hub ids never start so
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, str(Path(value).expanduser()))
        if self.delta_mode not in DELTA_MODES:
            raise ValueError(f"delta_mode={self.delta_mode!r} is not one of {DELTA_MODES}.")
        if self.alpha_sampling not in ALPHA_SAMPLINGS:
            raise ValueError(f"alpha_sampling={self.alpha_sampling!r} is not one of {ALPHA_SAMPLINGS}.")
        if self.distill_normalization not in DISTILL_NORMALIZATIONS:
            raise ValueError(
                f"distill_normalization={self.distill_normalization!r} is not one of {DISTILL_NORMALIZATIONS}."
            )
        if self.alpha_sampling != "fixed" and not self.alpha_min < self.alpha_max:
            raise ValueError(
                f"The α range [{self.alpha_min}, {self.alpha_max}] is empty or inverted: set alpha_min < alpha_max "
                "(or alpha_sampling='fixed')."
            )
        if self.alpha_sampling == "curriculum" and not self.alpha_min <= 1.0 <= self.alpha_max:
            raise ValueError(
                f"The curriculum widens the α range from {{1}}, so it must contain 1; got [{self.alpha_min}, "
                f"{self.alpha_max}]. Use alpha_sampling='uniform' for a range without 1."
            )
        for name in ("distill_weight", "teacher_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}.")
        if not self.distill_layers:
            raise ValueError("distill_layers needs at least one index (use [-1] for the last hidden state).")
        if not self.teacher_adapter_name:
            raise ValueError("teacher_adapter_name must be a non-empty string.")
        if self.teacher_r is not None and self.teacher_r < 1:
            raise ValueError(f"teacher_r must be a positive rank, got {self.teacher_r}.")
        if self.teacher_tangent not in TEACHER_TANGENTS:
            raise ValueError(f"teacher_tangent={self.teacher_tangent!r} is not one of {TEACHER_TANGENTS}.")
        if self.teacher_every_k_steps < 1:
            raise ValueError(f"teacher_every_k_steps must be ≥ 1, got {self.teacher_every_k_steps}.")
        cheaper = {"teacher_tangent": "jvp", "teacher_every_k_steps": 1}
        for name, default in cheaper.items():
            if getattr(self, name) != default and self.delta_mode not in MODES_WITH_TEACHER:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} only applies to the teacher of delta_mode='delta' or 'kd_only' "
                    f"(got delta_mode={self.delta_mode!r}); leave it at {default!r}."
                )
        check_cheaper_teacher_arguments(self)
        if self.curvature_weight < 0:
            raise ValueError(f"curvature_weight must be ≥ 0, got {self.curvature_weight}.")
        if self.curvature_estimator not in CURVATURE_ESTIMATORS:
            raise ValueError(f"curvature_estimator={self.curvature_estimator!r} is not one of {CURVATURE_ESTIMATORS}.")
        if self.delta_mode == "kd_only" and self.curvature_weight > 0:
            raise ValueError("delta_mode='kd_only' is DELTA without the curvature penalty: set curvature_weight=0 or "
                             "use delta_mode='delta'.")  # fmt: skip
        if self.delta_mode == "curvature_only" and self.curvature_weight == 0:
            raise ValueError("delta_mode='curvature_only' needs curvature_weight > 0.")
        if self.curvature_weight > 0 and self.delta_mode in ("nonlinear", "linear"):
            raise ValueError(
                f"delta_mode={self.delta_mode!r} has no curvature penalty; use 'delta' or 'curvature_only', or set "
                "curvature_weight=0."
            )
        if self.curvature_weight > 0 and not self.curvature_path:
            raise ValueError(
                "curvature_weight > 0 needs `curvature_path` (an existing cache, or where to save one estimated on "
                "`curvature_dataset`)."
            )


def deepspeed_zero_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of a ``TrainingArguments.deepspeed`` value (a dict or a JSON file), ``None`` when unset."""
    if not deepspeed:
        return None
    if isinstance(deepspeed, str):
        path = Path(deepspeed)
        if not path.is_file():  # the Trainer reports a missing file itself
            return None
        deepspeed = json.loads(path.read_text())
    stage = deepspeed.get("zero_optimization", {}).get("stage", 0) if isinstance(deepspeed, dict) else 0
    return int(stage) if str(stage).isdigit() else None


def check_cheaper_teacher_arguments(args: Any) -> None:
    """Refuse the opt-in cheaper teachers where they are wrong, at config build (before the parent's checks).

    ``teacher_tangent='fd'`` subtracts two forwards that differ by a relative weight change ≈ 3.5e-4: half of fp32's
    digits cancel, and bf16/fp16 (8/11 significant bits) or TF32 matmuls (10 bits) would leave none. ZeRO-3 and FSDP
    shard the weights the extra forwards read. ``teacher_every_k_steps > 1`` drops the teacher's gradients on skipped
    steps, which DeepSpeed's engine (it owns the gradients and steps every parameter) would not honour.
    """
    if getattr(args, "teacher_tangent", "jvp") == "fd":
        reduced = [name for name in ("bf16", "fp16") if getattr(args, name, False)]
        if getattr(args, "tf32", None) or torch.get_float32_matmul_precision() != "highest":
            reduced.append("tf32")
        if reduced:
            raise ValueError(
                f"teacher_tangent='fd' differences two forwards whose weights differ by ≈ 3.5e-4 relative, which "
                f"{'/'.join(reduced)} cannot resolve (torch float32 matmul precision: "
                f"{torch.get_float32_matmul_precision()!r}). Train in fp32 without TF32 (bf16=False, fp16=False, "
                "tf32=False, torch.backends.cuda.matmul.allow_tf32=False), or use teacher_tangent='jvp'."
            )
        if deepspeed_zero_stage(getattr(args, "deepspeed", None)) == 3 or getattr(args, "fsdp", None):
            raise ValueError(
                "teacher_tangent='fd' runs extra forwards on the unwrapped model, whose weights DeepSpeed ZeRO-3 and "
                "FSDP shard. Use DDP or ZeRO-1/2, or teacher_tangent='jvp' (which these shardings refuse as well)."
            )
    if getattr(args, "teacher_every_k_steps", 1) > 1 and getattr(args, "deepspeed", None):
        raise ValueError(
            "teacher_every_k_steps > 1 keeps the teacher out of the optimizer step on skipped steps by dropping its "
            "gradients, and DeepSpeed's engine steps every parameter from its own gradient buffers. Use DDP, or "
            "teacher_every_k_steps=1."
        )


def check_delta_training_arguments(args: Any) -> None:
    """Refuse Trainer switches the DELTA modes cannot honour (after the parent config's ``__post_init__``)."""
    if args.delta_mode == "nonlinear":
        return
    moving_alpha = args.delta_mode in MODES_WITH_TEACHER and args.alpha_sampling != "fixed"
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            f"use_liger_kernel fuses the LM head into the loss, so there are no logits for delta_mode="
            f"{args.delta_mode!r}'s own loss and linearized teacher; set use_liger_kernel=False."
        )
    if getattr(args, "torch_compile", False) and moving_alpha:
        raise ValueError(
            "torch_compile recompiles the model for every new α (the LoRA scale is a Python float it guards on), then "
            "falls back to eager. Set torch_compile=False, or alpha_sampling='fixed'."
        )
    if args.gradient_checkpointing and moving_alpha and not args.task_loss_at_alpha:
        raise ValueError(
            "task_loss_at_alpha=False runs the student at α = 1 and at the sampled α in one step, and gradient "
            "checkpointing would recompute both at one scale. Set task_loss_at_alpha=True or "
            "gradient_checkpointing=False."
        )


def fields_docstring(cls: type) -> str:
    """An HF-style ``Parameters:`` section generated from the fields' help, so docs and fields cannot drift."""
    lines = ["Parameters:"]
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        kind = getattr(f.type, "__name__", str(f.type))
        lines.append(f"    {f.name} (`{kind}`, *optional*, defaults to `{default!r}`):")
        lines.append(f"        {f.metadata['help']}")
    return "\n".join(lines)


@dataclass
class DeltaConfig(Seq2SeqTrainingArguments, DeltaArguments):
    def __post_init__(self) -> None:
        self.validate_delta_fields()
        super().__post_init__()
        check_delta_training_arguments(self)


DeltaConfig.__doc__ = (
    "`Seq2SeqTrainingArguments` plus the DELTA fields, for :class:`delta_trl.DeltaTrainer` (seq2seq and causal "
    "LMs).\n\n" + fields_docstring(DeltaArguments)
)


@dataclass
class DeltaDPOConfig(DPOConfig, DeltaArguments):
    def __post_init__(self) -> None:
        self.validate_delta_fields()
        if isinstance(self.loss_type, str):  # DPOConfig accepts one name or a list of names
            self.loss_type = [self.loss_type]
        if self.delta_mode != "nonlinear":
            check_delta_dpo_options(self)
        super().__post_init__()
        check_delta_training_arguments(self)


def check_delta_dpo_options(config: DeltaDPOConfig) -> None:
    """Raise on a DPOConfig option that DELTA's loss (sigmoid DPO against θ0, for student and teacher) would ignore."""
    supported = {
        "loss_type": (list(config.loss_type), ["sigmoid"]),
        "loss_weights": (None if config.loss_weights in (None, [1.0]) else list(config.loss_weights), None),
        "label_smoothing": (config.label_smoothing, 0.0),
        "f_divergence_type": (str(getattr(config.f_divergence_type, "value", config.f_divergence_type)), "reverse_kl"),
        "ld_alpha": (config.ld_alpha, None),
        "use_weighting": (config.use_weighting, False),
        "sync_ref_model": (config.sync_ref_model, False),
        "padding_free": (config.padding_free, False),
    }
    for name, (value, expected) in supported.items():
        if value != expected:
            why = (
                "packs sequences without an attention mask, which needs flash-attention, and flash-attention has no "
                "forward-mode AD for the linearized teacher"
                if name == "padding_free"
                else "the DELTA teacher and student use sigmoid DPO against the base model"
            )
            raise ValueError(
                f"{name}={value!r} is not supported with delta_mode={config.delta_mode!r}: {why} ({name}={expected!r}). "
                "Use delta_mode='nonlinear' for TRL's other DPO variants."
            )


DeltaDPOConfig.__doc__ = (
    "`trl.DPOConfig` plus the DELTA fields, for :class:`delta_trl.DeltaDPOTrainer`. In the DELTA modes the DPO loss is "
    "sigmoid DPO against the base model (the linearized teacher's primal).\n\n" + fields_docstring(DeltaArguments)
)


@dataclass
class DeltaSFTConfig(SFTConfig, DeltaArguments):
    def __post_init__(self) -> None:
        self.validate_delta_fields()
        super().__post_init__()
        if self.delta_mode != "nonlinear":
            check_delta_sft_options(self)
        check_delta_training_arguments(self)


def check_delta_sft_options(config: DeltaSFTConfig) -> None:
    """Raise on an SFTConfig option the DELTA modes cannot honour. ``completion_only_loss`` and ``assistant_only_loss``
    are supported: they only set which labels are -100, and the supervised positions are ``labels != -100``."""
    unpadded = (
        "sequences concatenated without padding or an attention mask need flash-attention's variable-length kernels, "
        "and flash-attention has no forward-mode AD for the linearized teacher"
    )
    packed = (
        "packed documents are kept apart only by flash-attention's variable-length kernels (TRL's `bfd` packing is "
        "padding-free), which have no forward-mode AD for the linearized teacher; without them they would attend "
        "across their boundaries"
    )
    refused = {
        "packing": (config.packing, False, packed),
        "eval_packing": (bool(config.eval_packing), False, packed),
        "padding_free": (config.padding_free, False, unpadded),
        "loss_type": (
            config.loss_type,
            "nll",
            "the DELTA loss is token cross-entropy for the student and the linearized teacher (no DFT weighting)",
        ),
        "label_smoothing_factor": (
            config.label_smoothing_factor,
            0.0,
            "the DELTA modes compute their token-level losses themselves, without label smoothing",
        ),
    }
    for name, (value, expected, why) in refused.items():
        if value != expected:
            raise ValueError(
                f"{name}={value!r} is not supported with delta_mode={config.delta_mode!r}: {why}. Set "
                f"{name}={expected!r}, or use delta_mode='nonlinear' (TRL's SFTTrainer unchanged)."
            )


DeltaSFTConfig.__doc__ = (
    "`trl.SFTConfig` plus the DELTA fields, for :class:`delta_trl.DeltaSFTTrainer`. In the DELTA modes the loss is "
    "token cross-entropy on the labels TRL builds (`completion_only_loss`, `assistant_only_loss`); packing, "
    "padding-free batches and `loss_type='dft'` are refused.\n\n" + fields_docstring(DeltaArguments)
)
