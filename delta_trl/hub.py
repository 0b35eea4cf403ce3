"""Sharing merged adapters and single task vectors on the Hugging Face Hub, with a model card.

The card (``README.md`` with YAML front matter: ``base_model``, ``library_name``, ``tags: [delta_trl,
task-arithmetic, …]``) names the base model, every task vector with its coefficient and training method (read from
each adapter's ``delta_trl.json``), the merge method and any measured results. The files to upload are first staged
in a folder (:func:`stage_for_hub`), so what :func:`push_to_hub` sends is exactly what a local export contains; the
source folder is never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

from ._utils import atomic_output_dir, read_delta_trl_metadata
from .adapter_io import REPO_ID


TAGS = ["delta_trl", "task-arithmetic", "lora"]


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
    if not base or not REPO_ID.match(base):
        # The Hub validates `base_model` in the card's metadata: it must be a repo id, not a local path.
        raise ValueError(
            f"The base model of {str(folder)!r} is {base!r}, not a hub repo id; pass base_model='owner/name' "
            "(--base-model) so the model card can name it."
        )
    return {"kind": kind, "base_model": base, "method": method, "task_vectors": vectors}


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
        folder: a trained adapter (a single task vector), or an output of :func:`delta_trl.merging.merge_adapters`.
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
        f"- **Base model:** `{info['base_model']}`",
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

    Hidden files are skipped; an existing ``README.md`` is replaced by the card. Written atomically.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder.")
    card = model_card(folder, repo_id=repo_id, base_model=base_model, results=results)
    with atomic_output_dir(destination, overwrite) as tmp:
        for path in folder.iterdir():
            if path.is_file() and not path.name.startswith(".") and path.name != "README.md":
                shutil.copy2(path, tmp / path.name)
        card.save(tmp / "README.md")
    return Path(destination)


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
