"""One error surface for the recipes and the ``delta-trl`` command line.

A mistake in what the user gave us (a missing or malformed file, a wrong column, a flag value that cannot work, an
existing output folder, an unreachable Hub id, a damaged adapter) ends the program with **one line** on stderr,
``error: <what is wrong, naming the file or flag, and what to do>``, and exit status 2, with no traceback.
``--debug`` (or ``DELTA_TRL_DEBUG=1``) shows the full traceback instead. Anything else (a bug, a failure inside
training) keeps its traceback.

- :class:`UserError`: raised by validation with a message written for the user.
- :func:`user_errors`: a context manager around setup code (parsing, loading files and models, building a trainer)
  that turns the exceptions such code raises on bad input (``ValueError``, ``OSError`` — missing files, Hub
  failures —, safetensors and YAML errors) into :class:`UserError`.
- :func:`run_cli`: runs a ``main(argv)``; prints a :class:`UserError` as one line and returns 2.
- :func:`one_line_errors`: makes an ``argparse`` parser (also ``HfArgumentParser`` / ``TrlParser``) report a bad flag
  in one line instead of the whole usage.
- :func:`check_training_arguments`, :func:`check_lora_arguments`, :func:`check_lora_targets`,
  :func:`check_safetensors_file`: refuse values that cannot work before any work starts.
- :func:`published`: a Hub upload after the local output is complete; its failure is one line that says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


DEBUG_ENV = "DELTA_TRL_DEBUG"


class UserError(Exception):
    """A problem the user can fix. ``str(err)`` is the one-line message (file or flag, what is wrong, what to do)."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def _input_error_types() -> tuple[type[BaseException], ...]:
    types_: list[type[BaseException]] = [ValueError, OSError]  # OSError: missing files, permissions, Hub failures
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        types_.append(SafetensorError)
    with contextlib.suppress(ImportError):
        import yaml

        types_.append(yaml.YAMLError)
    return tuple(types_)


