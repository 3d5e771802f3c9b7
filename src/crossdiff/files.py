"""Writing and checking files so that a kill, a full disk or a flipped bit never goes unnoticed.

Every stage writes through these helpers:

* :func:`write_text_atomic` / :func:`write_json_atomic` / :func:`write_atomic` (any writer,
  such as ``DataFrame.to_parquet``): readers see the old file or the new one, whole, never a
  mix (temporary file, fsync, rename); :func:`remove_stray_temporaries` removes what a kill
  left;
* :func:`sha256_file`: the checksum recorded beside weights and checked where they are read;
* :func:`share_like_umask`: files written by libraries that create them private (safetensors
  writes 0600) get the permissions an ordinary file would have;
* :func:`load_tensors`: pickled states load as tensors and plain data only, never code;
* :func:`write_error` / :func:`ensure_output_folder`: a full disk, a read-only folder or an
  output path that is a file become one line that says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from crossdiff.errors import CrossdiffError, first_line

TMP_SUFFIX = ".tmp"


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see either the old or the new file, whole."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:  # not the locale's: the files travel between machines
            f.write(text)

    write_atomic(path, write)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Replace ``path`` by what ``write(tmp)`` writes to a temporary file beside it (fsynced,
    then renamed): readers see the old file or the new one, whole. A kill leaves at most the
    temporary, which :func:`remove_stray_temporaries` removes."""
    path = Path(path)
    # A temporary name of its own per writer: ranks that finish together all write the
    # merged manifest, and a shared name would let one rank rename another's half-written file.
    tmp = path.with_name(f"{uuid.uuid4().hex[:12]}.{path.name}{TMP_SUFFIX}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        rename(tmp, path)
    except CrossdiffError:
        raise
    except Exception as err:  # OSError, or a library's own error wrapping one (safetensors on a full disk)
        if not isinstance(err, OSError) and not is_disk_full(err):
            raise
        raise write_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def rename(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` (a file or a folder, replacing a file there) and make the
    new name durable. The one place crossdiff renames: a grep test keeps it so, and every
    write that must appear whole goes through here."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data, the one encoding of crossdiff's JSON files: NaN becomes null
    (any JSON reader loads it), numpy scalars plain numbers, tuples lists, keys strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a numpy scalar (no numpy import here)
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def remove_stray_temporaries(folder: Path, name: str) -> None:
    """Delete temporary files of ``name`` that a killed writer left in ``folder``.

    Only for a folder with a single writer (the caller holds its lock)."""
    for stray in Path(folder).glob(f"*.{name}{TMP_SUFFIX}"):
        stray.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_mismatch(name: str, record: str) -> str:
    """What to say when file ``name`` and the sha256 that file ``record`` holds for it differ.

    The checksum proves only that the two disagree: the data file may be intact and the
    record edited or damaged, so the message blames neither alone."""
    return f"{name} does not match the sha256 recorded in {record}: the file or {record} is damaged"


def sha256_stream(f: Any, chunk: int = 1 << 22) -> str:
    """sha256 of the rest of binary file ``f`` (from its position), read through a memory
    map: no Python buffer is allocated, whatever the file size."""
    digest = hashlib.sha256()
    start, size = f.tell(), os.fstat(f.fileno()).st_size
    if size > start:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                for offset in range(start, size, chunk):
                    digest.update(view[offset : offset + chunk])
            finally:
                view.release()
    f.seek(size)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_umask(path: Path) -> None:
    """Give ``path`` the permissions a plain ``open(path, "w")`` would have (0666 & ~umask)."""
    os.chmod(path, 0o666 & ~_umask())


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (an OSError, or a library's wrapper of one) reports a full disk or quota."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    # safetensors (Rust) reports `Os { code: 28, kind: StorageFull, ... }`; sqlite "database or disk is full".
    return any(s in text for s in ("StorageFull", "code: 28,", "No space left", "disk is full", "QuotaExceeded"))


def write_error(path: Path, err: BaseException) -> CrossdiffError:
    """One line for a failed write of ``path``."""
    if is_disk_full(err):
        return CrossdiffError(f"disk full while writing {path}; free space and rerun the same command to resume")
    if isinstance(err, PermissionError) or "Permission denied" in str(err) or "PermissionDenied" in str(err):
        return CrossdiffError(f"cannot write {path}: permission denied")
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
    return CrossdiffError(f"cannot write {path}: {reason}")


def ensure_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) or say in one line why it cannot be an output folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CrossdiffError(f"{what} {path} is a file, not a folder; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file
        raise CrossdiffError(f"cannot create {what} {path}: a part of that path is a file") from None
    except OSError as err:
        raise write_error(path, err) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CrossdiffError(f"cannot write {what} {path}: permission denied")
    return path


def read_error(path: Path, err: BaseException) -> CrossdiffError:
    """One line for a failed read of ``path``, saying "permission denied" when it is that."""
    if isinstance(err, PermissionError):
        return CrossdiffError(f"cannot read {path}: permission denied")
    if isinstance(err, FileNotFoundError):
        return CrossdiffError(f"{path} is missing")
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
    return CrossdiffError(f"cannot read {path}: {reason}")


# ----------------------------------------------------------------------------- pickled tensors
def load_tensors(path: Path) -> Any:
    """``torch.load`` of ``path`` with ``weights_only=True``: tensors and plain data only.

    Checkpoints and training states travel between machines and people; a pickle that names
    any other Python object could run code while it loads, so it is refused in one line,
    as is a file that is damaged or not PyTorch's."""
    import torch  # deferred: CLI modules import this module, and their --help must not load torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise read_error(path, err) from None
    except Exception as err:  # noqa: BLE001 - torch raises anything from UnpicklingError to RuntimeError
        text = str(err)
        if "Weights only load failed" not in text:
            raise CrossdiffError(f"cannot read {path}: {first_line(err)}") from None
        # torch's first lines advise loading the file anyway; the reason is the unpickler's line.
        named = next((line.split("WeightsUnpickler error:")[-1].strip() for line in text.splitlines() if "GLOBAL" in line), None)
        if named is None:
            raise CrossdiffError(f"cannot read {path}: it is damaged or not a PyTorch file of tensors") from None
        raise CrossdiffError(f"refusing {path}: it names Python objects other than tensors, which could run code when "
                             f"loaded ({named.split('. Please use')[0].rstrip('.')}); load only files of tensors") from None


# ----------------------------------------------------------------------------- checksummed folders
CHECKSUMS = "checksums.json"


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file in ``folder`` in ``folder/checksums.json`` (write it last)."""
    folder = Path(folder)
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    write_json_atomic(folder / CHECKSUMS, {"sha256": sums})


def checksum_problem(folder: Path) -> str | None:
    """What is wrong with the files ``folder/checksums.json`` lists, or None if they all match.

    A folder without checksums.json (written before crossdiff recorded them) passes."""
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"has an unreadable {CHECKSUMS}"
    for name, expected in sorted(sums.items()):
        file = Path(folder) / name
        if not file.is_file():
            return f"is missing {name}"
        if sha256_file(file) != expected:
            return f"fails its checksum: {sha256_mismatch(name, CHECKSUMS)}"
    return None


# ----------------------------------------------------------------------------- folders replaced whole
def begin_staging(folder: Path) -> Path:
    """A fresh, empty folder beside ``folder`` to write its next version into.

    Also finishes a swap that a kill interrupted between its two renames (the new version
    was complete) and removes what an interrupted writer left. Caller holds the folder's lock.
    """
    folder = Path(folder)
    new, old = _staging_names(folder)
    folder_empty = not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
    if old.exists() and new.exists() and folder_empty:
        if folder.exists():
            folder.rmdir()
        rename(new, folder)
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    new.mkdir(parents=True)
    return new


def commit_staging(staged: Path, folder: Path) -> None:
    """Replace ``folder`` by the complete ``staged`` one: readers see the old or the new version
    (or, for an instant, none), never a mix of both."""
    folder = Path(folder)
    new, old = _staging_names(folder)
    assert Path(staged) == new
    if folder.exists():
        rename(folder, old)
    rename(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def _staging_names(folder: Path) -> tuple[Path, Path]:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.new", folder.parent / f".{folder.name}.old"
