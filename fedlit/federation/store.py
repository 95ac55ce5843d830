"""The client store: each client's :class:`~fedlit.state.StoreEntry` after its last participation, in memory or on
disk. The orchestrator reads and writes entries through :class:`ClientStore` and never knows which backend holds
them; algorithms never see the store at all (they receive one entry at a time).

A client has no entry before its first participation, so a client that is never sampled costs nothing.

:class:`DiskStore` groups clients into shards (``shard = cid // shard_size``) and keeps one file per shard.
Shard files are immutable and named by the round that wrote them (``shard-000003.r000012.pt``): a round's
:meth:`DiskStore.commit` writes new versions of the shards it changed only, and returns the manifest (shard ->
current file) that the checkpoint's main file lists. Files the manifest does not list (older versions, versions
of a round whose checkpoint never completed) are removed by :meth:`DiskStore.remove_unlisted`, after the main
file that no longer needs them has been replaced, or on resume. So a SIGKILL at any moment leaves the files of
the last complete checkpoint intact.

A new shard version holds every entry of its shard, so a round writes at most (clients per round) x
``shard_size`` entries, whatever N is. ``store.shard_size=1`` (the default) writes exactly the round's clients,
one file per client that has trained; larger shards mean fewer files but rewrite the entries of clients that did
not train (``benchmarks/scale.py`` measures both).

Shard files are ``torch.save`` of plain dicts, read with ``torch.load(weights_only=True)`` (torch's restricted
unpickler: tensors, numbers, strings, lists and dicts only, no code runs on load). safetensors would be the
tensor-only alternative, but entries hold algorithm extras that are lists and numbers beside tensors
(pFedMoAP's ``expert_keys``), which safetensors cannot store without a second serialisation format.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from fedlit.io import atomic_write
from fedlit.state import StoreEntry

SHARD_PATTERN = re.compile(r"shard-(\d+)\.r(\d+)\.pt")
TEMPORARY_PATTERN = re.compile(r"\.shard-(\d+)\.r(\d+)\.pt\..*\.tmp")  # what atomic_write leaves after SIGKILL
Manifest = dict[int, str]  # shard index -> file name (inside the store directory)


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

    def iter_entries(self) -> Iterator[StoreEntry]:
        """Every entry, in client-id order."""
        for cid in self.ids():
            yield self.get(cid)

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


def shard_file(shard: int, round_index: int) -> str:
    """The file name of ``shard``'s version written after round ``round_index``."""
    return f"shard-{shard:06d}.r{round_index:06d}.pt"


class DiskStore(ClientStore):
    """Entries in versioned shard files under ``directory`` (see the module docstring). Entries put since the last
    :meth:`commit` stay in memory; reading a client loads its shard file (shards of :meth:`get_many` once each)."""

    def __init__(self, directory: str | Path, shard_size: int, manifest: Manifest | None = None,
                 index: dict[int, list[int]] | None = None):
        self.directory = Path(directory)
        self.shard_size = shard_size
        self.manifest: Manifest = dict(manifest or {})
        self.index: dict[int, list[int]] = {s: list(c) for s, c in (index or {}).items()}  # shard -> its client ids
        self.pending: dict[int, StoreEntry] = {}

    def shard_of(self, cid: int) -> int:
        """The shard that holds ``cid``."""
        return cid // self.shard_size

    def load_shard(self, shard: int) -> dict[int, StoreEntry]:
        """The committed entries of ``shard`` (empty when it has no file yet)."""
        name = self.manifest.get(shard)
        if name is None:
            return {}
        data = torch.load(self.directory / name, map_location="cpu", weights_only=True)
        return {int(cid): StoreEntry.from_dict(entry) for cid, entry in data.items()}

    def get(self, cid: int) -> StoreEntry | None:
        if cid in self.pending:
            return self.pending[cid]
        if cid not in self.index.get(self.shard_of(cid), ()):
            return None
        return self.load_shard(self.shard_of(cid))[cid]

    def get_many(self, cids: Iterable[int]) -> dict[int, StoreEntry | None]:
        cids = list(cids)
        out: dict[int, StoreEntry | None] = {cid: self.pending.get(cid) for cid in cids}
        needed = sorted({self.shard_of(c) for c in cids if c not in self.pending
                         and c in self.index.get(self.shard_of(c), ())})
        for shard in needed:
            loaded = self.load_shard(shard)
            for cid in cids:
                if self.shard_of(cid) == shard and cid not in self.pending:
                    out[cid] = loaded.get(cid)
        return out

    def put(self, cid: int, entry: StoreEntry) -> None:
        self.pending[cid] = entry

    def iter_entries(self) -> Iterator[StoreEntry]:
        """Every entry, one shard file in memory at a time."""
        shards = sorted(set(self.index) | {self.shard_of(c) for c in self.pending})
        for shard in shards:
            entries = {**self.load_shard(shard),
                       **{c: e for c, e in self.pending.items() if self.shard_of(c) == shard}}
            for cid in sorted(entries):
                yield entries[cid]

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
            name = shard_file(shard, round_index)
            if write:
                entries = {**self.load_shard(shard), **fresh}
                payload = {cid: entries[cid].to_dict() for cid in sorted(entries)}
                atomic_write(self.directory / name, lambda f, p=payload: torch.save(p, f))
            self.index[shard] = sorted(set(self.index.get(shard, [])) | set(fresh))
            self.manifest[shard] = name
        self.pending = {}
        return dict(self.manifest)

    def remove_unlisted(self) -> list[Path]:
        """Delete the shard files (and their temporaries) of the store directory that the manifest does not list;
        returns them. Call it only on the process that writes, after the checkpoint listing the manifest is in
        place. Other files of the directory are left alone."""
        if not self.directory.is_dir():
            return []
        listed = set(self.manifest.values())
        stale = [p for p in self.directory.iterdir() if p.is_file() and p.name not in listed
                 and (SHARD_PATTERN.fullmatch(p.name) or TEMPORARY_PATTERN.fullmatch(p.name))]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale


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
