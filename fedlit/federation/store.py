"""The client store: each client's :class:`~fedlit.state.StoreEntry` after its last participation, in memory or on
disk. The orchestrator reads and writes entries through :class:`ClientStore` and never knows which backend holds
them; algorithms never see the store at all (they receive one entry at a time).

A client has no entry before its first participation, so a client that is never sampled costs nothing.

:class:`DiskStore` groups clients into shards (``shard = cid // shard_size``) and keeps one file per shard.
Shard files are immutable and named by the round that wrote them (``shard-000003.r000012.safetensors``): a
round's :meth:`DiskStore.commit` writes new versions of the shards it changed only, and returns the manifest
(shard -> current file) that the checkpoint's main file lists. Files the manifest does not list (older versions,
versions of a round whose checkpoint never completed) are removed by :meth:`DiskStore.remove_unlisted`, after the
main file that no longer needs them has been replaced, or on resume. So a SIGKILL at any moment leaves the files
of the last complete checkpoint intact. The same versioned shards (``prefix="record"``) keep the server's
per-client records (:attr:`~fedlit.state.ServerState.client_records`, pFedMoAP's pool) when the store is on disk.

A new shard version holds every entry of its shard, so a round writes at most (clients per round) x
``shard_size`` entries, whatever N is. ``store.shard_size=1`` (the default) writes exactly the round's clients,
one file per client that has trained; larger shards mean fewer files but rewrite the entries of clients that did
not train (``benchmarks/scale.py`` measures both).

Shard files are safetensors: the tensors of the shard's entries under path-like names, and the rest of each entry
(algorithm extras such as pFedMoAP's ``expert_keys``, numbers, lists, dicts) as a JSON skeleton in the file's
metadata (:func:`pack_tree`). Loading runs no code (no pickle), and reading one client's ~1 MB entry takes a
fifth of the time ``torch.load(weights_only=True)`` takes (measured with ``benchmarks/scale.py``'s entries), which
matters because a returning client's entry is read in every round it trains.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from fedlit.io import TEMP_SUFFIX, atomic_write
from fedlit.state import StoreEntry

SHARD_SUFFIX = ".safetensors"
TREE_METADATA = "fedlit.tree"  # the metadata key of a shard file's JSON skeleton
Manifest = dict[int, str]  # shard index -> file name (inside the store directory)


def pack_tree(tree: Any) -> tuple[dict[str, Tensor], str]:
    """``tree`` (nested dicts with int or str keys, lists, tuples, tensors, numbers, strings, None) as its tensors
    (name -> contiguous tensor, no two sharing memory) and a JSON skeleton that names them; inverse of
    :func:`unpack_tree`. Anything else is a TypeError."""
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, Tensor):
            tensor = node.detach().cpu().contiguous()
            pointer = tensor.untyped_storage().data_ptr()
            if tensor.numel() and pointer in storages:
                tensor = tensor.clone()  # safetensors refuses two tensors over the same memory
            storages.add(tensor.untyped_storage().data_ptr())
            name = f"{len(tensors)}:{path}"
            tensors[name] = tensor
            return {"T": name}
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, (int, str)) or isinstance(key, bool):
                    raise TypeError(f"cannot store a dict key of type {type(key).__name__} at {path or 'the top'}")
            return {"D": [[key, walk(value, f"{path}/{key}")] for key, value in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"L" if isinstance(node, list) else "U": [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} at {path or 'the top'}")

    return tensors, json.dumps(walk(tree, ""))


def unpack_tree(tensors: dict[str, Tensor], skeleton: str) -> Any:
    """Inverse of :func:`pack_tree`."""

    def build(node: Any) -> Any:
        if isinstance(node, dict):
            if "T" in node:
                return tensors[node["T"]]
            if "D" in node:
                return {key: build(value) for key, value in node["D"]}
            items = [build(v) for v in node.get("L", node.get("U", []))]
            return items if "L" in node else tuple(items)
        return node

    return build(json.loads(skeleton))


def write_tree(path: str | Path, tree: Any) -> None:
    """Write ``tree`` (see :func:`pack_tree`) to the safetensors file ``path``, atomically."""
    tensors, skeleton = pack_tree(tree)
    atomic_write(path, safetensors.torch.save(tensors, metadata={TREE_METADATA: skeleton}))


def read_tree(path: str | Path) -> Any:
    """The tree a :func:`write_tree` file holds (tensors on the CPU)."""
    data = Path(path).read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    if TREE_METADATA not in metadata:
        raise ValueError(f"{path} is not a fedlit shard file")
    return unpack_tree(safetensors.torch.load(data), metadata[TREE_METADATA])


class ClientStore(abc.ABC):
    """Client id -> :class:`StoreEntry`, for the clients that have trained at least once."""

    @abc.abstractmethod
    def get(self, cid: int) -> StoreEntry | None:
        """The entry of ``cid``, None before its first participation."""

    @abc.abstractmethod
    def put(self, cid: int, entry: StoreEntry) -> None:
        """Set the entry of ``cid``."""

    @abc.abstractmethod
    def ids(self) -> list[int]:
        """The ids of the clients that have an entry, ascending."""

    def get_many(self, cids: Iterable[int]) -> dict[int, StoreEntry | None]:
        """The entries of ``cids`` (None where a client has none)."""
        return {cid: self.get(cid) for cid in cids}

    def __len__(self) -> int:
        return len(self.ids())


class MemoryStore(ClientStore):
    """Every entry in a dict of this process (the whole store is in each checkpoint)."""

    def __init__(self, entries: dict[int, StoreEntry] | None = None):
        self.entries: dict[int, StoreEntry] = dict(entries or {})

    def get(self, cid: int) -> StoreEntry | None:
        return self.entries.get(cid)

    def put(self, cid: int, entry: StoreEntry) -> None:
        self.entries[cid] = entry

    def ids(self) -> list[int]:
        return sorted(self.entries)


def shard_file(shard: int, round_index: int, prefix: str = "shard") -> str:
    """The file name of ``shard``'s version written after round ``round_index``."""
    return f"{prefix}-{shard:06d}.r{round_index:06d}{SHARD_SUFFIX}"


