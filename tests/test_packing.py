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


@pytest.mark.parametrize("packing", ["blocks", "documents"])
def test_a_text_file_without_text_is_refused(tmp_path, packing):
    path = tmp_path / "blank.txt"
    path.write_text("  \n\n\t\n")
    tokenizer = types.SimpleNamespace(eos_token_id=EOS)  # never reached
    with pytest.raises(ValueError, match="holds no text"):
        load_packed_dataset(path, tokenizer, 8, packing=packing)


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


# ------------------------------------------------- the data paths into the model (tests/test_packed_model.py:
# the model on packed position ids, reference and kernels, forward and gradients)
def piece_losses(model, pieces):
    """Each document piece alone: (its mean next-token loss, its number of predicted tokens)."""
    out = []
    for piece in (p for p in pieces if len(p) > 1):  # a one-token piece predicts nothing
        piece = torch.tensor(piece)[None]
        out.append((model(piece, labels=piece, use_cache=False).loss, piece.shape[1] - 1))
    return out


def token_mean(losses):
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def test_flattening_collator_batch_trains_as_each_document_alone():
    """DataCollatorWithFlattening's batch straight into the model: its loss (labels -100 at every document
    start) is the token-weighted mean of each document's own loss, its logits those of each document alone."""
    from natsl_testing import tiny_model

    model = tiny_model(seed=3)
    docs = [[int(t) for t in torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n))]
            for n in (13, 6, 9, 4)]
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in docs])
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        alone = torch.cat([model(torch.tensor(d)[None], use_cache=False).logits for d in docs], 1)
        torch.testing.assert_close(out.logits, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, token_mean(piece_losses(model, docs)))


def test_document_blocks_through_the_default_collator_train_as_each_piece_alone(tmp_path):
    """load_packed_dataset(packing="documents") -> Trainer's default_data_collator -> the model: each block's
    loss is that of its document pieces, each run alone."""
    from transformers import default_data_collator

    from natsl_testing import tiny_model

    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (13, 6, 9, 4, 21, 3)]
    ds = load_packed_dataset(_ids_dataset(tmp_path, docs), types.SimpleNamespace(eos_token_id=EOS), 16,
                             packing="documents")
    batch = default_data_collator([ds[i] for i in range(len(ds))])
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "labels"} and len(ds) == 62 // 16
    model = tiny_model(seed=5)
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        for b in range(len(ds)):
            ids, positions = batch["input_ids"][b], batch["position_ids"][b]
            starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
            pieces = [ids[i:j].tolist() for i, j in zip(starts, starts[1:])]
            block = model(ids[None], position_ids=positions[None], labels=batch["labels"][b][None], use_cache=False)
            torch.testing.assert_close(block.loss, token_mean(piece_losses(model, pieces)))
            torch.testing.assert_close(packed.logits[b], block.logits[0], rtol=1e-5, atol=1e-5)
