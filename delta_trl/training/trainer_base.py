"""What both DELTA trainers share: the teacher adapter's life cycle, α per step, metrics, saving and resuming.

Only public ``Trainer`` methods are overridden (``save_model``, ``train``); each trainer's ``compute_loss`` picks the
loss: the token-level DELTA loss shared by the SFT trainers (``DeltaTrainerMixin._delta_token_loss``), DPO's own in
``DeltaDPOTrainer``. The mathematics is in :mod:`delta_trl.core.losses`, :mod:`delta_trl.core.linearize` and
:mod:`delta_trl.curvature.factors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import ModelOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from delta_trl import __version__
from delta_trl._utils import apply_umask, atomic_write
from delta_trl.core.adapters import (
    activate_student_and_teacher,
    add_teacher_adapter,
    check_linear_lora,
    check_linear_lora_config,
    lora_layers,
    scaled_adapters,
    unparked,
)
from delta_trl.core.fingerprint import DTYPE_KEY, FINGERPRINT_KEY, base_model_dtype, base_model_fingerprint
from delta_trl.core.linearize import (
    check_hidden_layers,
    check_input_embeddings_frozen,
    check_jvp_support,
    finite_difference_teacher_forward,
    forward_kwargs,
    hidden_states_of,
    linearized_forward,
    linearized_loss,
    linearized_teacher_forward,
    linearized_teacher_loss,
    logits_on_rows,
)
from delta_trl.core.losses import (
    delta_objective,
    hidden_distillation_loss,
    sample_alpha,
    supervised_mask,
    token_cross_entropy,
)
from delta_trl.core.rows import row_targets, rows_cross_entropy
from delta_trl.curvature.cache import load_or_estimate_curvature
from delta_trl.curvature.factors import curvature_penalty
from delta_trl.data import load_text_dataset
from delta_trl.training.configs import MODES_WITH_JVP, MODES_WITH_TEACHER, DeltaArguments


TEACHER_WEIGHTS_NAME = "delta_teacher.safetensors"
DELTA_MARKER_NAME = "delta_trl.json"


def check_delta_inputs(model: Any, peft_config: PeftConfig | None, args: DeltaArguments) -> None:
    """Refuse every unsupported input before the parent trainer does any work (tokenizing, reference passes...)."""
    if isinstance(model, str):
        raise ValueError("Pass a model object, not a name: load it with from_pretrained first.")
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError("The model is already a PeftModel: pass either a PeftModel or `peft_config`, not both.")
        check_linear_lora(model, model.active_adapter)
        lora_config, base = model.peft_config[model.active_adapter], model.get_base_model()
    elif peft_config is None:
        raise ValueError(
            "DELTA trains LoRA adapters: pass a `peft.PeftModel` with a LoRA adapter, or a model plus "
            "`peft_config=LoraConfig(...)`."
        )
    else:
        check_linear_lora_config(peft_config, "the `peft_config` adapter")
        lora_config, base = peft_config, model
    if args.delta_mode == "nonlinear":
        return
    if getattr(lora_config, "modules_to_save", None):
        raise ValueError(
            f"modules_to_save={list(lora_config.modules_to_save)} trains whole modules, which are not part of the LoRA "
            f"task vector τ = s·B·A that delta_mode={args.delta_mode!r} linearizes, interpolates and merges. Put a "
            "LoRA adapter on those modules instead (target_modules), or use delta_mode='nonlinear'."
        )
    if getattr(lora_config, "bias", "none") == "all":
        raise ValueError(
            "LoraConfig(bias='all') trains the base model's biases, which are not part of the LoRA task vector; use "
            "bias='none' (or 'lora_only', which scales with the adapter), or delta_mode='nonlinear'."
        )
    if args.delta_mode in MODES_WITH_JVP:
        check_not_quantized(base, args.delta_mode)
        check_jvp_support(base)
        check_hidden_layers(base.config, args.distill_layers)


def check_not_quantized(model: Any, mode: str) -> None:
    """Raise if the base model is quantized (bitsandbytes 4/8-bit, GPTQ, AWQ...): no forward-mode AD through it."""
    quantization = getattr(model, "hf_quantizer", None) or getattr(model.config, "quantization_config", None)
    if (
        quantization is not None
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
    ):
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        method = method or getattr(quantization, "quant_method", None) or "k-bit"
        raise ValueError(
            f"The base model is quantized ({getattr(method, 'value', method)}); "
            f"quantized layers have no forward-mode AD, so delta_mode={mode!r} cannot linearize it. Load the base "
            "model in bf16/fp32, or use delta_mode='nonlinear' (plain QLoRA)."
        )


def add_delta_adapters(model: PeftModel, args: DeltaArguments) -> None:
    """Add the teacher adapter when the mode needs one (after any reference adapter the parent trainer makes)."""
    if args.delta_mode in MODES_WITH_TEACHER:
        add_teacher_adapter(model, model.active_adapter, args.teacher_adapter_name, args.teacher_r)
    if args.delta_mode in MODES_WITH_JVP:
        check_input_embeddings_frozen(model)


@contextlib.contextmanager
def _saving_only(model: PeftModel, adapter_name: str) -> Iterator[None]:
    # PeftModel.save_pretrained writes every adapter unless told otherwise, and the Trainer does not tell it: the
    # saved model must be the student alone, while the Trainer's own saving logic (DeepSpeed, FSDP, sharding...) stays.
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=[adapter_name])
    try:
        yield
    finally:
        del model.save_pretrained


class DeltaTrainerMixin:
    """Mixed in before a ``transformers``/TRL trainer class. Expects ``self.args`` to carry :class:`DeltaArguments`."""

    def _init_delta(self) -> None:
        """Call after the parent ``__init__``."""
        args: DeltaArguments = self.args
        if not hasattr(self, "_metrics"):  # TRL trainers already keep one
            self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        unwrapped = self.accelerator.unwrap_model(self.model)
        # θ0's identity for merges and folds, taken before DeepSpeed or mixed precision can cast the weights
        self._base_identity = {
            FINGERPRINT_KEY: base_model_fingerprint(unwrapped),
            DTYPE_KEY: base_model_dtype(unwrapped),
        }
        self._student_name = unwrapped.active_adapter
        self._teacher_name = args.teacher_adapter_name if args.delta_mode in MODES_WITH_TEACHER else None
        # The JVP needs forward-mode AD through every layer, and the curvature penalty reads the LoRA weights whole.
        if args.delta_mode in MODES_WITH_JVP or args.curvature_weight > 0:
            if self.is_fsdp_enabled:
                raise ValueError(
                    "FSDP shards the weights and has no forward-mode AD (pytorch/pytorch#182641), so the linearized "
                    "teacher and the curvature penalty cannot run. Use DDP or DeepSpeed ZeRO-1/2 "
                    "(accelerate_configs/multi_gpu.yaml, zero2.yaml)."
                )
            plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
            if self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
                raise ValueError(
                    "DeepSpeed ZeRO-3 partitions the weights inside autograd functions that have no forward-mode AD, "
                    "so the linearized teacher cannot run. Use ZeRO-2 (accelerate_configs/zero2.yaml): LoRA "
                    "optimizer states are small, and ZeRO-2 shards them."
                )
        if self._teacher_name:
            self._check_cheaper_teacher(unwrapped)
        self._curvature = self._load_curvature(unwrapped) if args.curvature_weight > 0 else None

    def _check_cheaper_teacher(self, model: PeftModel) -> None:
        """What the config could not see: the launcher's mixed precision and engine, the weights' dtype."""
        args: DeltaArguments = self.args
        if args.teacher_tangent == "fd":
            dtypes = {layer.get_base_layer().weight.dtype for layer in lora_layers(model, self._teacher_name)}
            mixed = getattr(self.accelerator, "mixed_precision", "no")
            if mixed != "no" or not dtypes <= {torch.float32, torch.float64}:
                raise ValueError(
                    f"teacher_tangent='fd' needs fp32/fp64 forwards (the difference cancels half of fp32's digits); "
                    f"this run has mixed_precision={mixed!r} and base weights in {sorted(map(str, dtypes))}. Load the "
                    "model in fp32 and launch without mixed precision, or use teacher_tangent='jvp'."
                )
            if torch.get_float32_matmul_precision() != "highest":
                raise ValueError(
                    f"teacher_tangent='fd' needs full fp32 matmuls; torch.get_float32_matmul_precision() is "
                    f"{torch.get_float32_matmul_precision()!r} (TF32/bf16 matmuls). Set torch.backends.cuda.matmul."
                    "allow_tf32=False, or use teacher_tangent='jvp'."
                )
        if args.teacher_every_k_steps > 1 and self.is_deepspeed_enabled:
            raise ValueError(
                "teacher_every_k_steps > 1 drops the teacher's gradients on skipped steps, and DeepSpeed's engine "
                "steps every parameter from its own buffers. Use DDP, or teacher_every_k_steps=1."
            )

    def _teacher_runs(self) -> bool:
        """Whether this optimizer step has a teacher: every ``teacher_every_k_steps``-th global step (0, k, 2k...).

        A function of the global step only, so every micro-batch and every process of a step decide alike.
        """
        return self._teacher_name is not None and self.state.global_step % self.args.teacher_every_k_steps == 0

    def _teacher_forward(
        self, model: PeftModel, inputs: dict[str, Any], adapter_name: str, rows: torch.Tensor, hidden_layers: Any = ()
    ):
        """The teacher pass the config asks for: the exact one-pass JVP, or the finite difference (`fd`)."""
        forward = (
            finite_difference_teacher_forward
            if self.args.teacher_tangent == "fd" and adapter_name == self._teacher_name
            else linearized_teacher_forward
        )
        return forward(model, inputs, adapter_name, rows, hidden_layers)

    def _load_curvature(self, model: PeftModel):
        """θ0's curvature factors: the cache at `curvature_path`, or estimated on `curvature_dataset` and cached."""
        args: DeltaArguments = self.args
        reference = None
        if args.curvature_dataset and not Path(args.curvature_path).exists():
            reference = load_text_dataset(args.curvature_dataset)
        factors = load_or_estimate_curvature(
            model,
            path=args.curvature_path,
            reference=reference,
            tokenizer=self.processing_class,
            text_column=args.curvature_text_column,
            num_samples=args.curvature_num_samples,
            max_length=args.curvature_max_length,
            batch_size=self.args.per_device_eval_batch_size,
            estimator=args.curvature_estimator,
            seed=self.args.seed,
            accelerator=self.accelerator,
        )
        return factors.to(self.accelerator.device, torch.float32)  # once, not per penalty call

    def _curvature_penalty(self, model: PeftModel, with_teacher: bool = True) -> torch.Tensor | None:
        """``R(τ_S) + R(τ_T)`` (``R(τ_S)`` without a teacher or on a step that skips it), or ``None`` when the penalty
        is off (docs/METHOD.md §4)."""
        if self._curvature is None:
            return None
        penalty = curvature_penalty(model, self._curvature, self._student_name)
        if self._teacher_name and with_teacher:
            penalty = penalty + curvature_penalty(model, self._curvature, self._teacher_name)
        return penalty

    # ---- per-step quantities -------------------------------------------------------------------------------------

    _step_alpha: float | None = None  # the α that `training_step` holds the student at, for forward and backward

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The parent's step with the student held at ``θ0 + α·τ_S`` from its forward through its backward.

        α must hold during the backward too: gradient checkpointing recomputes the student's forward there, and
        a scale restored at the end of ``compute_loss`` would make that recomputation run at α = 1.
        """
        alpha = self._current_alpha() if self._teacher_name else 1.0
        unwrapped = self.accelerator.unwrap_model(model)
        self._step_alpha = alpha
        try:
            with scaled_adapters(unwrapped, {self._student_name: alpha}):
                loss = super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._step_alpha = None
        if self._teacher_name and not self._teacher_runs():
            # The parked teacher still sits in the student's graph (scale 0) and gets zero gradients; a zero gradient
            # would still move it under Adam's momentum and weight decay, a missing one keeps it out of the step.
            for layer in lora_layers(unwrapped, self._teacher_name):
                for param in (
                    *layer.lora_A[self._teacher_name].parameters(),
                    *layer.lora_B[self._teacher_name].parameters(),
                ):
                    param.grad = None
        return loss

    @contextlib.contextmanager
    def _student_at(self, model: PeftModel, alpha: float) -> Iterator[None]:
        """The student at ``θ0 + α·τ_S`` inside the block, on top of whatever α ``training_step`` already holds."""
        held = self._step_alpha if self._step_alpha is not None else 1.0
        with contextlib.nullcontext() if alpha == held else scaled_adapters(model, {self._student_name: alpha / held}):
            yield

    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The parent's optimizer, over both adapters: re-activate the teacher first.

        The Trainer's checkpoint loader calls ``set_adapter(student)`` for an adapter not named "default", which
        deactivates and freezes the teacher before the optimizer is built; resuming would then load an optimizer
        state with more parameters than the optimizer has.
        """
        if getattr(self, "_teacher_name", None):
            activate_student_and_teacher(
                self.accelerator.unwrap_model(self.model), self._student_name, self._teacher_name
            )
        return super().create_optimizer(*args, **kwargs)

    def _current_alpha(self) -> float:
        """α for this optimizer step: a function of the seed and the global step, the same on every rank."""
        if self._step_alpha is not None:
            return self._step_alpha
        args: DeltaArguments = self.args
        return sample_alpha(
            self.state.global_step,
            self.state.max_steps,
            sampling=args.alpha_sampling,
            alpha_min=args.alpha_min,
            alpha_max=args.alpha_max,
            seed=self.args.seed,
        )

    def _loss_normalisation(self, num_items_in_batch: torch.Tensor | int | None) -> tuple[Any, int]:
        """``(N, scale)`` such that every token-level term ``sum / N · scale`` is exact under accumulation and DDP.

        With the Trainer's count of supervised tokens over the optimizer step (and processes), each term is
        ``sum / N`` (times the process count, which DDP's gradient averaging divides back out) and already scaled
        for gradient accumulation. Without it, terms are micro-batch means and the Trainer divides by the
        accumulation steps. The DELTA modes compute the student's cross-entropy themselves for this reason: some
        models (T5) return a micro-batch mean even when given ``num_items_in_batch``.
        """
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is None:
            return None, 1
        scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return num_items_in_batch, scale

    # ---- the token-level DELTA loss (labels with -100 on unsupervised positions) -----------------------------------

    _is_encoder_decoder = False  # `DeltaTrainer` sets it from the model; TRL's SFT trainer is causal only

    def _delta_token_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, Any]:
        """``(loss, outputs)`` of the DELTA modes for a batch of model inputs plus ``labels`` (docs/METHOD.md §3).

        ``delta`` / ``kd_only``: ``L_S(α) + γ·L_KD(α) + β_T·L_T(α)`` (+ ``λ·R``); ``linear``: ``L_T`` of the adapter
        alone; ``curvature_only``: ``L_S + λ·R(τ_S)``. The supervised positions are ``labels != -100``. ``inputs``
        must hold model kwargs only (besides ``labels``): they go to the student's forward and to the JVP.
        ``outputs`` has the logits: the student's, in training on the supervised rows only (``(N, V)``, row-major
        order of ``row_targets``), or the linearized model's in ``linear`` mode.
        """
        args = self.args
        if "labels" not in inputs:
            raise ValueError(
                f"{type(self).__name__} needs `labels` in every batch (the teacher's loss and the distillation "
                "positions come from them)."
            )
        training = model.training
        # α only matters on the student-teacher path: linear fine-tuning trains f_lin(θ0 + τ) itself.
        alpha = self._current_alpha() if training and self._teacher_name else 1.0
        unwrapped = self.accelerator.unwrap_model(model)
        labels = inputs["labels"]
        shift = not self._is_encoder_decoder
        num_items, scale = self._loss_normalisation(num_items_in_batch)
        mask = supervised_mask(labels, shift=shift)

        def as_mean(term: torch.Tensor) -> torch.Tensor:  # the per-token value of a term, for logging
            return term.detach() / scale * (num_items / mask.sum() if num_items is not None else 1)

        def task_loss_of(logits: torch.Tensor) -> torch.Tensor:
            return token_cross_entropy(logits, labels, shift=shift, num_items=num_items) * scale

        rows, targets = row_targets(labels, shift=shift)

        def rows_task_loss(logits: torch.Tensor) -> torch.Tensor:  # the same loss on the supervised rows (N, V)
            return rows_cross_entropy(logits, targets, num_items) * scale

        if args.delta_mode == "linear":
            if not (training and torch.is_grad_enabled()):  # evaluation: the whole linearized logits, no graph
                linearized = linearized_forward(unwrapped, inputs, self._student_name, differentiable=False)
                logits = linearized.logits(alpha)
                loss = task_loss_of(logits)
            elif model is not unwrapped:
                # DDP/DeepSpeed wrap outputs in autograd functions without a forward-mode rule, and the θ0 pass must
                # go through the wrapper (its only forward of the step): a no-graph JVP, then a wrapped θ0 pass
                linearized = linearized_forward(unwrapped, inputs, self._student_name, differentiable=False)
                loss = linearized_loss(
                    unwrapped, inputs, self._student_name, linearized, task_loss_of, alpha, forward_model=model
                )
                logits = linearized.logits(alpha)
            else:
                # one θ0 pass, through the wrapped model: no other forward of this step goes through DDP, which
                # reduces gradients only for a step whose forward went through it
                teacher = linearized_teacher_forward(unwrapped, inputs, self._student_name, rows, forward_model=model)
                loss = linearized_teacher_loss(unwrapped, self._student_name, teacher, rows_task_loss, alpha)
                logits = teacher.logits(alpha)  # (N, V) on the supervised rows, as the student's in training
            self._record_metrics(training, {"delta/teacher_loss": as_mean(loss)})
            return loss, ModelOutput(loss=loss, logits=logits)

        metrics: dict[str, Any] = {}
        distill_loss = teacher_loss = teacher_states = None
        if training and self._teacher_runs():
            # the teacher first: its θ0 graph is freed before the student's graph exists (peak memory)
            with unparked(unwrapped, self._teacher_name):
                teacher = self._teacher_forward(unwrapped, inputs, self._teacher_name, rows, args.distill_layers)
                teacher_loss = linearized_teacher_loss(unwrapped, self._teacher_name, teacher, rows_task_loss, alpha)
            teacher_states = teacher.hidden(alpha)
            del teacher

        distilling = teacher_states is not None
        student_kwargs = {**forward_kwargs(unwrapped.get_base_model(), inputs), "output_hidden_states": distilling}
        # without a teacher this step, α is only where L_S is taken: straight at 1 when task_loss_at_alpha=False
        student_alpha = alpha if distilling or args.task_loss_at_alpha else 1.0

        def student_forward(at: float, kwargs: dict[str, Any]) -> Any:
            # in training the LM head runs on the supervised rows only, (N, V) logits: no loss reads the others
            rows_only = logits_on_rows(unwrapped.get_base_model(), rows) if training else contextlib.nullcontext()
            with self._student_at(unwrapped, at), rows_only:
                return model(**kwargs)

        student_loss_of = rows_task_loss if training else task_loss_of
        outputs = student_forward(student_alpha, student_kwargs)
        task_loss = student_loss_of(outputs.logits)
        if not training:
            self._record_metrics(training, {"delta/task_loss": as_mean(task_loss)})
            return task_loss, outputs

        if distilling:
            student_hidden = hidden_states_of(outputs, self._is_encoder_decoder)
            distill_loss = scale * sum(
                hidden_distillation_loss(
                    student_hidden[layer],
                    teacher_hidden,
                    mask,
                    num_items=num_items,
                    normalization=args.distill_normalization,
                )
                for layer, teacher_hidden in zip(args.distill_layers, teacher_states, strict=True)
            )
            metrics |= {
                "delta/alpha": alpha,
                "delta/task_loss_at_alpha": as_mean(task_loss),
                "delta/teacher_loss": as_mean(teacher_loss),
                "delta/distill_loss": as_mean(distill_loss),
            }
            if not args.task_loss_at_alpha and alpha != 1.0:
                task_loss = student_loss_of(
                    student_forward(1.0, {**student_kwargs, "output_hidden_states": False}).logits
                )
        elif self._teacher_name:
            metrics["delta/alpha"] = student_alpha
        penalty = self._curvature_penalty(unwrapped, with_teacher=distilling)
        accumulation = 1
        if penalty is not None:
            metrics["delta/curvature_penalty"] = penalty
            if self.loss_is_scaled_for_ga:  # R is per optimizer step: the Trainer will not divide it, so we do
                accumulation = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)
        loss = delta_objective(
            task_loss,
            distill_loss=distill_loss,
            teacher_loss=teacher_loss,
            curvature_penalty=penalty,
            distill_weight=args.distill_weight,
            teacher_loss_weight=args.teacher_loss_weight,
            curvature_weight=args.curvature_weight / accumulation,
        )
        metrics["delta/task_loss"] = as_mean(task_loss)
        self._record_metrics(training, metrics)
        return loss, outputs

    # ---- metrics, the TRL way (averaged and cleared in `log`) ------------------------------------------------------------------------------------

    def _record_metrics(self, training: bool, values: dict[str, torch.Tensor | float]) -> None:
        """Gather this micro-batch's values over processes (one collective) and keep them until the next ``log``."""
        keys = list(values)
        device = self.accelerator.device
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device).detach() for k in keys])
        gathered = self.accelerator.gather_for_metrics(stacked[None]).float().mean(dim=0)
        store = self._metrics["train" if training else "eval"]
        for key, value in zip(keys, gathered.tolist(), strict=True):
            store[key].append(value)

    # ---- saving and resuming -------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student adapter alone (stock ``PeftModel.from_pretrained`` loads it) plus ``delta_trl.json``.

        Checkpoints (``checkpoint-*`` folders) also hold the teacher's weights, so that resuming continues exactly;
        the teacher's optimizer state is in the Trainer's ``optimizer.pt`` with every other trainable parameter.
        """
        output_dir = output_dir or self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        with _saving_only(unwrapped, self._student_name):
            super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        folder = Path(output_dir)
        if self._teacher_name and folder.name.startswith(PREFIX_CHECKPOINT_DIR):
            teacher_state = get_peft_model_state_dict(unwrapped, adapter_name=self._teacher_name)
            teacher_state = {k: v.detach().contiguous().cpu() for k, v in teacher_state.items()}
            atomic_write(folder / TEACHER_WEIGHTS_NAME, lambda tmp: save_file(teacher_state, tmp))
        marker = {
            "delta_trl_version": __version__,
            "adapter_name": self._student_name,
            "evaluate_linearized": self.args.delta_mode == "linear",
            **self._base_identity,
            **{f.name: getattr(self.args, f.name) for f in dataclasses.fields(DeltaArguments)},
        }
        # beside adapter_config.json: PEFT writes an adapter not named "default" into a sub-folder of that name
        adapter_folder = folder if self._student_name == "default" else folder / self._student_name
        atomic_write(
            adapter_folder / DELTA_MARKER_NAME, lambda tmp: Path(tmp).write_text(json.dumps(marker, indent=2))
        )
        apply_umask(adapter_folder)  # safetensors writes 0600 whatever the user's umask

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``; when resuming, the teacher adapter's weights are restored from the checkpoint first."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint found in output_dir={self.args.output_dir!r} to resume from.")
        if resume_from_checkpoint and self._teacher_name:
            self._load_teacher(Path(resume_from_checkpoint))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _load_teacher(self, checkpoint: Path) -> None:
        path = checkpoint / TEACHER_WEIGHTS_NAME
        if not path.is_file():
            raise ValueError(
                f"{checkpoint} has no {TEACHER_WEIGHTS_NAME}: it was not written by a DELTA run with a teacher "
                f"(mode {self.args.delta_mode!r}), so it cannot be resumed exactly."
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        result = set_peft_model_state_dict(unwrapped, load_file(path), adapter_name=self._teacher_name)
        missing = [k for k in result.missing_keys if f".{self._teacher_name}." in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{path} does not fit the teacher adapter: missing {missing[:3]}, unexpected "
                f"{result.unexpected_keys[:3]}."
            )