def _same(tree: Any) -> Any:
    return tree


class DiskStore(ClientStore):
    """Entries in versioned shard files under ``directory`` (see the module docstring). Entries put since the last
    :meth:`commit` stay in memory; reading a client loads its shard file (shards of :meth:`get_many` once each).
    ``prefix`` names the files; ``encode``/``decode`` turn an entry into the plain tree a file holds and back."""

    def __init__(self, directory: str | Path, shard_size: int, manifest: Manifest | None = None,
                 index: dict[int, list[int]] | None = None, prefix: str = "shard",
                 encode: Callable[[Any], Any] = StoreEntry.to_dict,
                 decode: Callable[[Any], Any] = StoreEntry.from_dict):
        self.directory = Path(directory)
        self.shard_size = shard_size
        self.manifest: Manifest = dict(manifest or {})
        self.index: dict[int, list[int]] = {s: list(c) for s, c in (index or {}).items()}  # shard -> its client ids
        self.pending: dict[int, Any] = {}
        self.prefix, self.encode, self.decode = prefix, encode, decode
        suffix = re.escape(SHARD_SUFFIX)
        self.file_pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.r(\d+){suffix}")
        self.temporary_pattern = re.compile(rf"\.{re.escape(prefix)}-(\d+)\.r(\d+){suffix}\..*{re.escape(TEMP_SUFFIX)}")

    def shard_of(self, cid: int) -> int:
        """The shard that holds ``cid``."""
        return cid // self.shard_size

    def load_shard(self, shard: int) -> dict[int, Any]:
        """The committed entries of ``shard`` (empty when it has no file yet)."""
        name = self.manifest.get(shard)
        if name is None:
            return {}
        return {int(cid): self.decode(entry) for cid, entry in read_tree(self.directory / name).items()}

    def get(self, cid: int) -> Any | None:
        if cid in self.pending:
            return self.pending[cid]
        if cid not in self.index.get(self.shard_of(cid), ()):
            return None
        return self.load_shard(self.shard_of(cid))[cid]

    def get_many(self, cids: Iterable[int]) -> dict[int, Any | None]:
        cids = list(cids)
        out: dict[int, Any | None] = {cid: self.pending.get(cid) for cid in cids}
        by_shard: dict[int, list[int]] = {}
        for cid in cids:
            if cid not in self.pending and cid in self.index.get(self.shard_of(cid), ()):
                by_shard.setdefault(self.shard_of(cid), []).append(cid)
        for shard in sorted(by_shard):
            loaded = self.load_shard(shard)
            for cid in by_shard[shard]:
                out[cid] = loaded.get(cid)
        return out

    def put(self, cid: int, entry: Any) -> None:
        self.pending[cid] = entry

    def items(self) -> Iterator[tuple[int, Any]]:
        """Every (client id, entry), in client-id order, one shard file in memory at a time."""
        shards = sorted(set(self.index) | {self.shard_of(c) for c in self.pending})
        for shard in shards:
            entries = {**self.load_shard(shard),
                       **{c: e for c, e in self.pending.items() if self.shard_of(c) == shard}}
            for cid in sorted(entries):
                yield cid, entries[cid]

    def ids(self) -> list[int]:
        committed = {c for members in self.index.values() for c in members}
        return sorted(committed | set(self.pending))

    def commit(self, round_index: int, write: bool = True) -> Manifest:
        """Fold the pending entries into new versions of their shards (written when ``write``; a rank that does not
        write computes the same manifest) and return the new manifest. Old versions stay on disk until
        :meth:`remove_unlisted`."""
        touched = sorted({self.shard_of(c) for c in self.pending})
        for shard in touched:
            fresh = {c: e for c, e in self.pending.items() if self.shard_of(c) == shard}
            name = shard_file(shard, round_index, self.prefix)
            if write:
                kept = set(self.index.get(shard, [])) - set(fresh)  # committed entries that did not change
                entries = {**(self.load_shard(shard) if kept else {}), **fresh}
                write_tree(self.directory / name, {cid: self.encode(entries[cid]) for cid in sorted(entries)})
            self.index[shard] = sorted(set(self.index.get(shard, [])) | set(fresh))
            self.manifest[shard] = name
        self.pending = {}
        return dict(self.manifest)

    def manifest_tensors(self) -> dict[str, Tensor]:
        """The manifest and index as three int64 tensors, 24 bytes per stored client with one-client shards (what
        a checkpoint's main file holds): ``shards`` ``(S,)`` ascending, ``rounds`` ``(S,)`` the round that wrote
        each shard's current file, ``clients`` ``(C,)`` every committed client id, ascending."""
        shards = sorted(self.manifest)
        rounds = [int(self.file_pattern.fullmatch(self.manifest[s]).group(2)) for s in shards]
        clients = sorted(c for members in self.index.values() for c in members)
        return {"shards": torch.tensor(shards, dtype=torch.int64), "rounds": torch.tensor(rounds, dtype=torch.int64),
                "clients": torch.tensor(clients, dtype=torch.int64)}

    def load_manifest(self, tensors: dict[str, Tensor]) -> None:
        """Set the manifest and index from :meth:`manifest_tensors` (the same ``shard_size`` and prefix)."""
        shards, rounds = tensors["shards"].tolist(), tensors["rounds"].tolist()
        self.manifest = {s: shard_file(s, r, self.prefix) for s, r in zip(shards, rounds)}
        self.index = {}
        for cid in tensors["clients"].tolist():
            self.index.setdefault(self.shard_of(cid), []).append(cid)

    def listed_files(self) -> list[str]:
        """The file names the manifest lists, by shard."""
        return [self.manifest[s] for s in sorted(self.manifest)]

    def remove_unlisted(self) -> list[Path]:
        """Delete the shard files of this store's prefix (and their temporaries) in the store directory that the
        manifest does not list; returns them. Call it only on the process that writes, after the checkpoint listing
        the manifest is in place. Other files of the directory are left alone."""
        if not self.directory.is_dir():
            return []
        listed = set(self.manifest.values())
        stale = [p for p in self.directory.iterdir() if p.is_file() and p.name not in listed
                 and (self.file_pattern.fullmatch(p.name) or self.temporary_pattern.fullmatch(p.name))]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale


