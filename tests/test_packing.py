"""Packed documents: modeling/varlen.py (boundaries, one row per document and back) and the
`packing="documents"` data of conversion/data.py, checked against transformers'
DataCollatorWithFlattening, the layout they are meant to accept."""

from __future__ import annotations

import types

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorWithFlattening

from natsl_hf.conversion.data import load_packed_dataset, pack, pack_documents
from natsl_hf.modeling.varlen import cu_seqlens_from_position_ids, pad_mask, repack, unpack

DOCS = [[11, 12, 13], [14, 15], [16, 17, 18, 19, 20]]
EOS = 0


def flattened(docs):
    """What DataCollatorWithFlattening hands a model for these documents (batch 1)."""
    return DataCollatorWithFlattening()([{"input_ids": d} for d in docs])


def test_cu_seqlens_of_a_flattened_batch():
    batch = flattened(DOCS)
    assert batch["input_ids"].shape == (1, 10)
    assert cu_seqlens_from_position_ids(batch["position_ids"]).tolist() == [0, 3, 5, 10]
    assert cu_seqlens_from_position_ids(batch["position_ids"]).dtype == torch.int32


def test_cu_seqlens_are_row_major_over_the_batch():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [7, 8, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(position_ids).tolist() == [0, 3, 5, 6, 12, 14, 18]


@pytest.mark.parametrize("position_ids", [
    torch.arange(9)[None],                        # one document
    torch.arange(9).expand(3, 9),                 # one per row
    torch.arange(40, 49)[None],                   # a run continuing a cache: no restart
    torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]]),
])
def test_one_document_per_row_is_not_packed(position_ids):
    assert cu_seqlens_from_position_ids(position_ids) is None


def test_unpack_gives_each_document_its_row_and_repack_inverts_it():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 1, 0, 1]])
    cu = cu_seqlens_from_position_ids(position_ids)
    assert cu.tolist() == [0, 3, 5, 9, 14, 16, 18]
    x = torch.randn(2, 9, 3, 2, requires_grad=True)
    rows = unpack(x, cu)  # [N, Lmax, 3, 2]
    assert rows.shape == (6, 5, 3, 2)
    mask = pad_mask(cu, 5)
    assert mask.sum(1).tolist() == [3, 2, 4, 5, 2, 2]
    flat = x.detach().flatten(0, 1)
    for n in range(6):
        length = int(mask[n].sum())
        assert torch.equal(rows[n, :length].detach(), flat[cu[n]:cu[n] + length])
        assert (rows[n, length:] == 0).all()
    assert torch.equal(repack(rows, cu, 2, 9), x)
    # the gradient of unpack is repack of the (masked) row gradient, and repack's reaches real slots only
    r = torch.randn(rows.shape)
    (gx,) = torch.autograd.grad((rows * r).sum(), x)
    assert torch.equal(gx, repack(r * mask[..., None, None], cu, 2, 9))
    rows_leaf = torch.randn(6, 5, 3, 2, requires_grad=True)
    (grows,) = torch.autograd.grad(repack(rows_leaf, cu, 2, 9).sum(), rows_leaf)
    assert torch.equal(grows, mask[..., None, None].float().expand_as(grows))


def test_unpack_ids_and_positions():
    batch = flattened(DOCS)
    cu = cu_seqlens_from_position_ids(batch["position_ids"])
    assert unpack(batch["input_ids"], cu).tolist() == [[11, 12, 13, 0, 0], [14, 15, 0, 0, 0], DOCS[2]]
    positions = unpack(batch["position_ids"], cu)
    assert torch.equal(positions[pad_mask(cu, 5)], torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3, 4]))


def _ids_dataset(tmp_path, docs):
    Dataset.from_dict({"input_ids": docs}).save_to_disk(str(tmp_path / "ids"))
    return tmp_path / "ids"


def test_document_packing_matches_the_flattening_collator(tmp_path):
    """One block holding whole documents: the same position ids and labels as DataCollatorWithFlattening
    on those documents (each closed by its EOS), labels -100 at every document's first token."""
    tokenizer = types.SimpleNamespace(eos_token_id=EOS)  # the data are token ids already
    with_eos = [d + [EOS] for d in DOCS]
    ds = load_packed_dataset(_ids_dataset(tmp_path, DOCS), tokenizer, 13, packing="documents")
    expected = flattened(with_eos)
    assert len(ds) == 1
    for column in ("input_ids", "position_ids", "labels"):
        assert ds[column] == expected[column].tolist(), column
    assert ds["attention_mask"] == [[1] * 13]


