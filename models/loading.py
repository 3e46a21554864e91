"""Safetensors checkpoints: memory-mapped reading, strict meta-device loading, local/hub resolution.

A checkpoint is a mapping from parameter name to tensor. Reading never unpickles anything: the safetensors
header is parsed here and each tensor is a zero-copy view into a private (copy-on-write) memory map of its
file. Loading builds the module on the ``meta`` device and assigns those views (or their dtype/device
conversions) with ``load_state_dict(strict=True, assign=True)``, so a native-dtype CPU load keeps exactly one
copy of the weights: the file's own pages.

Layouts differ between releases (BFL single files vs diffusers folders); a model file describes the
difference as a :class:`Remap` (target key -> source keys + a combine function) and the loader applies it
lazily, one tensor at a time, releasing source pages as it goes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_LISTED = 12  # keys shown per category in a mismatch error
_MAX_HEADER = 100_000_000  # bytes; the official safetensors library refuses larger headers too


class CheckpointError(ValueError):
    """A checkpoint that does not match the module it should load into (or is damaged)."""


# ----------------------------------------------------------------------------------------------- files
class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped; ``tensor(k)`` is a zero-copy view into the mapping.

    Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (``name -> {dtype, shape,
    data_offsets}`` plus an optional ``__metadata__``), then the data buffer; ``data_offsets`` are
    ``[begin, end)`` byte positions relative to the start of that buffer. Every entry is checked when the
    file is opened (dtype, shape, offsets inside the buffer, byte length = numel * itemsize, no two tensors
    sharing bytes), so a damaged header fails here, before any tensor is read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            n, header = _read_header(self.path, f, size)
            self._base = 8 + n
            self.metadata = header.pop("__metadata__", None) or {}
            data_size = size - self._base
            self._info: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
                key: _entry(self.path, key, info, data_size, size) for key, info in header.items()
            }
            _check_disjoint(self.path, self._info)
            # ACCESS_COPY: views are writable (copy-on-write) and never modify the file.
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
            if self._mm is not None:
                _note_mapping(self._mm, self.path, os.fstat(f.fileno()))

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._info[key][0]

    def tensor(self, key: str) -> Tensor:
        dtype, shape, start, end = self._info[key]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - start, offset=self._base + start)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (self._base + start) % itemsize:  # misaligned: view() needs alignment, so copy this one
            raw = raw.clone()
        return raw.view(dtype).reshape(shape)

    def release(self, key: str) -> None:
        """Drop the resident pages of ``key`` (after its data was copied elsewhere)."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, start, end = self._info[key]
        page = mmap.PAGESIZE
        lo = -(-(self._base + start) // page) * page  # only whole pages inside the tensor
        hi = (self._base + end) // page * page
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


# ------------------------------------------------------------------------------------ file-backed tensors
@dataclass(frozen=True)
class FileSpan:
    """The bytes of a tensor that is a view into the private memory map of a safetensors file opened here.

    The map covers the whole file from byte 0, so ``offset`` is both the position in the file and in the map.
    ``file_id`` is ``(st_dev, st_ino)`` of the file when it was mapped; ``address`` is the tensor's pointer.
    """

    path: Path
    offset: int
    nbytes: int
    file_id: tuple[int, int]
    address: int
    mapping: Callable[[], mmap.mmap | None] = field(repr=False, compare=False)  # weak reference


# (weak reference to the map, its address, its length, file path, (st_dev, st_ino)) of every file opened
_MAPPINGS: list[tuple[weakref.ref, int, int, Path, tuple[int, int]]] = []


def _note_mapping(mm: mmap.mmap, path: Path, st: os.stat_result) -> None:
    _MAPPINGS[:] = [m for m in _MAPPINGS if m[0]() is not None]
    address = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    _MAPPINGS.append((weakref.ref(mm), address, len(mm), path, (st.st_dev, st.st_ino)))


def file_span(t: Tensor) -> FileSpan | None:
    """Where ``t``'s bytes lie in a safetensors file opened by :class:`SafetensorsFile`, when ``t`` is a
    contiguous CPU tensor inside that file's (still open) memory map; None otherwise (a copy, a conversion,
    another device). Weights loaded in their stored dtype on the CPU are such views."""
    if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return None
    ptr, n = t.data_ptr(), t.numel() * t.element_size()
    for ref, address, length, path, file_id in _MAPPINGS:
        if address <= ptr and ptr + n <= address + length and ref() is not None:
            return FileSpan(path, ptr - address, n, file_id, ptr, ref)
    return None


def revert_pages(span: FileSpan) -> list[tuple[int, int]]:
    """Drop this process's private copies of the whole memory pages inside ``span``, so they read the file's
    bytes again (``MADV_DONTNEED`` on a private file mapping); returns the file byte ranges ``[lo, hi)`` of
    the span this did not cover: the partial pages at its ends, or all of it where madvise is unavailable.
    Pages shared with neighbouring tensors are never dropped."""
    mm = span.mapping()
    page = mmap.PAGESIZE
    lo = -(-span.offset // page) * page
    hi = (span.offset + span.nbytes) // page * page
    end = span.offset + span.nbytes
    if mm is None or not hasattr(mmap, "MADV_DONTNEED") or hi <= lo:
        return [(span.offset, end)]
    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    return [(a, b) for a, b in ((span.offset, lo), (hi, end)) if b > a]


def _read_header(path: Path, f, size: int) -> tuple[int, dict]:
    """The header length and the parsed JSON header object of an open safetensors file."""
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > _MAX_HEADER:
        raise CheckpointError(
            f"{path} is truncated or not a safetensors file: the header claims {n} bytes but the file "
            f"holds {size}. Delete it and download it again."
        )
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path} has a corrupt safetensors header (a {type(header).__name__}, not an object)"
        )
    return n, header


