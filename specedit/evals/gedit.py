"""GEdit-Bench (Step1X-Edit, arXiv 2504.17761) read into a :class:`BenchData`.

The data (hub dataset ``stepfun-ai/GEdit-Bench``, split ``train``) has one row per edit and instruction
language: 606 edits, each with an English and a Chinese instruction (1212 rows). Its columns, as listed in
``GEdit-Bench/generate_image_example.py`` of github.com/stepfun-ai/Step1X-Edit: ``key``, ``task_type`` (11
types), ``instruction``, ``instruction_language`` (``en`` / ``cn``), ``input_image`` (the source downsized to
about 512 x 512 pixels), ``input_image_raw`` (the source as collected) and ``Intersection_exist`` (bool). The
images are `datasets` Image features: a struct ``{bytes, path}`` holding the encoded file. The hub repo keeps
the split as Arrow files (its card lists the format "arrow"); parquet copies (the hub's automatic export at
``revision="refs/convert/parquet"``, mirrors) hold the same columns. Both formats are read here; images are
decoded only when an item's ``load`` is called.

What the official scorer reads (``test_gedit_score.py`` and ``calculate_statistics.py`` in the same folder):

- ``<results>/<method>/fullset/<task_type>/<instruction_language>/<key>.png``, the edited image, and
  ``<key>_SRCIMG.png`` beside it, the ``input_image`` column saved as PNG; an item missing either file is
  skipped. The edited image is resized to the SRCIMG size before the judge sees the pair.
- Only ``fullset/`` exists on disk: the intersection subset is the rows whose ``Intersection_exist`` is true,
  averaged separately from the same per-row scores. :func:`layout` therefore always starts with ``fullset/``.

A key can appear in both languages (the scorer's paths keep the two apart by the language folder), so an
item's ``key`` here is ``<language>/<key>`` (unique within the suite; the runner identifies records by it)
while its output file is named by the official key, kept in ``meta["official_key"]``. ``meta["intersection"]``
is the row's ``Intersection_exist`` flag; ``meta["load_srcimg"]`` opens its ``input_image`` (the SRCIMG).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from models.loading import is_repo_id
from specedit.evals.items import BenchData, EditItem

GEDIT_HUB_ID = "stepfun-ai/GEdit-Bench"
LANGUAGES = ("en", "cn")
SUBSETS = ("fullset", "intersection")
IMAGE_COLUMNS = {"raw": "input_image_raw", "downsized": "input_image"}
COLUMNS = (
    "key", "task_type", "instruction", "instruction_language", "input_image", "input_image_raw",
    "Intersection_exist",
)  # fmt: skip
TEXT_COLUMNS = ("key", "task_type", "instruction", "instruction_language", "Intersection_exist")
# The task types the official scorer iterates over (GROUPS in test_gedit_score.py).
TASK_TYPES = (
    "background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
    "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer",
)  # fmt: skip
HUB_PATTERNS = ["*.parquet", "*.arrow"]


def read_gedit(
    source: str | os.PathLike = GEDIT_HUB_ID,
    *,
    languages: Sequence[str] = LANGUAGES,
    subset: str = "fullset",
    image: str = "raw",
    revision: str | None = None,
) -> BenchData:
    """GEdit-Bench from a folder (the parquet or Arrow files anywhere below it), one data file, or a hub
    dataset id (only its ``*.parquet`` / ``*.arrow`` files are downloaded, at ``revision``).

    ``languages``: instruction languages kept (``en``, ``cn``); ``subset``: ``"fullset"`` or
    ``"intersection"`` (the rows flagged ``Intersection_exist``); ``image``: the source each item loads,
    ``"raw"`` (``input_image_raw``, what the official generation example resizes and edits) or
    ``"downsized"`` (``input_image``, the scorer's SRCIMG).
    """
    languages = check_options(languages, subset, image)
    _pyarrow()
    folder, where = _resolve(source, revision)
    items = []
    for path in data_files(folder):
        items += _file_items(path, languages, subset, IMAGE_COLUMNS[image])
    _check_unique(items, where)
    return BenchData("gedit", items, layout, source=where, source_layout=srcimg_layout)


def layout(item: EditItem) -> str:
    """The edited image's path under a method folder, as the official scorer reads it."""
    return f"fullset/{item.category}/{item.language}/{item.meta['official_key']}.png"


def srcimg_layout(item: EditItem) -> str:
    """The scorer's source image beside the edit: ``<key>_SRCIMG.png`` (``meta["load_srcimg"]`` opens it)."""
    return f"fullset/{item.category}/{item.language}/{item.meta['official_key']}_SRCIMG.png"


def check_options(languages: Sequence[str], subset: str, image: str) -> tuple[str, ...]:
    """The languages as a tuple; unknown languages, subsets or image choices raise."""
    languages = (languages,) if isinstance(languages, str) else tuple(languages)
    for lang in languages:
        if lang not in LANGUAGES:
            raise ValueError(
                f"unknown GEdit language {lang!r} (the dataset's languages: {', '.join(LANGUAGES)})"
            )
    if not languages:
        raise ValueError("no GEdit language chosen (pass some of: en, cn)")
    if subset not in SUBSETS:
        raise ValueError(f"unknown GEdit subset {subset!r} (choose fullset or intersection)")
    if image not in IMAGE_COLUMNS:
        raise ValueError(f"unknown GEdit image {image!r} (choose raw or downsized)")
    return languages


def data_files(path: str | os.PathLike) -> list[Path]:
    """The data files of a folder (parquet if any, else Arrow files other than `datasets` cache files), or
    the path itself when it is one file."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in (".parquet", ".arrow"):
            raise ValueError(f"{p} is not a GEdit-Bench data file (.parquet or .arrow)")
        return [p]
    found = sorted(p.rglob("*.parquet"))
    found = found or sorted(f for f in p.rglob("*.arrow") if not f.name.startswith("cache-"))
    if not found:
        raise FileNotFoundError(f"no GEdit-Bench parquet or arrow files under {p}")
    return found


def snapshot_dataset(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """A hub dataset's files matching ``patterns``, downloaded to the hub cache; the folder."""
    from models.loading import download

    return download(repo_id, patterns, repo_type="dataset", revision=revision)


def _resolve(source: str | os.PathLike, revision: str | None) -> tuple[Path, str]:
    s = os.fspath(source)
    if Path(s).exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids, not to the local path {s}")
        return Path(s), s
    if not is_repo_id(s):
        raise FileNotFoundError(f"GEdit-Bench source {s!r} is neither an existing path nor a hub dataset id")
    return snapshot_dataset(s, revision, HUB_PATTERNS), s + (f"@{revision}" if revision else "")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise ImportError("reading GEdit-Bench needs pyarrow: pip install 'specedit[bench]'") from e
    return pa


def _arrow_table(path: Path):
    """An Arrow file memory-mapped: the IPC stream format `datasets` writes, or the IPC file format."""
    pa = _pyarrow()
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid:
        pass
    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path} is not an Arrow IPC file ({e})") from e


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The text columns of a data file as rows, after checking that every official column is there."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        try:
            names = pq.read_schema(path).names
        except pa.ArrowException as e:
            raise ValueError(f"{path} is not a readable parquet file ({e})") from e
        _check_columns(names, path)
        return pq.read_table(path, columns=list(TEXT_COLUMNS)).to_pylist()
    table = _arrow_table(path)
    _check_columns(table.schema.names, path)
    return table.select(list(TEXT_COLUMNS)).to_pylist()


