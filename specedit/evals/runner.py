"""The suite runner's machinery, shared by the toy suite and the benchmark suites: torchrun sharding, rounds
that gather the ranks' records, and a resumable record store.

Under ``torchrun`` (RANK / WORLD_SIZE set) item i runs on rank i mod world; after each round (one item per
rank) rank 0 gathers the ranks' records and appends them to the store (``torch.distributed``, gloo on the
CPU, nccl on GPUs). A store is a JSON-lines file that grows by one flushed and fsynced line per record, beside
a setup file that says what wrote it; a rerun into the same folder skips the records already there, so a run
killed at any point (SIGKILL included) continues where it stopped and ends with the same records.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from specedit.toy import atomic

Log = Callable[[str], None] | None


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """From torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a single process when they are not set)."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        )

    def device(self, requested: str | None = None) -> torch.device:
        """``requested``, or this rank's GPU (cuda:LOCAL_RANK) when there is one, else the CPU."""
        if requested is not None:
            dev = torch.device(requested)
            if dev.type == "cuda" and dev.index is None and self.world > 1:
                dev = torch.device("cuda", self.local_rank)
            return dev
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def shard(self, n: int) -> list[int]:
        """The item indices of this rank: i with i mod world == rank."""
        return list(range(self.rank, n, self.world))

    @property
    def prefix(self) -> str:
        """A log-line prefix naming the rank (empty for one process)."""
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""


class Ranks:
    """Collectives over the ranks of ``dist`` (trivial for one process). Initialises ``torch.distributed``
    (gloo on the CPU, nccl on GPUs) for the duration of the ``with`` block when it is not yet."""

    def __init__(self, dist: Dist, device: torch.device | str):
        self.dist, self.device, self.owned = dist, torch.device(device), False

    def __enter__(self) -> Ranks:
        if self.dist.world > 1:
            import torch.distributed as td

            if not td.is_initialized():
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                td.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.owned = True
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            import torch.distributed as td

            td.destroy_process_group()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.dist.world == 1:
            return [obj]
        import torch.distributed as td

        parts: list = [None] * self.dist.world
        td.all_gather_object(parts, obj)
        return parts

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.dist.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]


def clean(obj):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


class RecordStore:
    """The records of one suite run in a folder: ``records`` (a JSON-lines file) grows by a line per record
    as each item finishes (flushed and fsynced, so a kill loses at most the item in progress), and ``setup``
    (a JSON file) holds what wrote them.

    A record is identified by (record["method"], record[id_field]); ``suite`` maps each identity the run may
    write to its item index. Opening a folder whose setup differs, or whose records are not all part of
    ``suite``, is a one-line error: a rerun only ever adds records."""

    def __init__(self, out: str | os.PathLike, setup: dict, suite: Mapping[tuple, int], *, id_field: str,
                 records: str, setup_file: str, owned: Iterable[str] = ()):  # fmt: skip
        out = atomic.check_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic.clean_stale(out, {records, setup_file, *owned}.__contains__)
        self.path, self.id_field = out / records, id_field
        check_setup(out / setup_file, setup, self.path)
        rows = atomic.read_lines(self.path)
        outside = [r for r in rows if suite.get(self.identity(r)) != r.get("index")]
        if outside:
            r = outside[0]
            raise ValueError(f"{self.path} holds {len(outside)} records outside this suite (e.g. {r.get('method')} "
                             f"on {id_field} {r.get(id_field)}): rerun with the items and methods that wrote them "
                             "(or more), or use a new --out")  # fmt: skip
        self.records = {self.identity(r): r for r in rows}

    def identity(self, record: Mapping) -> tuple:
        return record.get("method"), record.get(self.id_field)

    def append(self, records: Iterable[dict]) -> None:
        """Add ``records`` (made JSON-safe) to the file, each on disk before this returns."""
        with self.path.open("a") as f:
            for r in records:
                r = clean(r)
                atomic.append_line(f, r)
                self.records[self.identity(r)] = r


def check_setup(path: Path, setup: dict, records: Path) -> None:
    """Write ``setup`` to ``path``, or check that the one there matches it (one-line error)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in setup.items() if saved.get(k) != v]
        if diff:
            raise ValueError(
                f"{path.parent} holds records of another setup (differing: {'; '.join(diff)}): use a new --out"
            )
    elif records.is_file() and records.stat().st_size:
        raise ValueError(f"{records} has no {path.name} beside it (written by an older specedit): its records "
                         "cannot be matched to this setup; use a new --out")  # fmt: skip
    else:
        atomic.write_json(path, setup)


def open_store(ranks: Ranks, make: Callable[[], RecordStore] | None) -> tuple[RecordStore | None, set]:
    """Rank 0's store (``make()``; None without ``make`` and on the other ranks) and the finished record
    identities, the same on every rank; a folder that does not fit is an error on every rank."""
    if make is None:
        return None, set()
    store, error = None, None
    if ranks.dist.rank == 0:
        try:
            store = make()
        except ValueError as e:
            error = str(e)
    error, done = ranks.broadcast((error, set(store.records) if store else set()))
    if error:
        raise ValueError(error)
    return store, done


def run_rounds(ranks: Ranks, work: Sequence, step: Callable[[int, object], list[dict]],
               store: RecordStore | None) -> list[dict]:  # fmt: skip
    """Run ``step(j, work[j])`` over this rank's ``work`` in rounds of one item per rank; after each round
    rank 0 appends every rank's records to ``store``. Returns the records of this run (all ranks')."""
    new: list[dict] = []
    for j in range(max(ranks.gather(len(work)))):
        records = step(j, work[j]) if j < len(work) else []
        for part in ranks.gather(records):
            if store is not None:
                store.append(part)
            new += part
    return new