def _entry(
    path: Path, key: str, info, data_size: int, size: int
) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, checked against the ``data_size``-byte buffer."""
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{path}: tensor {key!r} has a malformed header entry (a {type(info).__name__})"
        )
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not _int_list(shape) or any(s < 0 for s in shape):
        raise CheckpointError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
    if not _int_list(offsets) or len(offsets) != 2:
        raise CheckpointError(
            f"{path}: tensor {key!r} has invalid data_offsets {offsets!r} (need [begin, end])"
        )
    begin, end = offsets
    if end < begin:
        raise CheckpointError(
            f"{path}: tensor {key!r} has reversed data_offsets [{begin}, {end}] (end < begin)"
        )
    if begin < 0:
        raise CheckpointError(
            f"{path}: tensor {key!r} has out-of-range data_offsets [{begin}, {end}] (negative)"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: tensor {key!r} needs bytes up to {size - data_size + end} "
            f"but the file holds {size}. The download was probably interrupted; delete the file and "
            "download it again."
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {key!r} spans {end - begin} bytes (data_offsets [{begin}, {end}]) but shape "
            f"{list(shape)} of {info['dtype']} needs {nbytes}"
        )
    return dtype, tuple(shape), begin, end


def _int_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def _check_disjoint(path: Path, info: Mapping[str, tuple[torch.dtype, tuple[int, ...], int, int]]) -> None:
    """Raise :class:`CheckpointError` when two non-empty tensors share bytes (safetensors forbids aliasing)."""
    spans = sorted((begin, end, key) for key, (_, _, begin, end) in info.items() if end > begin)
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(
                f"{path}: tensors {k0!r} and {k1!r} overlap (data_offsets [{b0}, {e0}] and [{b1}, {e1}]); "
                "every tensor needs its own bytes"
            )


class Checkpoint(Mapping):
    """Lazy ``name -> Tensor`` mapping over one file or a sharded index; values are zero-copy views."""

    def __init__(self, files: dict[str, SafetensorsFile], source: str):
        self._where = files
        self.source = source

    def __getitem__(self, key: str) -> Tensor:
        return self._where[key].tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: f.shape(k) for k, f in self._where.items()}

    def release(self, key: str) -> None:
        self._where[key].release(key)

    def dtypes(self) -> set[torch.dtype]:
        return {f.dtype(k) for k, f in self._where.items()}

    def metas(self) -> dict[str, Tensor]:
        """Each tensor's shape and dtype as a ``meta`` tensor (no data read)."""
        return {k: torch.empty(f.shape(k), dtype=f.dtype(k), device="meta") for k, f in self._where.items()}

    def file(self, key: str) -> str:
        """The file that holds ``key`` (the shard, for a sharded checkpoint)."""
        return str(self._where[key].path)

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of its file(s), merged (a later shard's entry wins)."""
        out: dict[str, str] = {}
        for f in dict.fromkeys(self._where.values()):
            out |= f.metadata
        return out


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a ``.safetensors`` file, a ``*.safetensors.index.json``, or a folder holding one of them."""
    p = Path(path)
    if p.is_dir():
        found = find_weights(p)
        if found is None:
            raise FileNotFoundError(f"no *.safetensors or *.safetensors.index.json in {p}")
        p = found
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.name.endswith(".index.json"):
        try:
            index = json.loads(p.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{p} is not a valid safetensors index (needs a 'weight_map'): {e}"
            ) from None
        shards: dict[str, SafetensorsFile] = {}
        for name in sorted(set(weight_map.values())):
            shard = p.parent / name
            if not shard.is_file():
                n_keys = sum(v == name for v in weight_map.values())
                raise FileNotFoundError(
                    f"shard {name} listed in {p} ({n_keys} tensors) is missing from {p.parent}; "
                    f"download it again (or the whole folder)"
                )
            shards[name] = SafetensorsFile(shard)
        files = {}
        for key, name in weight_map.items():
            if key not in shards[name]._info:
                raise CheckpointError(f"{p} maps {key!r} to {name}, but that shard does not contain it")
            files[key] = shards[name]
        return Checkpoint(files, source=str(p))
    f = SafetensorsFile(p)
    return Checkpoint(dict.fromkeys(f.keys(), f), source=str(p))


def find_weights(folder: Path) -> Path | None:
    """The index or the single safetensors file inside ``folder`` (an index wins)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} holds several safetensors indexes: {[i.name for i in indexes]}")
    if indexes:
        return indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) > 1:
        raise CheckpointError(
            f"{folder} holds several safetensors files and no index: {[f.name for f in files]}"
        )
    return files[0] if files else None