@contextlib.contextmanager
def user_errors(context: str | None = None, *, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Inside the block, input-shaped exceptions become :class:`UserError` (chained to the original).

    Use it around code whose failures are the user's input (parsing, reading files, loading a model or an adapter,
    building a trainer), never around training itself. ``context`` prefixes the message (``"--dataset x.jsonl"``);
    ``also`` adds exception types (e.g. ``ImportError`` where a missing optional package is the user's to install).
    """
    try:
        yield
    except UserError:
        raise
    except (*_input_error_types(), *also) as err:
        message = one_line(err) or type(err).__name__
        raise UserError(f"{context}: {message}" if context else message) from err


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``DELTA_TRL_DEBUG`` is set to a true value, or a bare ``--debug`` is among the arguments."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return argv is not None and _bare_debug_positions(argv) != []


def _bare_debug_positions(argv: Sequence[str]) -> list[int]:
    # `--debug VALUE` is transformers' TrainingArguments.debug (e.g. `--debug underflow_overflow`): left alone.
    return [
        i for i, arg in enumerate(argv) if arg == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("-"))
    ]


def strip_debug_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without the bare ``--debug`` flags that :func:`run_cli` consumes."""
    drop = set(_bare_debug_positions(argv))
    return [arg for i, arg in enumerate(argv) if i not in drop]


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` (``argv`` without ``--debug``); return its status, or 2 after one ``error:`` line.

    With ``--debug`` or ``DELTA_TRL_DEBUG=1`` a :class:`UserError` is re-raised with its cause, for the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return int(main(strip_debug_flag(argv)) or 0)
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` (and the sub-parsers it creates later) report a bad flag as one line, exit status 2.

    argparse prints the whole usage before the message; a recipe's usage is 150 lines, so the one line that matters
    scrolls away. ``--help`` still prints everything.
    """

    def error(self: argparse.ArgumentParser, message: str) -> None:
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")

    parser.error = types.MethodType(error, parser)  # type: ignore[method-assign]
    return parser


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (its sub-parsers are of the same class)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


# ---- values that cannot work, refused before any work -----------------------------------------------------------


def check_training_arguments(args: Any) -> None:
    """Refuse ``TrainingArguments`` values with which a run cannot work (negative steps, non-positive lr...)."""
    problems: list[str] = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    need(args.max_steps >= -1, f"--max_steps {args.max_steps}: give a positive number of optimizer steps, or -1 to "
         "train for --num_train_epochs")  # fmt: skip
    if args.max_steps <= 0:
        need(args.num_train_epochs > 0, f"--num_train_epochs {args.num_train_epochs}: must be > 0 (or set "
             "--max_steps)")  # fmt: skip
    need(args.learning_rate > 0, f"--learning_rate {args.learning_rate}: must be > 0")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        need(getattr(args, name) >= 1, f"--{name} {getattr(args, name)}: must be ≥ 1")
    need(args.weight_decay >= 0, f"--weight_decay {args.weight_decay}: must be ≥ 0")
    need(args.max_grad_norm is None or args.max_grad_norm >= 0, f"--max_grad_norm {args.max_grad_norm}: must be ≥ 0")
    for name, strategy in (("logging_steps", "logging_strategy"), ("save_steps", "save_strategy"),
                           ("eval_steps", "eval_strategy")):  # fmt: skip
        value = getattr(args, name)
        if str(getattr(args, strategy, "")).endswith("steps") and value is not None:
            need(value > 0, f"--{name} {value}: must be > 0 with --{strategy} steps")
    need(args.dataloader_num_workers >= 0, f"--dataloader_num_workers {args.dataloader_num_workers}: must be ≥ 0")
    if problems:
        raise UserError("; ".join(problems) + ".")


def check_positive(values: dict[str, float | int | None], *, allow_zero: bool = False) -> None:
    """Refuse each ``{flag: value}`` that is not > 0 (≥ 0 with ``allow_zero``); ``None`` means unset."""
    for flag, value in values.items():
        if value is not None and (value < 0 if allow_zero else value <= 0):
            raise UserError(f"{flag} {value}: must be {'≥ 0' if allow_zero else '> 0'}.")


def check_lora_arguments(model_args: Any) -> None:
    """Refuse TRL ``ModelConfig`` LoRA settings DELTA cannot train (no LoRA, DoRA, rank < 1...)."""
    if not model_args.use_peft:
        raise UserError(
            "DELTA trains LoRA adapters: pass --use_peft (with --lora_r, --lora_alpha, --lora_target_modules)."
        )
    if getattr(model_args, "use_dora", False):
        raise UserError(
            "--use_dora: DoRA's update is not linear in the LoRA scaling, so DELTA's linearized teacher, the "
            "α-interpolation and exact task arithmetic cannot use it; drop --use_dora (vanilla LoRA, or --use_rslora)."
        )
    check_positive({"--lora_r": model_args.lora_r, "--lora_alpha": model_args.lora_alpha})
    if not 0 <= model_args.lora_dropout < 1:
        raise UserError(f"--lora_dropout {model_args.lora_dropout}: must be in [0, 1).")
    targets = model_args.lora_target_modules
    if targets is not None and len(targets) == 0:
        raise UserError("--lora_target_modules is empty: name the layers to adapt (e.g. q_proj v_proj).")
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[\w.]+", targets):
        # TRL's ModelConfig turns a one-name list into a string, which PEFT reads as a regex over the full module name
        # (`q_proj` would match nothing): a plain name is meant as a name.
        model_args.lora_target_modules = [targets]


def check_lora_targets(model: Any, target_modules: Sequence[str] | str | None, flag: str) -> None:
    """Refuse target names that match no module of ``model`` (PEFT's rule: the full name or its last parts).

    A regex string and ``all-linear`` are left to PEFT.
    """
    import torch

    if target_modules is None or list(target_modules) == ["all-linear"] or target_modules == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if isinstance(target_modules, str):  # PEFT: a regex matched against the whole module name
        if not any(re.fullmatch(target_modules, n) for n in names):
            raise UserError(
                f"{flag}: the pattern {target_modules!r} matches no full module name (e.g. {names[-1]!r}); name the "
                f"layers instead: {', '.join(linear)} (or all-linear)."
            )
        return
    missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise UserError(
            f"{flag}: {', '.join(missing)} {'matches' if len(missing) == 1 else 'match'} no module of the model; "
            f"its linear layers are {', '.join(linear)} (or use all-linear)."
        )


def check_safetensors_file(path: str | os.PathLike, what: str) -> None:
    """Raise :class:`UserError` naming ``path`` unless it parses as a complete safetensors file.

    ``safe_open`` reads the header and checks that the tensor data covers exactly the rest of the file, so a
    truncated download or copy is caught here, before any model is loaded.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"{what} {str(path)!r} is not a complete safetensors file ({one_line(err)}): it is truncated or damaged; "
            "copy or download it again (or retrain)."
        ) from err


def published(output: str | os.PathLike, repo_id: str, push: Callable[[], Any], retry: str) -> Any:
    """Run ``push()`` (an upload of the complete local ``output``); its failure becomes one line saying so.

    ``retry`` is the command that uploads ``output`` again.
    """
    try:
        return push()
    except Exception as err:  # every Hub failure: network, authentication, permissions, a bad repo id
        raise UserError(
            f"{output} is complete, but uploading it to the Hub repo {repo_id!r} failed ({type(err).__name__}: "
            f"{one_line(err)}); check the network and your token (`hf auth login`), then retry with: {retry}"
        ) from err


def check_model_source(name_or_path: str, flag: str) -> None:
    """Refuse a model that is neither ``embedded``, a model folder, nor shaped like a Hub id (checked offline)."""
    from delta_trl.embedded import EMBEDDED_MODEL_NAME

    if name_or_path == EMBEDDED_MODEL_NAME:
        return
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {name_or_path}: the folder has no config.json; give a model folder "
                            "(save_pretrained), a Hub id or `embedded`.")  # fmt: skip
        return
    if path.exists():
        raise UserError(
            f"{flag} {name_or_path}: a file, not a model folder; give a model folder, a Hub id or `embedded`."
        )
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise UserError(
            f"{flag} {name_or_path}: no such folder; give a model folder, a Hub id (owner/name) or `embedded`."
        )