def test_document_packing_across_block_boundaries(tmp_path):
    """Blocks of 5 cut documents: a block starts a fresh piece (position 0, label -100); otherwise the
    blocks are `pack`'s, and packing="blocks" is unchanged (no position_ids, labels = input_ids)."""
    tokenizer = types.SimpleNamespace(eos_token_id=EOS)
    path = _ids_dataset(tmp_path, DOCS)
    ds = load_packed_dataset(path, tokenizer, 5, packing="documents")
    # stream: 11 12 13 0 | 14 15 0 | 16 17 18 19 20 0  ->  [11 12 13 0 14] [15 0 16 17 18]  (rest dropped)
    assert ds["input_ids"] == pack(DOCS, 5, EOS) == [[11, 12, 13, 0, 14], [15, 0, 16, 17, 18]]
    assert ds["position_ids"] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert ds["labels"] == [[-100, 12, 13, 0, -100], [-100, 0, -100, 17, 18]]
    assert pack_documents(DOCS, 5, EOS)[1] == ds["position_ids"]
    blocks = load_packed_dataset(path, tokenizer, 5)
    assert "position_ids" not in blocks.column_names and blocks["labels"] == blocks["input_ids"]
    with pytest.raises(ValueError, match="--packing"):
        load_packed_dataset(path, tokenizer, 5, packing="docs")


def test_document_blocks_unpack_into_their_documents(tmp_path):
    """The data path and varlen agree: a block's position ids give back its document pieces."""
    ds = load_packed_dataset(_ids_dataset(tmp_path, DOCS), types.SimpleNamespace(eos_token_id=EOS), 5,
                             packing="documents")
    ids, positions = torch.tensor(ds["input_ids"]), torch.tensor(ds["position_ids"])
    cu = cu_seqlens_from_position_ids(positions)
    assert cu.tolist() == [0, 4, 5, 7, 10]
    assert unpack(ids, cu).tolist() == [[11, 12, 13, 0], [14, 0, 0, 0], [15, 0, 0, 0], [16, 17, 18, 0]]


# ------------------------------------------------- model level: packed documents == each document alone
LENGTHS = [[13, 6, 9, 4], [7, 25]]  # two packed rows of 32 tokens; chunk size 4: odd lengths, a document < 1 chunk


def packed_batch(lengths, seed=0):
    """-> documents (list of rows of 1-D id tensors), packed ids [B, T], their restarting position ids."""
    gen = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(1, 97, (n,), generator=gen) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in docs])
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    return docs, ids, positions


def logits_and_grads(model, run):
    """run() -> logits [B, T, V]; -> (logits, gradients of a fixed random projection of them)."""
    logits = run()
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((logits * weights).sum(), params, allow_unused=True)
    return logits, grads


def each_document_alone(model, docs):
    return torch.cat([torch.cat([model(d[None], use_cache=False).logits for d in row], 1) for row in docs])


def test_documents_as_right_padded_rows_equal_each_document_alone():
    """The varlen contract the model's packing rests on: unpack a packed batch into one right-padded row
    per document, run those rows (attention_mask = pad_mask), repack: the logits and every gradient are
    those of each document run alone (no attention or GDN state across a boundary, chunks restart)."""
    from natsl_testing import tiny_model

    model = tiny_model(seed=3).train()
    docs, ids, positions = packed_batch(LENGTHS)
    cu = cu_seqlens_from_position_ids(positions)

    def rows_run():
        rows = unpack(ids, cu)
        logits = model(rows, attention_mask=pad_mask(cu, rows.shape[1]).long(), use_cache=False).logits
        return repack(logits, cu, *ids.shape)

    packed, g_packed = logits_and_grads(model, rows_run)
    alone, g_alone = logits_and_grads(model, lambda: each_document_alone(model, docs))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert_same_grads(model, g_packed, g_alone, 1e-5)


def assert_same_grads(model, got, want, tol):
    """Per parameter, relative to the norm (the tied embedding's gradient is large)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(g is not None for g in want) > 10
    for name, a, b in zip(names, got, want):
        if b is not None:
            rel = ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
            assert rel < tol, (name, rel)
