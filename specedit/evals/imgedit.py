"""ImgEdit-Bench's single-turn basic suite (Ye et al., arXiv 2505.20275) read into a :class:`BenchData`.

The suite is a JSON object mapping a key (``"1082"``) to ``{"id": "animal/000342021.jpg", "prompt": ...,
"edit_type": "adjust"}``: ``Benchmark/Basic/basic_edit.json`` in github.com/PKU-YuanGroup/ImgEdit (737 edits of
171 images). The source images come in ``Benchmark.tar`` of the hub dataset ``sysuyy/ImgEdit``; extracted, its
``Benchmark/singleturn/`` folder holds the ``<id>`` files and the suite, in the same format, as
``singleturn.json`` (the files that lmms-eval's ``lmms_eval/tasks/imgedit/prepare_dataset.py`` reads).

Edit types: the nine keys of the official judge prompts (``Benchmark/Basic/prompts.json``): add, adjust,
extract, replace, remove, background, style, compose, action. The first published ``basic_edit.json`` named
``adjust`` ``alter`` (renamed in the repo in June 2025); ``alter`` is read as the category ``adjust`` and the
JSON's own value is kept in ``meta["edit_type"]``.

The official scorer (``Benchmark/Basic/basic_bench.py``) opens ``<result_img_folder>/<key>.png`` for every
key and ``<origin_img_root>/<id>`` as the source: :func:`layout` is the flat ``<key>.png``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from models.loading import is_repo_id
from specedit.evals.gedit import snapshot_dataset
from specedit.evals.items import BenchData, EditItem

EDIT_TYPES = ("add", "adjust", "extract", "replace", "remove", "background", "style", "compose", "action")
RENAMED = {"alter": "adjust"}
JSON_NAMES = ("singleturn.json", "basic_edit.json")
FIELDS = ("id", "prompt", "edit_type")
HUB_PATTERNS = ["*singleturn/*", "*basic_edit.json"]
TAR_HINT = (
    "download Benchmark.tar from https://huggingface.co/datasets/sysuyy/ImgEdit and extract it (tar -xf)"
)


def read_imgedit(
    source: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    edit_types: Sequence[str] | None = None,
    revision: str | None = None,
) -> BenchData:
    """The basic suite from its JSON file, a folder holding it (the extracted ``Benchmark/singleturn``, or a
    folder above it), or a hub dataset id holding the extracted folder (its ``singleturn/`` files and any
    ``basic_edit.json`` are downloaded, at ``revision``).

    ``images``: the folder the JSON's ``id`` paths are relative to (default: the JSON's folder);
    ``edit_types``: the categories kept (default all nine).
    """
    wanted = _check_types(edit_types)
    path, where = _locate(source, revision)
    root = _image_root(path, images)
    entries = _load_json(path)
    items = [_item(key, entry, root, path) for key, entry in entries.items()]
    items = [item for item in items if item.category in wanted]
    _check_images(items, root)
    return BenchData("imgedit", items, layout, source=where)


def layout(item: EditItem) -> str:
    """The edited image's path under a method folder, as the official scorer reads it."""
    return f"{item.key}.png"


def _check_types(edit_types: Sequence[str] | None) -> tuple[str, ...]:
    if edit_types is None:
        return EDIT_TYPES
    edit_types = (edit_types,) if isinstance(edit_types, str) else tuple(edit_types)
    for t in edit_types:
        if t not in EDIT_TYPES:
            raise ValueError(f"unknown ImgEdit edit type {t!r} (known: {', '.join(EDIT_TYPES)})")
    return edit_types


def _locate(source: str | os.PathLike, revision: str | None) -> tuple[Path, str]:
    """The suite's JSON file and a description of where it came from."""
    s = os.fspath(source)
    p = Path(s)
    if p.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids, not to the local path {s}")
        found = p if p.is_file() else find_json(p)
        if found is None:
            raise FileNotFoundError(
                f"no {' or '.join(JSON_NAMES)} in {p} (nor in its singleturn/ or Benchmark/singleturn/): {TAR_HINT}"
            )
        return found, s
    if s.endswith(".json"):
        raise FileNotFoundError(f"ImgEdit JSON {s} does not exist")
    if not is_repo_id(s):
        raise FileNotFoundError(f"ImgEdit source {s!r} is neither an existing path nor a hub dataset id")
    folder = snapshot_dataset(s, revision, HUB_PATTERNS)
    found = next((f for name in JSON_NAMES for f in sorted(folder.rglob(name))), None)
    if found is None:
        raise FileNotFoundError(
            f"hub dataset {s} holds no extracted ImgEdit benchmark: {TAR_HINT}, pass its folder"
        )
    return found, s + (f"@{revision}" if revision else "")


def find_json(folder: Path) -> Path | None:
    """The suite JSON in ``folder``, its ``singleturn/`` or its ``Benchmark/singleturn/``, if any."""
    for sub in (folder, folder / "singleturn", folder / "Benchmark" / "singleturn"):
        for name in JSON_NAMES:
            if (sub / name).is_file():
                return sub / name
    return None


def _image_root(path: Path, images: str | os.PathLike | None) -> Path:
    if images is None:
        return path.parent
    if not Path(images).is_dir():
        raise FileNotFoundError(f"ImgEdit image folder {images} does not exist")
    return Path(images)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping keys to edits, got a {type(data).__name__}")
    return data


def _item(key: str, entry: Any, root: Path, path: Path) -> EditItem:
    where = f"ImgEdit entry {key!r} in {path}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, not an object with {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if not isinstance(entry.get(f), str) or not entry[f]]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)} (or they are not non-empty strings)")
    if not key or "/" in key or "\\" in key or key in (".", ".."):
        raise ValueError(f"{where}: the key cannot name a file")
    category = RENAMED.get(entry["edit_type"], entry["edit_type"])
    if category not in EDIT_TYPES:
        raise ValueError(
            f"{where}: unknown edit_type {entry['edit_type']!r} (known: {', '.join(EDIT_TYPES)})"
        )
    meta = {"official_key": key, "image_id": entry["id"], "edit_type": entry["edit_type"]}
    return EditItem(key, entry["prompt"], category, ImageFile(root / entry["id"], key), meta=meta)


def _check_images(items: Sequence[EditItem], root: Path) -> None:
    missing = [str(item.load.path) for item in items if not item.load.path.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(items)} ImgEdit source images missing under {root}: {shown} ({TAR_HINT})"
        )


@dataclass(frozen=True)
class ImageFile:
    """A source image file, opened (RGB) when called; ``key`` names the item in errors."""

    path: Path
    key: str

    def __call__(self) -> Image.Image:
        try:
            img = Image.open(self.path)
            img.load()
        except (OSError, ValueError) as e:
            raise ValueError(
                f"ImgEdit item {self.key!r}: {self.path} does not decode as an image ({e})"
            ) from e
        return img.convert("RGB")