# ----------------------------------------------------------------------------------------------- remapping
@dataclass(frozen=True)
class Derived:
    """A target tensor computed from source tensors (e.g. q, k, v fused into qkv)."""

    sources: tuple[str, ...]
    combine: Callable[..., Tensor]


class Remap(Mapping):
    """A checkpoint seen through a key map: each target is a source key (renamed) or a :class:`Derived`."""

    def __init__(self, base: Checkpoint, plan: Mapping[str, str | Derived]):
        self.base, self.plan, self.source = base, dict(plan), base.source
        missing = {s for d in self.plan.values() for s in _sources(d)} - set(base)
        if missing:
            raise CheckpointError(
                f"{base.source} lacks {len(missing)} tensors needed for conversion: {_head(sorted(missing))}"
            )

    def __getitem__(self, key: str) -> Tensor:
        d = self.plan[key]
        if isinstance(d, str):
            return self.base[d]
        return d.combine(*(self.base[s] for s in d.sources))

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = self.base.shapes()
        out = {}
        for k, d in self.plan.items():
            if isinstance(d, str):
                out[k] = shapes[d]
            else:  # run the combine on meta tensors: shape only, no data touched
                out[k] = tuple(d.combine(*(torch.empty(shapes[s], device="meta") for s in d.sources)).shape)
        return out

    def release(self, key: str) -> None:
        for s in _sources(self.plan[key]):
            self.base.release(s)

    def metas(self) -> dict[str, Tensor]:
        """Each target's shape and dtype as a ``meta`` tensor (combines run on meta tensors: no data read)."""
        base = self.base.metas()
        return {
            k: base[d] if isinstance(d, str) else d.combine(*(base[s] for s in d.sources))
            for k, d in self.plan.items()
        }

    def file(self, key: str) -> str:
        """The file(s) holding the source tensors of ``key``."""
        return ", ".join(dict.fromkeys(self.base.file(s) for s in _sources(self.plan[key])))


