"""``delta-trl curvature``: estimate θ0's task-agnostic EK-FAC / K-FAC curvature once and cache it (docs/CURVATURE.md)."""

from __future__ import annotations

import argparse


EPILOG = """\
examples:
  # EK-FAC factors of the embedded SmolLM2-135M for LoRA on q_proj / v_proj, from a local text file
  delta-trl curvature --model embedded --dataset c4_sample.jsonl --target-modules q_proj v_proj \\
      --num-samples 10000 --max-length 256 --output curvature/smollm2-qv

  # plain K-FAC in bf16, from a Hub dataset, then share it
  delta-trl curvature --model org/model --dataset allenai/c4 --dataset-config en --split validation \\
      --estimator kfac --dtype bf16 --output curvature/model --push-to-hub me/model-curvature

Several processes split the samples and all-reduce the sums:
  torchrun --nproc_per_node 4 -m delta_trl.cli curvature --model ... --output ...
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "curvature",
        help="estimate and cache the base model's task-agnostic EK-FAC/K-FAC curvature (the DELTA penalty)",
        description="Estimate per-layer Kronecker factors of the GGN E_x[JᵀJ] of the base model's final hidden\n"
        "states at θ0 on a reference text set (one Gaussian probe per text) and write them, with their metadata\n"
        "and checksums, to a new folder (atomically). Trainers load the folder and check it against the model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="`embedded`, a local model folder or a Hub model id")
    parser.add_argument("--revision", default=None, help="model revision on the Hub")
    parser.add_argument(
        "--dataset",
        required=True,
        help="a .jsonl/.json/.csv/.txt file (one text per line for .txt) or a Hub dataset id",
    )
    parser.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset")
    parser.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    parser.add_argument("--text-column", default=None, help="column holding the texts (default: `text`)")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        required=True,
        metavar="NAME",
        help="LoRA target modules: names or suffixes (q_proj v_proj), or all-linear",
    )
    parser.add_argument("--num-samples", type=int, default=None, help="texts to use, from the start (default: all)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per text (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per pass, per process (default: %(default)s)")
    parser.add_argument("--estimator", choices=["ekfac", "kfac"], default="ekfac", help="(default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="storage dtype (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gaussian probes (default: %(default)s)")
    parser.add_argument("--output", "-o", required=True, help="new folder to write (must not exist, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the cache to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return parser


def _check_reference_file(args: argparse.Namespace) -> None:
    """A missing local file or a malformed line is named here, before `datasets` reads the file."""
    from pathlib import Path

    from delta_trl.data import looks_like_file, read_located_records

    if looks_like_file(args.dataset):
        read_located_records(Path(args.dataset))


def _load_reference(args: argparse.Namespace):
    from delta_trl.data import load_text_dataset

    return load_text_dataset(args.dataset, args.dataset_config, split=args.split)


def run(args: argparse.Namespace) -> int:
    from delta_trl.errors import user_errors

    with user_errors():
        return _curvature(args)


def _curvature(args: argparse.Namespace) -> int:
    import logging
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from delta_trl._utils import check_output_dir
    from delta_trl.curvature.cache import push_curvature_to_hub, save_curvature
    from delta_trl.curvature.estimation import estimate_curvature
    from delta_trl.embedded import load_model_and_tokenizer
    from delta_trl.errors import check_lora_targets, check_positive, model_skeleton, published, user_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_positive(
        {"--num-samples": args.num_samples, "--max-length": args.max_length, "--batch-size": args.batch_size}
    )
    check_output_dir(args.output, args.overwrite)  # before minutes of estimation, not after
    with user_errors(f"--dataset {args.dataset}"):
        _check_reference_file(args)
    target_modules = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    skeleton = model_skeleton(args.model, args.revision, "--model")  # names only: checked before loading weights
    check_lora_targets(skeleton, args.target_modules, "--target-modules")
    with user_errors(f"--dataset {args.dataset}"):
        reference = _load_reference(args)
    kwargs = {"revision": args.revision} if args.revision else {}
    kwargs["model_class"] = AutoModelForSeq2SeqLM if skeleton.config.is_encoder_decoder else AutoModelForCausalLM
    with user_errors(f"--model {args.model}", also=(ImportError,)):
        model, tokenizer = load_model_and_tokenizer(args.model, **kwargs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        # launched by torchrun: one process per device, samples split across them
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            model.to("cuda")
    elif torch.cuda.is_available():
        model.to("cuda")
    factors = estimate_curvature(
        model,
        tokenizer,
        reference,
        target_modules=target_modules,
        text_column=args.text_column,
        num_samples=args.num_samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        estimator=args.estimator,
        dtype=args.dtype,
        seed=args.seed,
    )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return 0
    save_curvature(factors, args.output, overwrite=args.overwrite)
    print(factors.format_size_report())
    print(f"written {args.output}")
    if distributed:
        torch.distributed.barrier()
    if args.push_to_hub:
        retry = (
            f'python -c "from delta_trl import push_curvature_to_hub; '
            f'print(push_curvature_to_hub({args.output!r}, {args.push_to_hub!r}))"'
        )
        push = lambda: push_curvature_to_hub(args.output, args.push_to_hub, private=args.private)  # noqa: E731
        print(published(args.output, args.push_to_hub, push, retry))
    return 0
