"""`train.gather_unpack_backward`: a packed batch's rows reach the heads by index_select, whose
backward then gathers each token's gradient from its one valid slot instead of an index_add
over every slot. Exact for mtl_dist's heads, which give pad slots exactly zero gradient (the
same values; torch.equal takes -0.0 for +0.0, which is all that may differ)."""

from __future__ import annotations

import copy

import pytest
import torch

from mtl_dist.config import load_config
from mtl_dist.data import collate_packed
from mtl_dist.errors import ConfigError
from mtl_dist.model import HEADS, UnpackRows, enable_packed_attention
from tests._models import samples, tiny_model
from tests._runs import DEMO


def packed_batch():
    return collate_packed(samples([5, 9, 16, 3, 12]), pad_token_id=0, max_length=16,
                          pack_multiple=8)  # one sample fills all its slots


def test_each_token_gets_its_valid_slots_gradient_and_pad_tail_tokens_none():
    batch = packed_batch()
    index, valid = batch["unpack_index"].reshape(-1), batch["attention_mask"].reshape(-1) != 0
    tokens = batch["input_ids"].shape[1]
    assert tokens > int(valid.sum())  # a pad tail, which no valid slot reads
    torch.manual_seed(0)
    rows = torch.randn(tokens, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(index.numel(), 4, dtype=torch.float64).masked_fill(~valid[:, None], 0)
    out = UnpackRows.apply(rows, index, valid)
    assert torch.equal(out, rows.detach().index_select(0, index))
    (got,) = torch.autograd.grad(out, rows, grad)
    (want,) = torch.autograd.grad(rows.index_select(0, index), rows, grad)
    assert torch.equal(got, want)
    tail = torch.ones(tokens, dtype=torch.bool)
    tail[index[valid]] = False
    assert tail.any() and not got[tail].any()


@pytest.mark.parametrize("head", sorted(HEADS))  # a new head kind must mask its pad slots too
def test_packed_training_gives_the_same_loss_and_gradients(head):
    torch.manual_seed(0)
    base = tiny_model(head=head)
    for module in base.modules():  # dropout everywhere, the same masks in both runs
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    enable_packed_attention(base, max_seqlen=16)
    batch = packed_batch()
    results = []
    for gather in (False, True):
        model = copy.deepcopy(base)
        model.gather_unpack_backward = gather
        torch.manual_seed(1)
        loss, _ = model(batch["input_ids"], batch["attention_mask"], 0,
                        token_type_ids=batch["token_type_ids"], labels=batch["labels"],
                        position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                        unpack_index=batch["unpack_index"])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        if grad is None:
            assert grads_on[name] is None, name
        else:
            assert torch.equal(grads_on[name], grad), name
    assert grads_off["encoder.embeddings.word_embeddings.weight"].abs().sum() > 0


def test_the_switch_needs_packing_and_reaches_the_model(tmp_path):
    from mtl_dist.trainer import Trainer

    with pytest.raises(ConfigError, match=r"config key 'train.gather_unpack_backward': expected "
                                          r"false with data.packing=false"):
        load_config(DEMO, [f"train.output_dir={tmp_path}", "train.gather_unpack_backward=true"])
    trainer = Trainer(load_config(DEMO, [f"train.output_dir={tmp_path}/out",
                                         f"data.cache_dir={tmp_path}/c", "data.packing=true",
                                         "data.pack_multiple=64",
                                         "train.gather_unpack_backward=true"]))
    assert trainer.model.gather_unpack_backward
    trainer.close()