@contextlib.contextmanager
def new_folder_removed_on_error(folder: str | os.PathLike) -> Iterator[None]:
    """If the block fails and ``folder`` did not exist before it, remove ``folder`` when it is (still) empty.

    A refused run must not leave an empty output folder behind (a later run would then see it as existing).
    """
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def model_skeleton(
    name_or_path: str, revision: str | None = None, flag: str = "--model_name_or_path", *, seq2seq: bool | None = None
) -> Any:
    """The model of ``name_or_path`` built from its config on the meta device: module names, no weights.

    Lets the recipes and commands check LoRA targets (and that the model is reachable) before any weight is loaded.
    ``seq2seq=None`` picks the class from ``config.is_encoder_decoder``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from delta_trl.embedded import EMBEDDED_MODEL_NAME, prepare_embedded_model

    with user_errors(f"{flag} {name_or_path}", also=(ImportError,)):
        source = str(prepare_embedded_model()) if name_or_path == EMBEDDED_MODEL_NAME else name_or_path
        config = AutoConfig.from_pretrained(source, **({"revision": revision} if revision else {}))
        if seq2seq is None:
            seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        with torch.device("meta"):
            return (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(config)


def parse_recipe_arguments(parser: Any, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """``parser.parse_args_and_config(argv)`` (a ``TrlParser``) whose errors are :class:`UserError`."""
    import warnings

    with user_errors(), warnings.catch_warnings():
        # transformers warns about the deprecated `gradient_checkpointing` alias that configs set themselves (TRL's
        # DPOConfig always does): nothing the user can act on, and it would bury a one-line error
        warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
        return tuple(parser.parse_args_and_config(argv))
