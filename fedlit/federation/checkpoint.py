"""Round checkpoints: what a run needs to continue, written atomically with a content hash, verified on load.

A checkpoint file is one header line ``fedlit-checkpoint <format> <sha256 of the body>`` followed by the body, a
``torch.save`` of plain containers and tensors that is loaded with ``weights_only=True``. A file whose bytes
changed (a flipped bit inside a tensor, a truncated copy) fails the hash and is refused in one line.

With the memory store the body holds every client's entry and the server's per-client records. With the disk
store (:class:`DiskStore`) it holds manifests instead, as int64 tensors (``shards``: each shard's current version
and the clients stored; ``records``: the same for the server's per-client records, :class:`RecordTable`): the
shard files are written first, by :meth:`DiskStore.commit`, and this small main file last, so that it only ever
lists complete files. A round's checkpoint then writes the shards of the round's clients and records and a main
file of 48 bytes per client that has ever trained (with one-client shards) besides the run's history.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fedlit.errors import UserError
from fedlit.federation.store import ClientStore, DiskStore, MemoryStore, RecordTable
from fedlit.io import atomic_write
from fedlit.reporting import tensor_bytes
from fedlit.state import ServerState, StoreEntry

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 3
MAGIC = b"fedlit-checkpoint"


@dataclass
class RunState:
    """Everything a run carries from round to round: the server, the client store and the evaluated history."""

    server: ServerState
    store: ClientStore = field(default_factory=MemoryStore)
    history: list[dict] = field(default_factory=list)  # one metrics row per evaluated round
    per_client: list[dict] = field(default_factory=list)  # {"round": r, "accuracy": [per-client accuracy]}
    records: RecordTable | None = None  # the server's per-client records on disk (with a disk store only)
    entry_bytes: dict[str, int] = field(default_factory=lambda: {"state": 0, "extras": 0})

    def note_entry(self, entry: StoreEntry) -> None:
        """Record the tensor bytes of an entry put in the store: :attr:`entry_bytes` keeps the largest state and
        extras seen (what ``results.json`` reports per client, without reading the store back)."""
        self.entry_bytes = {"state": max(self.entry_bytes["state"], tensor_bytes(entry.state.flat())),
                            "extras": max(self.entry_bytes["extras"], tensor_bytes(entry.extras))}


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must match to be resumed: the algorithm, the configuration, the data partition and the
    numerics (``{"precision": .., "accelerator": ..}``; checkpoints written before they were recorded, and an empty
    ``numerics``, match any)."""

    algorithm: str
    config_digest: str
    partition_digest: str
    numerics: dict[str, str] = field(default_factory=dict, hash=False)