class RecordTable(DiskStore):
    """The server's per-client records (:attr:`~fedlit.state.ServerState.client_records`: plain trees) in versioned
    ``record-*`` shards beside the client store. Records are replaced, never modified in place, so the records to
    write after a round are those whose object changed (:meth:`put_changed`)."""

    def __init__(self, directory: str | Path, shard_size: int, manifest: Manifest | None = None,
                 index: dict[int, list[int]] | None = None):
        super().__init__(directory, shard_size, manifest, index, prefix="record", encode=_same, decode=_same)
        self.known: dict[int, Any] = {}  # client id -> the record object last put or loaded

    def load_all(self) -> dict[int, Any]:
        """Every committed record (client id -> record), read once when a run resumes."""
        self.known = dict(self.items())
        return dict(self.known)

    def put_changed(self, records: dict[int, Any]) -> list[int]:
        """Put the records whose object is not the one last put or loaded for their client; returns their ids."""
        removed = set(self.known) - set(records)
        if removed:
            raise RuntimeError(f"per-client server records are never removed (clients {sorted(removed)[:5]})")
        changed = sorted(c for c, record in records.items() if self.known.get(c) is not record)
        for cid in changed:
            self.put(cid, records[cid])
        self.known = dict(records)
        return changed


def estimated_bytes(initial_flat: dict[str, torch.Tensor], num_clients: int, persistent_state: bool) -> int:
    """A lower bound of the memory store's size once every client has trained: the initial state's tensors (twice
    with persistent optimiser state) per client; algorithm extras are not counted."""
    per_client = sum(t.numel() * t.element_size() for t in initial_flat.values())
    return per_client * (2 if persistent_state else 1) * num_clients


def choose_backend(backend: str, estimate: int, budget_mb: float) -> str:
    """``memory`` or ``disk``: ``auto`` picks disk when ``estimate`` bytes exceed ``budget_mb`` MiB."""
    if backend != "auto":
        return backend
    return "disk" if estimate > budget_mb * 2**20 else "memory"
