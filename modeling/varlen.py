"""Packed documents: from one packed batch to one row per document and back.

A packed batch concatenates documents along each row (transformers' `DataCollatorWithFlattening`
gives batch 1, `position_ids` restarting at 0 at every document). NAtS-L must not let attention or
the GDN state cross a document boundary, and its chunks must restart with each document. The
simplest exact way: give every document its own right-padded row, run the layer on those rows
(padding is already handled: nothing reads it, chunks are counted per row), and put the outputs
back in the packed order.

    cu = cu_seqlens_from_position_ids(position_ids)   # [N+1] int32, or None: nothing to unpack
    rows = unpack(x, cu)                               # [B, T, ...] -> [N, Lmax, ...]
    mask = pad_mask(cu, rows.shape[1])                 # [N, Lmax] bool, True = a real token
    y = repack(f(rows, mask), cu, B, T)                # [N, Lmax, ...] -> [B, T, ...]

`cu_seqlens` follows the flash-attention convention: document n holds the tokens
[cu[n], cu[n+1]) of the batch flattened row-major ([B*T]); cu[0] = 0, cu[-1] = B*T. A document
never spans two rows. All maps are index gathers (differentiable, no loop over documents); the
only host syncs are "is there more than one document per row" and the longest document.

Packed rows with padding (`Documents.from_position_ids(position_ids, valid)`, e.g. several packed
rows left-padded to one length): padding tokens belong to no document and their position ids are
not read; a document is a run of real tokens that starts at a row's first real token or at a real
token whose position is 0. Each document still gets its own right-padded row (its real tokens in
order), so it runs exactly as it does alone; `repack` gives zeros at the padding. Such documents
have no contiguous `cu_seqlens` (it is None).
"""

from __future__ import annotations

import torch


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document boundaries of a packed batch.

    position_ids: [B, T] long; a document starts at every row's first token and wherever the
        position is 0 (the positions restart). Meant for unpadded packed batches: a left-padded
        batch's position ids (e.g. 1 on padding, then 0, 1, ...) are not documents.
    -> cu_seqlens [N+1] int32 over the row-major flattened batch, or None when every row is one
       document (positions 0 .. T-1, or any run that does not restart at 0 after its first token).
    """
    B, T = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True  # a row always starts a document (a copy: `==` made a new tensor)
    if int(starts.sum()) == B:
        return None
    first = starts.flatten().nonzero().flatten()  # [N]
    total = first.new_full((1,), B * T)
    return torch.cat([first, total]).to(torch.int32)


def document_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [N+1] -> lengths [N] long."""
    return cu_seqlens.diff().long()


