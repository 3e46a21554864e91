"""Files that long runs write: whole or not at all, and checkable afterwards.

Every writer here writes a temporary sibling (``.NAME.tmp-PID``), flushes it to disk and moves it into place
with ``os.replace``, so a kill at any moment leaves the previous version or the new one, never a part of one.
``replace_folder`` does the same for a folder written as a set; ``append_line`` adds one JSON line at a time
(flushed and fsynced), and ``read_lines`` drops a last line that a kill cut short.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name next to ``path`` for this process: ``.NAME.TAG-PID``."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> Path:
    """Flush the finished file ``tmp`` to disk and move it to ``path`` in one rename."""
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _write(path: str | os.PathLike, writer) -> Path:
    """Call ``writer(tmp)`` on a temporary sibling of ``path``, then move it into place (removed on errors)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        writer(tmp)
        return _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """A safetensors file of ``tensors`` (moved to the CPU, contiguous); never pickled."""
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _write(path, lambda tmp: save_file(state, str(tmp)))


def save_image(image, path: str | os.PathLike) -> Path:
    """A PNG of a PIL image."""
    return _write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_figure(figure, path: str | os.PathLike, **kw) -> Path:
    """A matplotlib figure in the format of ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _write(path, lambda tmp: figure.savefig(tmp, format=fmt, **kw))


def replace_folder(tmp: Path, path: Path) -> Path:
    """Move the finished folder ``tmp`` to ``path``. An existing ``path`` is first renamed aside and deleted
    after, so ``path`` is at every moment the old folder, the new one, or (between the two renames) absent
    with the old one intact next to it."""
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    _fsync_dir(tmp)
    old = None
    if path.exists():
        old = temp_sibling(path, "old")
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(folder: str | os.PathLike, owned: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Tidy what killed writers left in ``folder``: temporary siblings (``.NAME.tmp-PID``) of names ``owned``
    accepts, whose process is gone, are deleted; an old folder renamed aside (``.NAME.old-PID``) goes back to
    NAME when NAME is missing (a kill between the two renames of :func:`replace_folder`), else is deleted.
    Returns the names it handled."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    handled = []
    for entry in folder.iterdir():
        m = STALE.fullmatch(entry.name)
        if m is None or not owned(m["name"]) or _alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["tag"] == "old" and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        handled.append(entry.name)
    return handled


STALE = re.compile(r"\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)")


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as a Path, once it is known to be a folder or creatable as one (no part of it is a file)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            return path
        if p.exists():
            where = "" if p == path else f": {p}"
            raise ValueError(f"{what} {path}{where} is a file, not a folder")
    return path


def append_line(f, obj) -> None:
    """One JSON line appended to the open text file ``f``, flushed and fsynced (on disk when this returns)."""
    f.write(json.dumps(obj) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_lines(path: str | os.PathLike) -> list[dict]:
    """The JSON lines of ``path`` ([] when there is none). A last line without its newline (a write cut short
    by a kill) is dropped from the file; any other unreadable line is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for i, line in enumerate(data[:end].decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i} is not valid JSON ({e.msg})") from None
    return rows