def save_checkpoint(path: Path, state: RunState, identity: Identity) -> None:
    """Write ``state`` to ``path`` atomically, with its identity and a SHA-256 of the body (a disk store and its
    record table must have been committed: their manifests are written, not their entries)."""
    payload = {
        "algorithm": identity.algorithm,
        "config_digest": identity.config_digest,
        "partition_digest": identity.partition_digest,
        "numerics": identity.numerics,
        "server": state.server.to_dict(records=state.records is None),
        **store_payload(state.store, state.records),
        "history": state.history,
        "per_client": state.per_client,
        "entry_bytes": state.entry_bytes,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = b"%s %d %s\n" % (MAGIC, FORMAT_VERSION, hashlib.sha256(body).hexdigest().encode())
    atomic_write(path, header + body)


def checkpoint_round(run_dir: Path, state: RunState, identity: Identity, write: bool = True,
                     barrier: Callable[[], None] | None = None) -> None:
    """The checkpoint of a finished round in ``run_dir`` (``write``: this process writes; every process of a run
    calls it). A disk store first writes the shards of the round's clients and of the server records that changed
    (every process computes the same manifests), then the main file lists them; once every process has passed
    ``barrier``, the writer deletes the shard versions no longer listed."""
    store, records = state.store, state.records
    if isinstance(store, DiskStore):
        store.commit(state.server.round, write=write)
        records.put_changed(state.server.client_records)
        records.commit(state.server.round, write=write)
    if write:
        save_checkpoint(Path(run_dir) / CHECKPOINT_NAME, state, identity)
    if isinstance(store, DiskStore):
        if barrier is not None:
            barrier()
        if write:
            store.remove_unlisted()
            records.remove_unlisted()


def store_payload(store: ClientStore, records: RecordTable | None = None) -> dict:
    """What the main checkpoint file holds of ``store``: every entry (memory), or the manifests of the store and of
    the server's record table as int64 tensors (disk: :meth:`DiskStore.manifest_tensors`)."""
    if isinstance(store, DiskStore):
        if store.pending or records is None or records.pending:
            raise RuntimeError("commit the disk store and its record table before writing the checkpoint")
        return {"shards": store.manifest_tensors(), "records": records.manifest_tensors(),
                "shard_size": store.shard_size}
    return {"store": {cid: store.get(cid).to_dict() for cid in store.ids()}}


def disk_store_of(payload: dict, directory: Path) -> tuple[DiskStore, RecordTable]:
    """The disk store and the record table a checkpoint's payload lists (their files under ``directory``)."""
    shard_size = int(payload["shard_size"])
    store, records = DiskStore(directory, shard_size), RecordTable(directory, shard_size)
    store.load_manifest(payload["shards"])
    records.load_manifest(payload["records"])
    return store, records


def with_backend(state: RunState, backend: str, directory: Path, shard_size: int) -> RunState:
    """``state`` with its client store and the server's per-client records moved to ``backend`` (``memory`` or
    ``disk``), so that a run can resume on the other backend; ``state`` itself when it is there already (a disk store
    keeps the shard size its files were written with). To disk: every entry is pending and the next checkpoint
    writes them all; to memory: every shard is read once."""
    if (backend == "disk") == isinstance(state.store, DiskStore):
        return state
    if backend == "disk":
        store = DiskStore(directory, shard_size)
        for cid in state.store.ids():
            store.put(cid, state.store.get(cid))
        return replace(state, store=store, records=RecordTable(directory, shard_size))
    return replace(state, store=MemoryStore(dict(state.store.items())), records=None)


def load_checkpoint(path: Path) -> dict:
    """The payload of a checkpoint written by :func:`save_checkpoint` (plain dicts and tensors); a foreign,
    old-format, truncated, tampered or corrupt file is one :class:`UserError` line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read checkpoint {path}: {err.strerror}") from None
    header, _, body = data.partition(b"\n")
    fields = header.split(b" ")
    if len(fields) != 3 or fields[0] != MAGIC:
        raise UserError(f"{path} is not a fedlit checkpoint of format {FORMAT_VERSION} (written by an older fedlit "
                        "or another program); start a new run (run.resume=null)")
    if fields[1] != str(FORMAT_VERSION).encode():
        raise UserError(f"{path} has checkpoint format {fields[1].decode(errors='replace')}, this fedlit reads "
                        f"format {FORMAT_VERSION}; start a new run or use the fedlit version that wrote it")
    if hashlib.sha256(body).hexdigest().encode() != fields[2]:
        raise UserError(f"checkpoint {path} is corrupt (its content hash does not match); restore it from a copy "
                        "or start a new run")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(payload, dict) or not {"server", "history", "per_client"} <= payload.keys() \
            or not ("store" in payload or "shards" in payload):
        raise UserError(f"checkpoint {path} lacks the fields of a fedlit run; start a new run")
    return payload


def _numerics_text(numerics: dict[str, str]) -> str:
    return f"precision {numerics.get('precision')} on {numerics.get('accelerator')}"


def restore(path: Path, identity: Identity, store_directory: Path | None = None) -> RunState:
    """The run state of ``path`` after checking that it was written by the same algorithm, configuration and
    partition (each mismatch is one :class:`UserError` line). A disk store's shard files are read from
    ``store_directory`` when needed, except the server's per-client records, read here (nothing is removed)."""
    payload = load_checkpoint(path)
    for key, label in (("algorithm", "algorithm"), ("config_digest", "configuration"),
                       ("partition_digest", "data partition")):
        if payload.get(key) != getattr(identity, key):
            raise UserError(f"checkpoint {path} was written with a different {label}; start a new run "
                            "(run.resume=null) or use the original configuration")
    written = payload.get("numerics") or {}
    if written and identity.numerics and written != identity.numerics:
        raise UserError(f"checkpoint {path} was computed with {_numerics_text(written)}, this run would continue "
                        f"with {_numerics_text(identity.numerics)}; resume with trainer.precision="
                        f"{written.get('precision')} on {written.get('accelerator')} or start a new run "
                        "(run.resume=null)")
    try:
        if "shards" in payload:
            if store_directory is None:
                raise ValueError("the checkpoint keeps its clients on disk and no store directory was given")
            store, records = disk_store_of(payload, store_directory)
            server = ServerState.from_dict(payload["server"])
            server.client_records = records.load_all()
        else:
            store, records = MemoryStore({int(c): StoreEntry.from_dict(e) for c, e in payload["store"].items()}), None
            server = ServerState.from_dict(payload["server"])
        return RunState(server=server, store=store, history=list(payload["history"]),
                        per_client=list(payload["per_client"]), records=records,
                        entry_bytes=dict(payload["entry_bytes"]))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"checkpoint {path} is incomplete ({type(err).__name__}: {err}); start a new run") from None
    except OSError as err:
        raise UserError(f"cannot read the client store that checkpoint {path} lists ({err}); restore the store "
                        "directory or start a new run") from None
