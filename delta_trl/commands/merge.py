"""``delta-trl merge``: task arithmetic on LoRA adapters (θ0 + Σ α_t·τ_t), written as one adapter or a full model."""

from __future__ import annotations

import argparse


EPILOG = """\
examples:
  # add two task vectors (exact; writes one PEFT adapter of rank r1 + r2)
  delta-trl merge runs/sst2 runs/rte --coefficients 0.5 0.5 --output merged/sst2+rte

  # negate a task vector (forget a task)
  delta-trl merge runs/toxic --coefficients -1.0 --output merged/no-toxic

  # fold the sum into the base weights and save the full model
  delta-trl merge runs/sst2 runs/rte --coefficients 0.4 0.4 --fold-into-base --output merged/model

  # TIES baseline, re-factored to rank r1 + r2 by SVD (truncation error in merge_report.json)
  delta-trl merge runs/sst2 runs/rte --method ties --density 0.2 --output merged/ties

Load a merged adapter with stock PEFT:
  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "merged/sst2+rte")
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help="add / negate LoRA task vectors into one adapter or a merged model",
        description="Merge LoRA adapters by task arithmetic in effective-weight space: θ = θ0 + Σ_t α_t·τ_t with\n"
        "τ_t = s_t·B_t·A_t per module. The default output is one standard PEFT LoRA adapter (ranks concatenated,\n"
        "coefficients folded in, scaling 1): exact, and loadable with PeftModel.from_pretrained. Inputs are fully\n"
        "validated before anything is written; the output folder appears atomically (merge_report.json inside).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folders or hub ids (owner/name)")
    parser.add_argument("--output", "-o", required=True, help="new folder to write (must not exist, see --overwrite)")
    parser.add_argument(
        "--coefficients",
        "-c",
        nargs="+",
        type=float,
        default=None,
        metavar="ALPHA",
        help="one coefficient α_t per adapter, negative to negate (default: 1 for each)",
    )
    parser.add_argument(
        "--method",
        choices=["task_arithmetic", "ties", "dare"],
        default="task_arithmetic",
        help="task_arithmetic is exact; ties and dare are comparison baselines on the dense ΔW (default: %(default)s)",
    )
    parser.add_argument(
        "--density", type=float, default=None, help="fraction of entries kept by ties/dare (default 0.2)"
    )
    parser.add_argument(
        "--fold-into-base",
        action="store_true",
        help="write the base model with the merged update added to its weights (save_pretrained) instead of an adapter",
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="base model folder or hub id; needed for --fold-into-base (default: the adapters' base_model_name_or_path)"
        "; when given, its weight shapes are checked against the adapters",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DARE random masks (default: %(default)s)")
    parser.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="also upload the result with a model card"
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    return parser


def run(args: argparse.Namespace) -> int:
    from delta_trl.errors import user_errors

    with user_errors():
        return _merge(args)


def _merge(args: argparse.Namespace) -> int:
    import json

    from delta_trl.errors import check_safetensors_file, published
    from delta_trl.merging.adapter_io import REPO_ID, load_adapter, resolve_adapter_path
    from delta_trl.merging.merge import merge_adapters

    density = args.density
    if density is None:
        density = 1.0 if args.method == "task_arithmetic" else 0.2
    for source in args.adapters:
        weights = resolve_adapter_path(source) / "adapter_model.safetensors"
        if weights.is_file():
            check_safetensors_file(weights, f"The weights of adapter {source!r},")
    adapters = [load_adapter(source) for source in args.adapters]
    base_model = args.base_model
    if args.fold_into_base and base_model is None:
        base_model = adapters[0].config.base_model_name_or_path
        if not base_model:
            raise ValueError("The adapters do not record their base model; pass --base-model.")
    card_base = None
    if args.push_to_hub:
        from delta_trl.hub import card_base_model

        # Checked before merging: the card must name a Hub base model, and the local output should not be wasted.
        # A local --base-model folder cannot be named in the card; the recorded base is used instead.
        card_base = args.base_model if args.base_model and REPO_ID.match(args.base_model) else None
        card_base_model(card_base or adapters[0].config.base_model_name_or_path, "--base-model")
    result = merge_adapters(
        adapters,
        args.coefficients,
        args.output,
        method=args.method,
        density=density,
        fold_into_base=args.fold_into_base,
        base_model=base_model,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    summary = {k: v for k, v in result.report.items() if k in ("method", "output", "base_model")}
    summary["coefficients"] = {v["name"]: v["coefficient"] for v in result.report["task_vectors"]}
    if "svd_relative_error" in result.report:
        summary["max_svd_relative_error"] = result.report["svd_relative_error"]["max"]
    print(f"wrote {result.output_dir}")
    print(json.dumps(summary, indent=2))
    if args.push_to_hub:
        from delta_trl.hub import push_to_hub

        retry = (
            f'python -c "from delta_trl.hub import push_to_hub; print(push_to_hub({str(result.output_dir)!r}, '
            f'{args.push_to_hub!r}{", base_model=" + repr(card_base) if card_base else ""}))"'
        )
        url = published(
            result.output_dir,
            args.push_to_hub,
            lambda: push_to_hub(result.output_dir, args.push_to_hub, base_model=card_base, private=args.private),
            retry,
        )
        print(url)
    return 0
