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


class Documents:
    """The documents of one packed batch, with the gather indices computed once (a model step unpacks
    and repacks in every layer).

    cu_seqlens [N+1] int32 (see the module docstring), batch_size B, seq_len T:
      mask [N, Lmax] bool (True = a real token), unpack(x [B, T, ...]) -> [N, Lmax, ...] right-padded
      with zeros, repack(rows [N, Lmax, ...]) -> [B, T, ...], per_row(counts [N]) -> [B].
    """

    def __init__(self, cu_seqlens: torch.Tensor, batch_size: int, seq_len: int):
        self.cu_seqlens, self.batch_size, self.seq_len = cu_seqlens, batch_size, seq_len
        lengths = document_lengths(cu_seqlens)
        max_len = int(lengths.max())  # the one host sync
        self.mask = pad_mask(cu_seqlens, max_len)  # [N, Lmax]
        index = cu_seqlens[:-1, None].long() + torch.arange(max_len, device=cu_seqlens.device)  # [N, Lmax]
        self._gather = index.where(self.mask, 0)  # into the flattened [B*T]
        flat = torch.arange(batch_size * seq_len, device=cu_seqlens.device)
        doc = torch.searchsorted(cu_seqlens.long(), flat, right=True) - 1  # [B*T] document of each token
        self._scatter = (doc, flat - cu_seqlens.long()[doc])  # its (row, slot) in the unpacked rows
        self._row = torch.div(cu_seqlens[:-1].long(), seq_len, rounding_mode="floor")  # [N] packed row of each

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> "Documents | None":
        cu = cu_seqlens_from_position_ids(position_ids)
        return None if cu is None else cls(cu, *position_ids.shape)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.flatten(0, 1)[self._gather]  # [N, Lmax, ...]
        return rows * self.mask.view(*self.mask.shape, *([1] * (x.dim() - 2))).to(rows.dtype)

    def repack(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[self._scatter].unflatten(0, (self.batch_size, self.seq_len))

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


__all__ = ["Documents", "cu_seqlens_from_position_ids", "pad_mask", "unpack", "repack", "document_lengths"]
