"""What a benchmark suite hands the runner: its edit items and where each method's output image goes.

An :class:`EditItem` is one edit of a suite (source image, instruction, category, language). A
:class:`BenchData` is a read suite: its items in the suite's own order and the folder layout that the suite's
official scorer reads, so images saved by the runner can be scored by the official scripts as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class EditItem:
    """One edit: ``key`` is unique within its suite and identifies its records (the suite's ``layout`` names its
    file); ``load`` opens the source image (RGB) that is edited; ``meta`` holds suite-specific fields (e.g.
    GEdit's ``intersection`` flag and official key)."""

    key: str
    instruction: str
    category: str
    load: Callable[[], Image.Image] = field(repr=False, compare=False)
    language: str = "en"
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class BenchData:
    """A read suite. ``name`` is "gedit" or "imgedit" (or another suite's name); ``layout(item)`` is the path
    of an item's output image relative to a method's folder (GEdit: ``fullset/<task_type>/<en|cn>/<key>.png``,
    ImgEdit: ``<key>.png``); ``source`` describes where the data was read from (a folder or a hub id).
    ``source_layout(item)``, where the official scorer needs the source image beside the outputs (GEdit's
    ``<key>_SRCIMG.png``), is that copy's path relative to a method's folder; the copy is
    ``item.meta["load_srcimg"]()`` when the suite gives one, else ``item.load()``."""

    name: str
    items: Sequence[EditItem]
    layout: Callable[[EditItem], str]
    source: str = ""
    source_layout: Callable[[EditItem], str] | None = None

    def output_path(self, out: str | os.PathLike, method: str, item: EditItem) -> Path:
        """Where ``method``'s image of ``item`` goes under the run folder ``out``: ``out/<method>/<layout>``."""
        return Path(out) / method / self.layout(item)

    def categories(self) -> list[str]:
        """The categories in first-seen order."""
        return list(dict.fromkeys(item.category for item in self.items))
