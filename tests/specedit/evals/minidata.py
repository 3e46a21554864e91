"""Tiny synthetic GEdit-Bench and ImgEdit-Bench datasets in the official on-disk formats, for tests.

``write_gedit`` writes the GEdit-Bench columns (``key``, ``task_type``, ``instruction``,
``instruction_language``, ``input_image``, ``input_image_raw``, ``Intersection_exist``) with the images as
`datasets` Image structs ``{bytes, path}``: parquet shards ``data/train-0000i-of-0000n.parquet`` or Arrow IPC
stream files ``train/data-0000i-of-0000n.arrow`` (the format `datasets` writes). Every edit appears once per
language with the same key and images; the raw source is ``size`` and the downsized one half of it.

``write_imgedit`` writes the extracted ``Benchmark.tar`` layout: ``Benchmark/singleturn/singleturn.json``
(key -> ``{"id", "prompt", "edit_type"}``) and the JPEG sources at ``Benchmark/singleturn/<id>``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

GEDIT_TASKS = ("background_change", "subject-add", "text_change")
IMGEDIT_TYPES = ("add", "adjust", "extract", "replace", "remove", "background", "style", "compose", "action")
# image folders as in the official JSON: plain, with a space, and nested (compose/<topic>/<n>.jpg)
IMGEDIT_FOLDERS = ("animal", "daily object", "compose/human")
SIZE = (64, 48)


def colour(i: int) -> tuple[int, int, int]:
    """The solid colour of edit ``i``'s source image."""
    return (40 * i % 256, 255 - 30 * i % 256, 90)


def image_bytes(size: tuple[int, int], rgb: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt)
    return buf.getvalue()


def gedit_rows(n_per_lang: int = 3, languages: Sequence[str] = ("en", "cn"), size=SIZE) -> list[dict]:
    """The rows: edit i has the key ``f"{0xA0 + i:08x}"`` in every language, the task ``GEDIT_TASKS[i % 3]``,
    ``Intersection_exist`` on even i and solid ``colour(i)`` images."""
    small = (size[0] // 2, size[1] // 2)
    rows = []
    for lang in languages:
        for i in range(n_per_lang):
            rows.append({
                "task_type": GEDIT_TASKS[i % len(GEDIT_TASKS)], "key": f"{0xA0 + i:08x}",
                "instruction": f"edit {i} ({lang})", "instruction_language": lang,
                "input_image": {"bytes": image_bytes(small, colour(i)), "path": None},
                "input_image_raw": {"bytes": image_bytes(size, colour(i)), "path": None},
                "Intersection_exist": i % 2 == 0,
            })  # fmt: skip
    return rows


def gedit_schema(columns: Sequence[str] | None = None):
    """The Arrow schema of the GEdit-Bench columns (``columns``: a subset, in order)."""
    import pyarrow as pa

    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [
        ("task_type", pa.string()), ("key", pa.string()), ("instruction", pa.string()),
        ("instruction_language", pa.string()), ("input_image", img), ("input_image_raw", img),
        ("Intersection_exist", pa.bool_()),
    ]  # fmt: skip
    fields = [f for f in fields if columns is None or f[0] in columns]
    features = {
        name: {"_type": "Image"} if t == img else {"dtype": str(t), "_type": "Value"} for name, t in fields
    }
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=meta)


def write_rows(path: Path, rows: list[dict], fmt: str, columns: Sequence[str] | None = None) -> Path:
    """``rows`` as one parquet file or one Arrow IPC stream file (``columns``: a subset to write)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = gedit_schema(columns)
    table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=2)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table, max_chunksize=2)
    return path


def write_gedit(
    folder: str | Path,
    n_per_lang: int = 3,
    languages: Sequence[str] = ("en", "cn"),
    *,
    fmt: str = "parquet",
    shards: int = 1,
    size: tuple[int, int] = SIZE,
) -> Path:
    """A GEdit-Bench folder (``fmt``: ``"parquet"`` or ``"arrow"``, rows split over ``shards`` files)."""
    folder = Path(folder)
    rows = gedit_rows(n_per_lang, languages, size)
    per = -(-len(rows) // shards)
    for s in range(shards):
        name = (
            f"data/train-{s:05d}-of-{shards:05d}.parquet"
            if fmt == "parquet"
            else f"train/data-{s:05d}-of-{shards:05d}.arrow"
        )
        write_rows(folder / name, rows[s * per : (s + 1) * per], fmt)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")
    return folder


def imgedit_entries(n_per_type: int = 2, edit_types: Sequence[str] = IMGEDIT_TYPES) -> dict[str, dict]:
    """key -> {"id", "prompt", "edit_type"}; two edits share each source image (as in the official JSON)."""
    entries = {}
    for t, etype in enumerate(edit_types):
        for j in range(n_per_type):
            k = t * n_per_type + j
            folder = IMGEDIT_FOLDERS[k // 2 % len(IMGEDIT_FOLDERS)]
            entries[str(100 + k)] = {
                "id": f"{folder}/{k // 2:09d}.jpg",
                "prompt": f"{etype} edit {j}",
                "edit_type": etype,
            }
    return entries


def write_imgedit(
    folder: str | Path, n_per_type: int = 2, edit_types: Sequence[str] = IMGEDIT_TYPES, *, size=SIZE
) -> Path:
    """The extracted Benchmark.tar under ``folder``; returns its ``Benchmark/singleturn`` folder (the JSON's
    folder and the image root)."""
    root = Path(folder) / "Benchmark" / "singleturn"
    entries = imgedit_entries(n_per_type, edit_types)
    for i, rel in enumerate(dict.fromkeys(e["id"] for e in entries.values())):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour(i)).save(root / rel, format="JPEG")
    (root / "singleturn.json").write_text(json.dumps(entries, indent=4))
    return root
