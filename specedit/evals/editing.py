"""Run methods of an editing pipeline over a benchmark suite (GEdit-Bench, ImgEdit-Bench): sharded over torchrun
ranks, resumable, images saved where the official scorers look for them.

Per (method, item) the run saves the edited image at ``out/<method>/<suite layout>`` (GEdit:
``fullset/<task_type>/<en|cn>/<key>.png``, ImgEdit: ``<key>.png``) and appends a record to
``out/records.jsonl``: the item (key, category, language), its seed, the cost (NFE, transformer TFLOPs of the
sampling, wall time of the whole edit and of the sampling), the verifier's expanded fraction, and the judge-free
fidelity to the reference method's image of the same item (``specedit.evals.fidelity``). ``out/run.json``
holds the setup (suite, data, model, reference, seed, size); a rerun with another setup is refused.

Every item uses the same seed (``seed``, default 0), recorded in each record. The reference method (default
``baseline-50``) runs for every item, first: its images are the full-step row of the tables and the fidelity
reference. An image is written (temporary file, then rename) before its record, and a record is what marks
an item done, so a run killed at any point leaves no half-written file that counts and a rerun redoes only
unrecorded edits. Each process first runs one untimed 2-step edit (allocations, kernel selection).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from specedit.evals import fidelity
from specedit.evals.items import BenchData, EditItem
from specedit.evals.runner import Dist, Log, Ranks, RecordStore, open_store, run_rounds
from specedit.toy import atomic

RECORDS, SETUP = "records.jsonl", "run.json"
REFERENCE = "baseline-50"
T = 1e12


def check_methods(methods: Sequence[str], known: Mapping, *, reference: str) -> list[str]:
    """``methods`` with ``reference`` first and no repeats; unknown names are a one-line error."""
    names = list(dict.fromkeys([reference, *methods]))
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(known)}")
    return names


def check_keys(data: BenchData) -> None:
    """Item keys must be unique: they identify records and name files."""
    seen: set[str] = set()
    for item in data.items:
        if item.key in seen:
            raise ValueError(
                f"{data.name} item key {item.key!r} appears twice in {data.source or 'the data'}"
            )
        seen.add(item.key)


def _save_source(data: BenchData, item: EditItem, folder: Path) -> None:
    """The source copy the official scorer reads beside the outputs (GEdit's ``<key>_SRCIMG.png``), once."""
    if data.source_layout is None:
        return
    path = folder / data.source_layout(item)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.save_image(item.meta.get("load_srcimg", item.load)(), path)


def record(item: EditItem, index: int, method: str, seed: int, image: str, out) -> dict:
    """The cost part of a record (fidelity is added by the caller)."""
    flops = out.flops()
    verdict = out.result.verdict
    return {
        "method": method, "key": item.key, "index": index, "category": item.category,
        "language": item.language, "seed": seed, "image": image, "width": out.image.width,
        "height": out.image.height, "nfe": out.result.nfe, "tflops": flops.get("sampling", flops["total"]) / T,
        "latency_s": out.seconds["total"], "sample_s": out.seconds["sample"],
        "expanded_fraction": None if verdict is None else float(verdict.fraction),
        **{k: v for k, v in item.meta.items() if isinstance(v, (bool, int, float, str))},
    }  # fmt: skip


def edit_item(pipe, data: BenchData, item: EditItem, index: int, methods: Sequence[str], out: Path, *,
              seed: int, done: set, options: Mapping, log: Log = None) -> list[dict]:  # fmt: skip
    """Records of ``item`` for the methods (the reference first) not in ``done``; the reference runs again
    only when its image is missing (an image alone, without its record, is redone)."""
    todo = [m for m in methods if (m, item.key) not in done]
    if not todo:
        return []
    source = item.load()
    reference, ref_path = methods[0], data.output_path(out, methods[0], item)
    ref_image, working = None, None
    records = []
    for m in [reference, *[m for m in todo if m != reference]]:
        if m == reference and m not in todo:
            ref_image = Image.open(ref_path).convert("RGB")
            continue
        o = pipe.edit(source, item.instruction, method=m, seed=seed, **options)
        image = o.image
        path = data.output_path(out, m, item)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_source(data, item, out / m)
        atomic.save_image(image, path)
        working = o.reference if working is None else working
        if m == reference:
            ref_image = image
        rec = record(item, index, m, seed, path.relative_to(out).as_posix(), o)
        region = fidelity.changed_region(ref_image, working)
        rec.update(fidelity.fidelity(image, ref_image, region), changed_fraction=float(region.float().mean()))
        if o.mask is not None:
            rec.update(fidelity.mask_agreement(o.mask, region))
        if log:
            log(f"{item.key} {m}: {o.seconds['total']:.2f} s, psnr {rec['psnr']}")
        records.append(rec)
    return records


def run_suite(pipe, data: BenchData, methods: Sequence[str], out: str | os.PathLike, *, identity: Mapping,
              reference: str = REFERENCE, seed: int = 0, options: Mapping | None = None, dist: Dist | None = None,
              log: Log = None, known: Mapping | None = None) -> list[dict] | None:  # fmt: skip
    """Edit every item of ``data`` with ``methods`` (names of the pipeline family's presets, ``reference``
    added first) and return all records of ``out`` (earlier runs' included; ordered by method, then item) on
    rank 0, None on the other ranks. ``identity`` describes the model (name, dtype, LoRAs) for the setup check;
    ``options`` go to ``pipe.edit`` (height, width, true_cfg_scale, ...)."""
    from specedit.presets import methods as presets

    names = check_methods(methods, known if known is not None else presets(pipe.family), reference=reference)
    check_keys(data)
    out = atomic.check_folder(out)
    dist = dist or Dist.from_env()
    options = dict(options or {})
    setup = {"suite": data.name, "data": data.source, "model": dict(identity), "reference": reference,
             "seed": seed, "options": options}  # fmt: skip
    suite = {(m, item.key): i for m in names for i, item in enumerate(data.items)}
    make = lambda: RecordStore(out, setup, suite, id_field="key", records=RECORDS, setup_file=SETUP)
    device = getattr(pipe, "device", None) or dist.device()
    with Ranks(dist, device) as ranks:
        store, done = open_store(ranks, make)
        mine = [(i, data.items[i]) for i in dist.shard(len(data.items))]
        todo = [(i, it) for i, it in mine if any((m, it.key) not in done for m in names)]
        if done and log:
            log(f"{len(done)} records already in {out / RECORDS}: not run again")
        warm = []

        def step(j: int, work) -> list[dict]:
            i, item = work
            if not warm:  # one untimed short edit per process
                pipe.edit(item.load(), item.instruction, method="baseline", steps=2, seed=seed, **options)
                warm.append(True)
            return edit_item(pipe, data, item, i, names, out, seed=seed, done=done, options=options, log=log)

        with torch.no_grad():
            run_rounds(ranks, todo, step, store)
    if dist.rank != 0:
        return None
    order = {m: i for i, m in enumerate(names)}
    return sorted(store.records.values(), key=lambda r: (order[r["method"]], r["index"]))