def pad_mask(cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """[N, max_len] bool: True where row n holds a token of document n (its first lengths[n] slots)."""
    return torch.arange(max_len, device=cu_seqlens.device) < document_lengths(cu_seqlens)[:, None]


def document_starts(position_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the real tokens that start a document, i.e. each row's first real token and every
    real token at position 0. valid: [B, T] bool, False = padding (None = every token real); padding
    starts nothing and its position ids are not read."""
    starts = position_ids == 0
    if valid is None:
        starts[:, 0] = True  # a copy: `==` made a new tensor
        return starts
    valid = valid.bool()
    return valid & (starts | (valid.long().cumsum(1) == 1))


class Documents:
    """The documents of one packed batch, with the gather indices computed once (a model step unpacks
    and repacks in every layer).

    cu_seqlens [N+1] int32 (see the module docstring), batch_size B, seq_len T:
      mask [N, Lmax] bool (True = a real token), unpack(x [B, T, ...]) -> [N, Lmax, ...] right-padded
      with zeros, repack(rows [N, Lmax, ...]) -> [B, T, ...], per_row(counts [N]) -> [B].
    `from_position_ids(position_ids, valid)` also takes padded packed rows (module docstring).
    """

    def __init__(self, cu_seqlens: torch.Tensor, batch_size: int, seq_len: int):
        starts = torch.zeros(batch_size * seq_len, dtype=torch.bool, device=cu_seqlens.device)
        starts[cu_seqlens[:-1].long()] = True
        self._build(starts.view(batch_size, seq_len), None)
        self.cu_seqlens = cu_seqlens

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, valid: torch.Tensor | None = None) -> "Documents | None":
        """The documents of position_ids [B, T] (restarting at 0 at each), or None when every row holds at
        most one. valid [B, T] bool (False = padding) or None (no padding)."""
        if valid is None or bool(valid.all()):
            cu = cu_seqlens_from_position_ids(position_ids)
            return None if cu is None else cls(cu, *position_ids.shape)
        starts = document_starts(position_ids, valid)
        if int(starts.sum()) == int(valid.any(1).sum()):  # one document per row that has tokens
            return None
        documents = cls.__new__(cls)
        documents._build(starts, valid.bool())
        documents.cu_seqlens = None  # padding splits the flattened batch: no contiguous ranges
        return documents

    def _build(self, starts: torch.Tensor, valid: torch.Tensor | None) -> None:
        """The gather / scatter maps from starts [B, T] bool (the first token of every document) and valid
        [B, T] bool (None: every token is real, every token belongs to the document before it)."""
        B, T = starts.shape
        self.batch_size, self.seq_len = B, T
        dev = starts.device
        flat_start = starts.flatten()
        real = torch.ones_like(flat_start) if valid is None else valid.flatten()
        first = flat_start.nonzero().flatten()  # [N] flat index of each document's first token
        doc = flat_start.long().cumsum(0) - 1  # [B*T] document of each token (padding: the one before, or -1)
        rank = real.long().cumsum(0)  # real tokens up to and including each token
        doc0 = doc.clamp(min=0)
        slot = rank - rank[first][doc0]  # [B*T] the token's slot in its document's row (real tokens)
        lengths = torch.zeros(first.shape[0], dtype=torch.long, device=dev).index_add_(0, doc0, real.long())
        max_len = int(lengths.max())  # the one host sync
        self.mask = torch.arange(max_len, device=dev) < lengths[:, None]  # [N, Lmax]
        flat = torch.arange(B * T, device=dev)
        gather = torch.zeros(first.shape[0], max_len + 1, dtype=torch.long, device=dev)
        # into the flattened [B*T]; padding tokens go to the dropped column Lmax
        self._gather = gather.index_put((doc0, torch.where(real, slot, max_len)), flat)[:, :max_len]
        self._scatter = (doc0, torch.where(real, slot, 0))  # each token's (row, slot) in the unpacked rows
        self._real = None if valid is None else real.view(B, T)  # repack zeroes the padding
        self._row = torch.div(first, T, rounding_mode="floor")  # [N] packed row of each document

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, 1)[self._gather]  # [N, Lmax, ...]
        return rows * self.mask.view(*self.mask.shape, *([1] * (x.dim() - 2))).to(rows.dtype)

    def repack(self, rows: torch.Tensor) -> torch.Tensor:
        out = rows[self._scatter].unflatten(0, (self.batch_size, self.seq_len))
        if self._real is None:
            return out
        return out * self._real.view(*self._real.shape, *([1] * (out.dim() - 2))).to(out.dtype)

    def per_row(self, counts: torch.Tensor) -> torch.Tensor:
        """counts [N] per document -> [B] summed over each packed row's documents."""
        return counts.new_zeros(self.batch_size).index_add_(0, self._row, counts)


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] -> [N, Lmax, ...]: document n in row n, right-padded with zeros (Lmax = the
    longest document; one host sync)."""
    return Documents(cu_seqlens, *x.shape[:2]).unpack(x)


def repack(rows: torch.Tensor, cu_seqlens: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """rows [N, Lmax, ...] (as `unpack` lays them out) -> [B, T, ...] in the packed order."""
    return Documents(cu_seqlens, batch_size, seq_len).repack(rows)


__all__ = ["Documents", "cu_seqlens_from_position_ids", "document_starts", "pad_mask", "unpack", "repack", "document_lengths"]
