"""One flat, padded all-gather of client uploads per round (and of gradients per synchronous step).

Every rank packs its clients' uploads (:class:`~fedlit.state.Upload`, flattened to tensors with the same names and
shapes) into rows of one float32
buffer ``(slots, 1 + S)`` whose first column is the client id (-1 for padding); ``fabric.all_gather`` needs equal
shapes on every rank, and every rank knows ``slots`` because it knows the assignment.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlit.state import Upload

State = dict[str, Tensor]


def state_layout(state: State) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The (name, shape, dtype) of each entry of ``state``, in sorted-name order."""
    return [(k, tuple(state[k].shape), state[k].dtype) for k in sorted(state)]


def flatten_state(state: State, layout) -> Tensor:
    """All entries of ``state`` as one float32 vector ``(S,)`` in ``layout`` order."""
    return torch.cat([state[name].detach().reshape(-1).to(torch.float32).cpu() for name, _, _ in layout])


def unflatten_state(flat: Tensor, layout) -> State:
    """Inverse of :func:`flatten_state`."""
    out, offset = {}, 0
    for name, shape, dtype in layout:
        n = 1
        for d in shape:
            n *= d
        out[name] = flat[offset : offset + n].reshape(shape).to(dtype).clone()
        offset += n
    return out


def gather_rows(fabric, rows: dict[int, Tensor], width: int, slots: int) -> dict[int, Tensor]:
    """Every rank's float32 rows ``(width,)`` (client id -> row) on every rank, through one ``all_gather`` of a
    ``(slots, 1 + width)`` buffer whose first column is the client id (-1: padding); ``slots`` is at least the
    most rows a rank holds (every rank knows it from the assignment)."""
    if fabric is None or fabric.world_size == 1:
        return dict(rows)
    buffer = torch.zeros(slots, 1 + width, dtype=torch.float32)
    buffer[:, 0] = -1
    for row, cid in enumerate(sorted(rows)):
        buffer[row, 0] = cid
        buffer[row, 1:] = rows[cid]
    gathered = fabric.all_gather(buffer.to(fabric.device)).cpu().reshape(-1, 1 + width)
    return {int(r[0]): r[1:] for r in gathered if r[0] >= 0}


def layout_size(layout) -> int:
    """Number of float32 entries :func:`flatten_state` gives for ``layout``."""
    return sum(int(torch.tensor(shape).prod()) if shape else 1 for _, shape, _ in layout)


def gather_uploads(fabric, local: dict[int, Upload], template: Upload, slots: int) -> dict[int, Upload]:
    """Every rank's uploads on every rank, through one ``all_gather`` of a ``(slots, 1 + S)`` buffer; ``template``
    is an upload of the common layout (every rank knows it, also one that trained no client this round)."""
    if fabric is None or fabric.world_size == 1:
        return dict(local)
    layout = state_layout(template.flat())
    rows = {cid: flatten_state(upload.flat(), layout) for cid, upload in local.items()}
    gathered = gather_rows(fabric, rows, layout_size(layout), slots)
    return {cid: Upload.from_flat(unflatten_state(row, layout)) for cid, row in gathered.items()}