def _check_columns(names: Sequence[str], path: Path) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path} lacks the GEdit-Bench columns {', '.join(missing)}")


def _file_items(path: Path, languages: tuple[str, ...], subset: str, column: str) -> list[EditItem]:
    items = []
    for row, r in enumerate(_read_rows(path)):
        _check_row(r, row, path)
        if r["instruction_language"] not in languages:
            continue
        if subset == "intersection" and not r["Intersection_exist"]:
            continue
        items.append(_item(r, row, path, column))
    return items


def _check_row(r: dict[str, Any], row: int, path: Path) -> None:
    where = f"GEdit row {row} of {path}"
    for name in ("key", "task_type", "instruction"):
        if not isinstance(r[name], str) or not r[name]:
            raise ValueError(f"{where}: {name} is {r[name]!r}, not a non-empty string")
    for name in ("key", "task_type"):
        if "/" in r[name] or "\\" in r[name] or r[name] in (".", ".."):
            raise ValueError(f"{where}: {name} {r[name]!r} cannot name a file or folder")
    if r["instruction_language"] not in LANGUAGES:
        raise ValueError(
            f"{where}: unknown instruction_language {r['instruction_language']!r} (expected en or cn)"
        )


def _item(r: dict[str, Any], row: int, path: Path, column: str) -> EditItem:
    lang, key = r["instruction_language"], r["key"]
    uid = f"{lang}/{key}"
    meta = {
        "official_key": key,
        "intersection": bool(r["Intersection_exist"]),
        "load_srcimg": ImageCell(path, row, "input_image", uid),
    }
    load = ImageCell(path, row, column, uid)
    return EditItem(uid, r["instruction"], r["task_type"], load, language=lang, meta=meta)


def _check_unique(items: Sequence[EditItem], where: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.key in seen:
            raise ValueError(
                f"GEdit key {item.meta['official_key']!r} ({item.language}) appears twice in {where}"
            )
        seen.add(item.key)


@dataclass(frozen=True)
class ImageCell:
    """One image cell of a data file (row ``row`` of ``column``), read and decoded (RGB) when called; ``key``
    names the item in errors."""

    path: Path
    row: int
    column: str
    key: str

    def __call__(self) -> Image.Image:
        cell = _read_cell(self.path, self.row, self.column)
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            raise ValueError(
                f"GEdit item {self.key!r}: no image bytes in column {self.column} of {self.path}"
            )
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (OSError, ValueError) as e:
            raise ValueError(
                f"GEdit item {self.key!r}: column {self.column} of {self.path} does not decode as an image ({e})"
            ) from e
        return img.convert("RGB")


def _read_cell(path: Path, row: int, column: str) -> Any:
    """One cell, reading only its row group (parquet) or through a memory map (Arrow)."""
    if path.suffix != ".parquet":
        return _arrow_table(path).column(column)[row].as_py()
    _pyarrow()
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        if row < n:
            return pf.read_row_group(group, columns=[column]).column(0)[row].as_py()
        row -= n
    raise IndexError(f"{path} has fewer rows than the item's row")
