"""Round checkpoints: what a run needs to continue, written atomically with a content hash, verified on load.

A checkpoint file is one header line ``fedlit-checkpoint <format> <sha256 of the body>`` followed by the body, a
``torch.save`` of plain containers and tensors that is loaded with ``weights_only=True``. A file whose bytes
changed (a flipped bit inside a tensor, a truncated copy) fails the hash and is refused in one line.

With the memory store the body holds every client's entry. With the disk store (:class:`DiskStore`) it holds the
store's manifest instead (``shards``: shard -> current file; ``shard_index``: shard -> client ids): the shard files
are written first, by :meth:`DiskStore.commit`, and this small main file last, so that it only ever lists complete
files; a round's checkpoint then writes only the shards of the round's clients.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedlit.errors import UserError
from fedlit.federation.store import ClientStore, DiskStore, MemoryStore
from fedlit.io import atomic_write
from fedlit.state import ServerState, StoreEntry

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2
MAGIC = b"fedlit-checkpoint"


@dataclass
class RunState:
    """Everything a run carries from round to round: the server, the client store and the evaluated history."""

    server: ServerState
    store: ClientStore = field(default_factory=MemoryStore)
    history: list[dict] = field(default_factory=list)  # one metrics row per evaluated round
    per_client: list[dict] = field(default_factory=list)  # {"round": r, "accuracy": [per-client accuracy]}


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must match to be resumed: the algorithm, the configuration and the data partition."""

    algorithm: str
    config_digest: str
    partition_digest: str


def save_checkpoint(path: Path, state: RunState, identity: Identity) -> None:
    """Write ``state`` to ``path`` atomically, with its identity and a SHA-256 of the body (a disk store must have
    been committed: its manifest is written, not its entries)."""
    payload = {
        "algorithm": identity.algorithm,
        "config_digest": identity.config_digest,
        "partition_digest": identity.partition_digest,
        "server": state.server.to_dict(),
        **store_payload(state.store),
        "history": state.history,
        "per_client": state.per_client,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = b"%s %d %s\n" % (MAGIC, FORMAT_VERSION, hashlib.sha256(body).hexdigest().encode())
    atomic_write(path, header + body)


def store_payload(store: ClientStore) -> dict:
    """What the main checkpoint file holds of ``store``: every entry (memory) or the manifest (disk)."""
    if isinstance(store, DiskStore):
        if store.pending:
            raise RuntimeError("commit the disk store before writing the checkpoint")
        return {"shards": dict(store.manifest), "shard_index": {s: list(c) for s, c in store.index.items()}}
    return {"store": {cid: store.get(cid).to_dict() for cid in store.ids()}}


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


def restore(path: Path, identity: Identity, store_directory: Path | None = None, shard_size: int = 1) -> RunState:
    """The run state of ``path`` after checking that it was written by the same algorithm, configuration and
    partition (each mismatch is one :class:`UserError` line). A disk store's shard files are read from
    ``store_directory`` when needed (nothing is read or removed here)."""
    payload = load_checkpoint(path)
    for key, label in (("algorithm", "algorithm"), ("config_digest", "configuration"),
                       ("partition_digest", "data partition")):
        if payload.get(key) != getattr(identity, key):
            raise UserError(f"checkpoint {path} was written with a different {label}; start a new run "
                            "(run.resume=null) or use the original configuration")
    try:
        if "shards" in payload:
            if store_directory is None:
                raise UserError(f"checkpoint {path} keeps its clients on disk; resume it with store.backend=disk")
            store: ClientStore = DiskStore(store_directory, shard_size,
                                           {int(s): str(n) for s, n in payload["shards"].items()},
                                           {int(s): [int(c) for c in m] for s, m in payload["shard_index"].items()})
        else:
            store = MemoryStore({int(c): StoreEntry.from_dict(e) for c, e in payload["store"].items()})
        return RunState(server=ServerState.from_dict(payload["server"]), store=store,
                        history=list(payload["history"]), per_client=list(payload["per_client"]))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"checkpoint {path} is incomplete ({type(err).__name__}: {err}); start a new run") from None