def _sources(d: str | Derived) -> tuple[str, ...]:
    return (d,) if isinstance(d, str) else d.sources


def strip_prefix(ckpt: Checkpoint, prefix: str) -> Checkpoint | Remap:
    """Drop ``prefix`` from every key that has it (e.g. ComfyUI's ``model.diffusion_model.``)."""
    if not any(k.startswith(prefix) for k in ckpt):
        return ckpt
    return Remap(ckpt, {k.removeprefix(prefix): k for k in ckpt})


# ----------------------------------------------------------------------------------------------- loading
def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module without allocating (or initialising) any parameter."""
    with torch.device("meta"):
        return factory()


def check_keys(module: nn.Module, shapes: Mapping[str, Sequence[int]], source: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and wrong-shape keys, with counts."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(shapes[k])} vs model {expected[k]}"
        for k in set(expected) & set(shapes)
        if tuple(shapes[k]) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = [f"checkpoint {source} does not match {type(module).__name__}:"]
        for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"  {len(items)} {name}: {_head(items)}")
        raise CheckpointError("\n".join(parts))


def check_dtypes(module: nn.Module, ckpt: Checkpoint | Remap) -> None:
    """Raise :class:`CheckpointError` when a tensor's kind of dtype (floating, integer, bool, complex) differs
    from its parameter's: such a tensor cannot be loaded (or cast) into it. Floating widths may differ."""
    metas = ckpt.metas()
    bad = [
        (k, metas[k].dtype, t.dtype)
        for k, t in module.state_dict().items()
        if _dtype_kind(metas[k].dtype) != _dtype_kind(t.dtype)
    ]
    if bad:
        key, have, want = bad[0]
        more = f" (+{len(bad) - 1} more tensors of the wrong kind)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{ckpt.file(key)}: tensor {key!r} is {have}, which cannot be loaded into {type(module).__name__}'s "
            f"{want} parameter ({_dtype_kind(have)} data, {_dtype_kind(want)} parameter){more}"
        )


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def load_checkpoint(
    module: nn.Module,
    ckpt: Checkpoint | Remap,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Strictly load ``ckpt`` into a meta-built ``module`` with ``assign=True``; returns it in eval mode.

    Tensors are converted one at a time; a tensor that had to be copied (new dtype, other device, fused)
    releases its source pages immediately, so peak memory stays near one copy of the weights.
    """
    check_keys(module, ckpt.shapes(), ckpt.source)
    check_dtypes(module, ckpt)
    device = torch.device(device)
    state = {}
    for key in module.state_dict():
        src = ckpt[key]
        t = src
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to(device)
        if t.data_ptr() != src.data_ptr() or isinstance(ckpt, Remap) and not isinstance(ckpt.plan[key], str):
            ckpt.release(key)
        state[key] = t
    module.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(
            f"{type(module).__name__} still has meta tensors after loading: {_head(leftovers)}"
        )
    return module.eval()


def read_config(path: str | os.PathLike) -> dict:
    """The JSON object in a settings file (``config.json``, ``tokenizer_config.json``, ...); a ValueError
    names the file (and the line and column of a syntax error) when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}); it cannot be a JSON config"
        ) from None
    if not isinstance(config, dict):
        kind = _JSON_KINDS.get(type(config), type(config).__name__)
        raise ValueError(f"{path} must hold a JSON object ({{...}}) of settings, but it holds {kind}")
    return config


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
_JSON_KINDS[type(None)] = "null"


