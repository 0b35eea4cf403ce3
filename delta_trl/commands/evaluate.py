"""``delta-trl evaluate``: α sweep and selection for task addition or negation on labelled validation files."""

from __future__ import annotations

import argparse


EPILOG = """\
Validation files: .jsonl, .json (a list of records) or .csv with a text column and a label column.
Labels are label words ("positive", "entailment"; scored as the model's log-likelihood of
--label-prefix + word after the text) or class indices (then give --label-words, or --head for a
sequence-classification model whose logits are the class scores).

examples:
  # task addition: choose α for θ0 + α(τ_sst2 + τ_rte) by mean normalized accuracy
  delta-trl evaluate --base-model my/base --adapter sst2=runs/sst2 --adapter rte=runs/rte \\
      --data sst2=val/sst2.jsonl --data rte=val/rte.jsonl --alphas 0.1 0.2 0.3 0.5 0.7 1.0 --output eval/add

  # task negation: the α of θ0 − α·τ_toxic minimizing target accuracy, control ≥ 95% of θ0's
  delta-trl evaluate --base-model my/base --adapter toxic=runs/toxic --negate toxic \\
      --data toxic=val/toxic.jsonl --data control=val/control.jsonl --output eval/neg

Adapters whose delta_trl.json says "evaluate_linearized": true (the `linear` training mode) are
evaluated on the linearized model f(θ0) + Σ α_t J·τ_t automatically.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="α sweep / selection for task addition or negation on validation files",
        description="Evaluate θ0 + α·Σ_t τ_t over a grid of α and report α = 1 and the best α by mean normalized\n"
        "accuracy (each task's accuracy / its own fine-tuned accuracy). No re-merging: the adapters are loaded side\n"
        "by side and their LoRA scalings multiplied by α. Writes alpha_sweep.json/.png (negation.json/.png with\n"
        "--negate) to --output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--base-model", required=True, help="θ0: `embedded` (the packaged SmolLM2-135M-Instruct), a folder or a hub id"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: --base-model)")
    parser.add_argument(
        "--adapter", action="append", required=True, metavar="TASK=PATH", help="a task adapter; repeat per task"
    )
    parser.add_argument(
        "--data", action="append", required=True, metavar="TASK=FILE", help="validation file per task (and 'control')"
    )
    parser.add_argument(
        "--alphas",
        nargs="+",
        type=float,
        default=[round(0.1 * i, 1) for i in range(1, 11)],
        help="α grid (default: 0.1 … 1.0)",
    )
    parser.add_argument("--negate", default=None, metavar="TASK", help="negation mode: the task to forget")
    parser.add_argument("--control", default="control", help="negation mode: the --data name of the control set")
    parser.add_argument("--threshold", type=float, default=0.95, help="negation: control accuracy floor, × θ0's")
    parser.add_argument("--text-column", default="text", help="column holding the input text (default: %(default)s)")
    parser.add_argument("--label-column", default="label", help="column holding the label (default: %(default)s)")
    parser.add_argument("--label-words", nargs="+", default=None, help="verbaliser for integer labels, in class order")
    parser.add_argument(
        "--label-prefix", default=" ", help="prepended to label words before tokenizing (default: a space)"
    )
    parser.add_argument("--head", action="store_true", help="sequence-classification model: use its logits")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: %(default)s)")
    parser.add_argument("--output", "-o", default=None, help="folder for the JSON (and PNG) results")
    return parser


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects TASK=PATH, got {value!r}.")
        pairs[name] = path
    return pairs


def _load_set(path: str, args: argparse.Namespace):
    from delta_trl.evaluation.scoring import load_classification_file

    return load_classification_file(
        path,
        args.text_column,
        args.label_column,
        args.label_words,
        label_prefix="" if args.head else args.label_prefix,
        head=args.head,
    )


def run(args: argparse.Namespace) -> int:
    from delta_trl.errors import user_errors

    with user_errors():
        return _evaluate(args)


def _check_numbers(args: argparse.Namespace) -> None:
    from delta_trl.errors import UserError, check_positive

    check_positive({"--batch-size": args.batch_size})
    if not 0 < args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold}: the control-accuracy floor must be in (0, 1] (× θ0's).")
    bad = [a for a in args.alphas if a != a or a in (float("inf"), float("-inf"))]
    if bad:
        raise UserError(f"--alphas: {bad[0]} is not a finite number.")


def _base_model_and_tokenizer(args: argparse.Namespace):
    """θ0 and its tokenizer: `embedded` is converted once and loaded like the recipes do."""
    from transformers import AutoTokenizer

    from delta_trl.errors import user_errors
    from delta_trl.merging.adapter_io import load_base_model

    name = args.base_model
    with user_errors(f"--base-model {name}", also=(ImportError,)):
        if name == "embedded":
            from delta_trl.embedded import prepare_embedded_model

            name = str(prepare_embedded_model())
        model = load_base_model(name)
    tokenizer_name = args.tokenizer or name
    with user_errors(f"--tokenizer {args.tokenizer}" if args.tokenizer else f"--base-model {args.base_model}"):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _evaluate(args: argparse.Namespace) -> int:
    from delta_trl.errors import check_safetensors_file
    from delta_trl.evaluation.diagnostics import alpha_sweep_report, negation_report
    from delta_trl.evaluation.scoring import load_task_adapters
    from delta_trl.evaluation.selection import addition_sweep, negation_sweep
    from delta_trl.merging.adapter_io import resolve_adapter_path

    _check_numbers(args)
    adapters = _pairs(args.adapter, "--adapter")
    files = _pairs(args.data, "--data")
    datasets = {name: _load_set(path, args) for name, path in files.items()}
    if args.negate:
        missing = {args.negate, args.control} - set(datasets)
        if missing or args.negate not in adapters:
            raise ValueError(
                f"Negation needs --adapter {args.negate}=… and --data for {sorted({args.negate, args.control})}."
            )
    else:
        missing = set(adapters) - set(datasets)
        if missing:
            raise ValueError(f"Give --data for every adapter; missing {sorted(missing)}.")
    folders = {}
    for name, source in adapters.items():
        folders[name] = resolve_adapter_path(source)
        if not (folders[name] / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter {name}={source}: no adapter_config.json; is it a PEFT adapter folder?")
        weights = folders[name] / "adapter_model.safetensors"
        if weights.is_file():
            check_safetensors_file(weights, f"--adapter {name}={source}: the weights")
    base, tokenizer = _base_model_and_tokenizer(args)
    model, linearized = load_task_adapters(base, {name: str(path) for name, path in folders.items()})
    common = {"linearized": linearized, "batch_size": args.batch_size}
    if args.negate:
        result = negation_sweep(
            model, tokenizer, args.negate, datasets[args.negate], datasets[args.control], args.alphas,
            threshold=args.threshold, **common,
        )  # fmt: skip
        print(f"best α = {result.best_alpha:g}: target {result.best_target:.4f}, control {result.best_control:.4f} "
              f"(θ0 control {result.base_control:.4f}, floor {args.threshold:g}×)")  # fmt: skip
        if args.output:
            negation_report(result, output_dir=args.output)
        return 0
    result = addition_sweep(model, tokenizer, {t: datasets[t] for t in adapters}, args.alphas, **common)
    print(f"α = 1: mean normalized accuracy {result.alpha_one_normalized:.4f}")
    print(f"best α = {result.best_alpha:g}: mean normalized accuracy {result.best_normalized:.4f}")
    if args.output:
        alpha_sweep_report(result, output_dir=args.output)
    return 0
