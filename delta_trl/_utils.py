"""Small private helpers shared by merging, diagnostics and hub code."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


# "owner/name": what the Hub accepts as a repository id (a local path of that shape takes precedence where it exists)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` on Linux (nothing changes), else set and restored once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file under the current umask (what ``open`` would create): ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask (what ``mkdir`` would create): ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then ``os.replace`` it into place (all or nothing).

    The file gets the mode a plain ``open`` would give it (``0o666 & ~umask``), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Raise if ``output_dir`` exists (and is not to be overwritten) or is a file; return it as a ``Path``."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"The output path {str(path)!r} exists and is a file; choose a folder path.")
    if path.exists() and not overwrite:
        raise ValueError(
            f"The output folder {str(path)!r} already exists. Choose a new folder or pass overwrite=True "
            "(`--overwrite` on the command line) to replace it."
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``output_dir`` in one ``os.replace``.

    A failure inside the block removes the temporary folder, so ``output_dir`` is either the previous content or the
    complete new content, never a partial write (see :func:`replace_dir`). Before the move, every folder in it gets
    the mode a plain ``mkdir`` would give it (``0o777 & ~umask``, not ``mkdtemp``'s private 0700) and every file the
    mode of a plain ``open`` (``0o666 & ~umask``; safetensors' ``save_file`` and ``mkstemp`` create 0600).
    """
    target = check_output_dir(output_dir, overwrite).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        apply_umask(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def apply_umask(folder: Path) -> None:
    """Give ``folder``, its sub-folders and executables ``0o777 & ~umask`` and its other files ``0o666 & ~umask``."""
    files, folders = file_mode(), dir_mode()
    folder.chmod(folders)
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), folders)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, folders if os.stat(path).st_mode & 0o111 else files)


def replace_dir(source: Path, target: Path) -> None:
    """Move the complete folder ``source`` to ``target`` (a sibling), replacing any existing ``target``.

    ``os.replace`` cannot replace a non-empty folder, so an existing ``target`` is first renamed into a hidden sibling,
    then ``source`` is renamed into place, and only then is the old content deleted: ``target`` is never a partial
    folder (between the two renames it is briefly absent), and if the second rename fails the old folder is put back.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(source, target)
    except BaseException:
        if old is not None:
            os.replace(old / target.name, target)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (non-finite floats become ``null`` so the file stays valid JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(data), indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def read_delta_trl_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``delta_trl.json`` written next to an adapter by the trainers (empty dict when absent)."""
    path = Path(folder) / "delta_trl.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); fix or delete it.") from err


def check_run_output_dir(output_dir: str | os.PathLike, *, overwrite: bool, resuming: bool) -> None:
    """Refuse to train into a non-empty folder unless told to (``overwrite``) or resuming a run in it."""
    path = Path(output_dir)
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise FileExistsError(
            f"{path} is not empty. Pass --overwrite_output to write into it, --resume_from_checkpoint to continue a "
            "run, or choose another --output_dir."
        )


def lora_config_from(model_args: Any) -> Any:
    """The LoRA config of TRL's ``ModelConfig`` (``--use_peft --lora_r ...``): DELTA always trains LoRA adapters."""
    from trl import get_peft_config

    if not model_args.use_peft:
        raise ValueError(
            "DELTA trains LoRA adapters: pass --use_peft (with --lora_r, --lora_alpha, --lora_target_modules)."
        )
    return get_peft_config(model_args)


def lock_for(path: str | os.PathLike) -> Any:
    """An inter-process ``filelock.FileLock`` guarding ``path``: the file ``.<name>.lock`` beside it.

    The lock file's folder is created; the lock is per process (ranks of one job are separate holders).
    """
    from filelock import FileLock

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.parent / f".{path.name}.lock")