def _head(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


# ----------------------------------------------------------------------------------------------- hub
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(s: str) -> bool:
    return bool(_REPO_ID.match(s)) and not Path(s).exists()


def resolve(path_or_repo: str | os.PathLike, allow_patterns: list[str]) -> Path:
    """A local path as is, or a Hugging Face repo id downloaded (only ``allow_patterns``) to the hub cache.

    Gated repositories read the token from ``HF_TOKEN`` (or ``huggingface-cli login``).
    """
    s = os.fspath(path_or_repo)
    if Path(s).exists():
        return Path(s)
    if not is_repo_id(s):
        raise FileNotFoundError(f"{s!r} is neither an existing path nor a Hugging Face repo id ('org/name')")
    return download(s, allow_patterns)


def locate(
    path_or_repo: str | os.PathLike,
    subfolder: str,
    *,
    what: str,
    single_files: tuple[str, ...] = (),
    allow_file: bool = True,
    needs_config: bool = True,
) -> Path:
    """The weights behind a path, a repo root or a hub id: a component folder (config.json + safetensors) or a
    single ``.safetensors`` file (``single_files``: names looked for in a root, e.g. BFL's ``flux1-*.safetensors``).

    A hub id downloads only ``subfolder``'s json and safetensors files.
    """
    s = os.fspath(path_or_repo)
    p = Path(s)
    if not p.exists():
        if not is_repo_id(s):
            raise FileNotFoundError(f"{s!r} is neither an existing path nor a Hugging Face repo id")
        p = download(s, [f"{subfolder}/*.json", f"{subfolder}/*.safetensors"])
    if p.is_file():
        if not allow_file:
            raise ValueError(
                f"{p} is a file; pass the folder holding config.json and the safetensors weights"
            )
        if not p.name.endswith((".safetensors", ".safetensors.index.json")):
            raise ValueError(f"{p} is not a .safetensors file")
        return p
    if (not needs_config or (p / "config.json").is_file()) and any(p.glob("*.safetensors*")):
        return p
    for pattern in single_files:
        found = sorted(p.glob(pattern))
        if found:
            return found[0]
    if (p / subfolder).is_dir():
        return locate(p / subfolder, subfolder, what=what, allow_file=allow_file, needs_config=needs_config)
    expected = ", ".join([*single_files, "config.json + *.safetensors", f"or a {subfolder}/ subfolder"])
    raise FileNotFoundError(f"no {what} in {p}: expected {expected}")


def download(repo_id: str, allow_patterns: list[str], *, repo_type: str = "model",
             revision: str | None = None) -> Path:  # fmt: skip
    """The files of a hub repo (a model, or ``repo_type="dataset"``) matching ``allow_patterns``, downloaded to
    the hub cache; hub errors become one-line instructions (gated, not found, unreachable)."""
    from huggingface_hub import snapshot_download

    at = f"@{revision}" if revision else ""
    plain = repo_type == "model" and revision is None  # the hub's defaults: name nothing
    options = {} if plain else {"repo_type": repo_type, "revision": revision}
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, **options))
    except Exception as e:  # translate hub errors into instructions
        name = type(e).__name__
        status = getattr(getattr(e, "response", None), "status_code", None)
        if name == "GatedRepoError" or status in (401, 403):
            token = "HF_TOKEN is set but was refused" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
            raise PermissionError(
                f"{repo_id} is gated and the hub refused access ({token}). Accept the licence at "
                f"https://huggingface.co/{repo_id}, create a read token at "
                f"https://huggingface.co/settings/tokens "
                f"and export HF_TOKEN=<token> (or pass a local folder instead)."
            ) from e
        if name in ("RepositoryNotFoundError", "RevisionNotFoundError") or status == 404:
            what = "hub dataset" if repo_type == "dataset" else "Hugging Face repo"
            raise FileNotFoundError(f"{what} {repo_id}{at} not found (or private without a token)") from e
        if (
            name in ("LocalEntryNotFoundError", "ConnectError", "ConnectionError")
            or "connect" in str(e).lower()
        ):
            raise ConnectionError(
                f"could not download {repo_id}{at} ({', '.join(allow_patterns)}): the hub is unreachable; pass a local "
                "folder instead (nothing is cached)"
            ) from e
        raise
