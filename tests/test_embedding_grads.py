"""`train.gemm_embedding_grads`: small embedding tables take their gradients from one GEMM —
the same gradients, parameters and training as aten's embedding backward (CPU; GPU:
test_gpu.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist.embedding_grads import (
    GemmGradEmbedding,
    embedding_weight_grad,
    enable_gemm_embedding_grads,
    write_embedding_grads_into,
)
from mtl_dist.errors import ConfigError
from mtl_dist.model import enable_packed_attention
from tests._models import assert_same_gradients, tiny_model
from tests._runs import DEMO, assert_switch_trains_alike, in_triton_interpreter
from tests.test_fused_qkv import loss_of


def aten_grad(ids, grad, rows, padding_idx, dtype):
    weight = torch.randn(rows, grad.shape[-1], dtype=dtype, requires_grad=True)
    F.embedding(ids, weight, padding_idx).backward(grad)
    return weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [None, 1])
@pytest.mark.parametrize("rows", [2, 40, 500], ids=["2 rows", "40 rows", "more rows than tokens"])
def test_gradient_equals_atens(rows, padding_idx, dtype):
    torch.manual_seed(0)
    ids = torch.randint(0, rows, (6, 20))  # 120 tokens, most rows of the small tables repeated
    ids[0, :5] = 1  # the padding row, if any, is used
    grad = torch.randn(6, 20, 16, dtype=dtype)
    ours = embedding_weight_grad(ids, grad, rows, padding_idx)
    if rows > ids.numel():  # aten's own backward, as is
        assert torch.equal(ours, aten_grad(ids, grad, rows, padding_idx, dtype))
        return
    # the exact sums: fp32 from the same inputs (aten's CPU kernel sums bf16 in bf16)
    expected = aten_grad(ids, grad.float(), rows, padding_idx, torch.float32)
    assert ours.shape == expected.shape and ours.dtype == dtype
    if padding_idx is not None:
        assert ours[padding_idx].abs().max() == 0
    # bf16: summed in fp32 and rounded once (2**-9 relative), as aten's CUDA kernel does
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 \
        else dict(rtol=4e-3, atol=1e-3)
    torch.testing.assert_close(ours.float(), expected, **tolerance)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("padding_idx", [None, 1], ids=["bert-like", "roberta-like positions"])
def test_a_table_takes_the_gemm_path_and_atens_gradient(padding_idx):
    torch.manual_seed(0)
    aten = nn.Embedding(24, 8, padding_idx=padding_idx)
    gemm = copy.deepcopy(aten)
    enable_gemm_embedding_grads(gemm)
    ids = torch.randint(0, 24, (2, 40))
    ids[0, :6] = 1
    out_aten, out_gemm = aten(ids), gemm(ids)
    assert torch.equal(out_gemm, out_aten)
    assert type(out_gemm.grad_fn).__name__ == "_EmbeddingWithGemmGradBackward"  # the new path
    grad = torch.randn_like(out_aten)
    out_aten.backward(grad)
    out_gemm.backward(grad)
    torch.testing.assert_close(gemm.weight.grad, aten.weight.grad, rtol=1e-5, atol=1e-6)
    if padding_idx is not None:
        assert gemm.weight.grad[padding_idx].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_sums_stay_fp32_when_backward_runs_under_autocast(dtype):
    """An eager step runs backward inside the trainer's autocast: the fp32 gradient is not
    rounded to bf16 by the GEMM, nor overflows in fp16 (sums of 3,000 gradients of 50)."""
    aten = nn.Embedding(2, 8)
    gemm = copy.deepcopy(aten)
    enable_gemm_embedding_grads(gemm)
    ids = torch.zeros(3000, dtype=torch.long)
    grad = torch.full((3000, 8), 50.0) + torch.randn(3000, 8)
    with torch.autocast("cpu", dtype=dtype):
        out_aten, out_gemm = aten(ids), gemm(ids)
        out_aten.backward(grad)
        out_gemm.backward(grad)
    assert gemm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(gemm.weight.grad, aten.weight.grad, rtol=1e-5, atol=1e-3)


def test_a_table_above_the_row_cap_keeps_atens_backward(monkeypatch):
    import mtl_dist.embedding_grads as embedding_grads

    monkeypatch.setattr(embedding_grads, "MAX_GEMM_ROWS", 16)
    ids, grad = torch.randint(0, 20, (100,)), torch.randn(100, 8, dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr(torch.ops.aten, "embedding_dense_backward",
                        lambda *a: calls.append(a) or torch.zeros(20, 8))
    embedding_weight_grad(ids, grad, 20, None)  # 20 rows <= 100 tokens, but above the cap
    assert len(calls) == 1
    embedding_weight_grad(ids, grad, 16, None)
    assert len(calls) == 1


def test_the_model_keeps_its_outputs_state_and_gradients():
    torch.manual_seed(0)
    aten = tiny_model()
    enable_packed_attention(aten, 16)
    gemm = copy.deepcopy(aten)
    assert enable_gemm_embedding_grads(gemm.encoder) == 3  # words, positions, token types
    assert enable_gemm_embedding_grads(gemm.encoder) == 3  # a second call changes nothing
    tables = [m for m in gemm.encoder.modules() if isinstance(m, nn.Embedding)]
    assert all(type(m) is GemmGradEmbedding for m in tables)
    assert gemm.state_dict().keys() == aten.state_dict().keys()
    for packed in (False, True):
        loss_aten, loss_gemm = loss_of(aten, packed), loss_of(gemm, packed)
        assert loss_gemm.item() == loss_aten.item()
        aten.zero_grad(), gemm.zero_grad()
        loss_aten.backward(), loss_gemm.backward()
        assert_same_gradients(gemm, aten)
    with torch.no_grad():  # evaluation: aten's forward as is
        assert loss_of(gemm, False).item() == loss_of(aten, False).item()


def test_the_trainer_installs_it(tmp_path):
    from mtl_dist.config import load_config
    from mtl_dist.trainer import Trainer

    trainer = Trainer(load_config(DEMO, [f"train.output_dir={tmp_path}/out",
                                         f"data.cache_dir={tmp_path}/c",
                                         "train.gemm_embedding_grads=true"]))
    tables = [m for m in trainer.module.encoder.modules() if isinstance(m, nn.Embedding)]
    assert len(tables) == 3 and all(type(m) is GemmGradEmbedding for m in tables)
    trainer.close()


def test_trains_like_atens_embedding_backward(tmp_path):
    assert_switch_trains_alike(tmp_path, "train.gemm_embedding_grads")


def test_refuses_tables_it_would_change():
    model = tiny_model()
    model.encoder.embeddings.position_embeddings.max_norm = 1.0
    with pytest.raises(ConfigError, match="'train.gemm_embedding_grads': an embedding table "
                                          "with max_norm"):
        enable_gemm_embedding_grads(model.encoder)

    class Scaled(nn.Embedding):
        pass

    model = tiny_model()
    model.encoder.embeddings.token_type_embeddings.__class__ = Scaled
    with pytest.raises(ConfigError, match="'train.gemm_embedding_grads': Scaled is not a plain"):
        enable_gemm_embedding_grads(model.encoder)
    assert type(model.encoder.embeddings.word_embeddings) is nn.Embedding  # nothing changed


# ------------------------------------------------- train.triton_embedding_grads (large tables)
def written_around(flat: torch.Tensor, before: int, after: int) -> int:
    """How many of a NaN buffer's `before` first and `after` last elements, around the view
    given to the kernel, it wrote."""
    return int((~flat[:before].isnan()).sum() + (~flat[-after:].isnan()).sum())


def triton_kernel_errors() -> dict:
    """Run inside Triton's CPU interpreter (fp32): the kernel's gradient against aten's for
    tables larger than the batch, with and without a padding row (also given as a negative
    index), rows and widths that are not multiples of the blocks, one row's tokens spread over
    the batch and another's 90 in a run (several blocks), runs that meet the blocks' edges in
    every way, at two tile sizes; a non-finite gradient on a
    padding token reaches no row; ids outside the table are left out."""
    from mtl_dist.triton_embedding import embedding_grad_triton

    torch.manual_seed(0)
    errors = {}
    for rows, tokens, hidden, padding_idx in [(300, 150, 40, None), (300, 150, 40, 1),
                                              (1000, 700, 300, 0), (1000, 700, 300, -1000),
                                              (65, 64, 128, None)]:
        ids = torch.randint(0, rows, (tokens,))
        ids[::37] = 5
        ids[100:110] = 1
        ids[200:290] = 7
        grad = torch.randn(tokens, hidden)
        ours = embedding_grad_triton(ids, grad, rows, padding_idx)
        expected = aten_grad(ids, grad, rows, padding_idx, torch.float32)
        errors[f"{rows}x{hidden}, {tokens} tokens, padding {padding_idx}"] = \
            (ours - expected).abs().max().item()
    ids, grad = torch.randint(0, 300, (150,)), torch.randn(150, 40)
    ids[:70] = 299  # the last row's run crosses a block's edge: its tail's store must stop at 40
    flat = torch.full((3 + 300 * 40 + 5,), float("nan"))  # a view inside a NaN buffer
    ours = embedding_grad_triton(ids, grad, 300, 2, flat[3:-5].view(300, 40), tiles=(16, 64, 4))
    errors["written into a view of a flat buffer"] = \
        (ours - aten_grad(ids, grad, 300, 2, torch.float32)).abs().max().item()
    errors["the view's neighbours written"] = written_around(flat, 3, 5)
    errors["not the view returned"] = int(ours.data_ptr() != flat[3:].data_ptr())
    # runs that fill a block, start at a block's start and go on, end at a block's end, span
    # two blocks, padding tokens inside a block, at the default tiles and at 16-token blocks
    counts = {1: 16, 2: 20, 3: 12, 4: 40, 5: 1, 6: 55, 7: 10, 8: 3}
    ids = torch.cat([torch.full((n,), r) for r, n in counts.items()])
    ids = ids[torch.randperm(len(ids))]
    grad = torch.randn(len(ids), 40)
    for tiles in [(16, 32, 4), (64, 128, 4)]:
        ours = embedding_grad_triton(ids, grad, 12, 7, tiles=tiles)
        errors[f"block edges at {tiles[0]}-token blocks"] = \
            (ours - aten_grad(ids, grad, 12, 7, torch.float32)).abs().max().item()
    ids, grad = torch.tensor([0, 3, 0, 9, 3]), torch.randn(5, 16)
    grad[0] = float("nan")
    ours = embedding_grad_triton(ids, grad, 10, 0)
    errors["nan on a padding token: rows not finite"] = int((~torch.isfinite(ours)).sum())
    ids, grad = torch.tensor([3, 5, 3, 9, 4, 4, 8, 5]), torch.randn(8, 16)
    grad[1, 2], grad[7, 4], grad[2, 6] = float("inf"), float("nan"), float("-inf")
    ours, expected = (embedding_grad_triton(ids, grad, 10, 0),
                      aten_grad(ids, grad, 10, 0, torch.float32))
    errors["non-finite gradients on real tokens: elsewhere than aten's"] = \
        int((torch.isfinite(ours) != torch.isfinite(expected)).sum()
            + (ours.isnan() != expected.isnan()).sum())
    finite = torch.isfinite(expected)
    errors["non-finite gradients on real tokens: the finite values"] = \
        (ours[finite] - expected[finite]).abs().max().item()
    ids, grad = torch.tensor([2, 12, 2, -1, -2]), torch.randn(5, 16)
    flat = torch.full((64 + 10 * 16 + 5,), float("nan"))  # rows -1 and -2 would land in NaNs
    ours = embedding_grad_triton(ids, grad, 10, 3, flat[64:-5].view(10, 16))
    errors["ids outside the table"] = (ours - aten_grad(ids[[0, 2]], grad[[0, 2]], 10, 3,
                                                        torch.float32)).abs().max().item()
    errors["ids outside the table: the view's neighbours written"] = written_around(flat, 64, 5)
    return errors


def test_triton_kernel_gives_atens_gradient_in_the_interpreter():
    pytest.importorskip("triton")
    errors = in_triton_interpreter("import tests.test_embedding_grads as t",
                                   "t.triton_kernel_errors()")
    assert len(errors) == 15
    for key, error in errors.items():
        assert error < 1e-5, (key, error)


@pytest.mark.parametrize("tiles", [(8, 128, 4), (48, 128, 4), (64, 0, 4)])
def test_the_triton_kernel_refuses_tiles_and_dtypes_before_touching_out(tiles):
    pytest.importorskip("triton")
    from mtl_dist.triton_embedding import embedding_grad_triton

    ids, grad, out = torch.tensor([1, 2]), torch.randn(2, 16), torch.full((5, 16), 7.0)
    with pytest.raises(ValueError, match=r"tiles must be powers of two.*got \("):
        embedding_grad_triton(ids, grad, 5, None, out, tiles=tiles)
    with pytest.raises(ValueError, match="gradients in .* only, got torch.float64"):
        embedding_grad_triton(ids, grad.double(), 5, None, out.double())
    assert (out == 7).all()


def test_large_tables_take_aten_on_cpu_and_the_switch_needs_the_gemm_one(tmp_path):
    from mtl_dist.config import load_config

    ids, grad = torch.randint(0, 30, (20,)), torch.randn(20, 8)
    torch.testing.assert_close(embedding_weight_grad(ids, grad, 30, None, "triton"),
                               aten_grad(ids, grad, 30, None, torch.float32))
    with pytest.raises(ValueError, match="large_tables='cuda'"):
        enable_gemm_embedding_grads(tiny_model().encoder, "cuda")
    with pytest.raises(ConfigError, match="'train.triton_embedding_grads': expected false "
                                          "without train.gemm_embedding_grads=true"):
        load_config(DEMO, [f"train.output_dir={tmp_path}", "train.triton_embedding_grads=true"])


def test_the_trainer_hands_the_large_tables_to_the_triton_kernel(tmp_path):
    from mtl_dist.config import load_config
    from mtl_dist.trainer import Trainer

    trainer = Trainer(load_config(DEMO, [f"train.output_dir={tmp_path}/out",
                                         f"data.cache_dir={tmp_path}/c",
                                         "train.gemm_embedding_grads=true",
                                         "train.triton_embedding_grads=true"]))
    tables = [m for m in trainer.module.encoder.modules() if isinstance(m, nn.Embedding)]
    assert len(tables) == 3 and all(m.large_tables == "triton" for m in tables)
    trainer.close()


# --------------------------------------- train.direct_embedding_grads (into the flat buffer)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [12, 500], ids=["gemm table", "aten table"])
def test_a_table_with_a_target_writes_autograds_gradient_there(rows, dtype):
    """With a target (a view of a NaN-filled flat buffer, as the graphs give it), the weight's
    `.grad` stays None and the target holds the gradient autograd would have put there, every
    element written (also the padding row and rows no token reached), its neighbours untouched."""
    torch.manual_seed(0)
    plain = GemmGradEmbedding(rows, 16, padding_idx=1).to(dtype)
    direct = copy.deepcopy(plain)
    flat = torch.full((7 + rows * 16 + 9,), float("nan"), dtype=dtype)
    target = flat[7:-9].view(rows, 16)
    assert write_embedding_grads_into(direct, {id(direct.weight): target}) == {id(direct.weight)}
    ids = torch.randint(0, min(rows, 40), (3, 30))
    ids[0, :4] = 1
    grad = torch.randn(3, 30, 16, dtype=dtype)
    plain(ids).backward(grad)
    direct(ids).backward(grad)
    assert direct.weight.grad is None
    assert torch.equal(target, plain.weight.grad)
    assert written_around(flat, 7, 9) == 0
    assert target[1].abs().max() == 0  # the padding row
    plain.weight.grad = None
    ids, grad = torch.randint(0, min(rows, 40), (3, 30)), torch.randn(3, 30, 16, dtype=dtype)
    plain(ids).backward(grad)
    direct(ids).backward(grad)  # a second step overwrites, as the graphs' copy does
    assert torch.equal(target, plain.weight.grad)


def test_tables_are_routed_to_their_targets_and_back():
    model = tiny_model()
    enable_gemm_embedding_grads(model.encoder)
    tables = [m for m in model.encoder.modules() if isinstance(m, GemmGradEmbedding)]
    targets = {id(t.weight): torch.zeros_like(t.weight) for t in tables[1:]}
    assert write_embedding_grads_into(model.encoder, targets) == set(targets)
    assert tables[0].weight_grad_target is None
    assert all(t.weight_grad_target is targets[id(t.weight)] for t in tables[1:])
    wrong = {**targets, id(tables[-1].weight): torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"the target of a \(2, 32\) table has shape \(3, 3\)"):
        write_embedding_grads_into(model.encoder, wrong)
    assert all(t.weight_grad_target is targets[id(t.weight)] for t in tables[1:])  # unchanged
    assert write_embedding_grads_into(model.encoder, {}) == set()  # back to autograd's
    assert all(t.weight_grad_target is None for t in tables)


def test_a_target_of_another_dtype_or_shape():
    ids, grad = torch.randint(0, 6, (40,)), torch.randn(40, 8, dtype=torch.bfloat16)
    target = torch.full((6, 8), float("nan"))  # fp32: the bf16 sums are copied in
    assert embedding_weight_grad(ids, grad, 6, None, out=target) is target
    assert torch.equal(target, embedding_weight_grad(ids, grad, 6, None).float())
    with pytest.raises(ValueError, match=r"out has shape \(6, 4\), the gradient \(6, 8\)"):
        embedding_weight_grad(ids, grad, 6, None, out=torch.zeros(6, 4, dtype=torch.bfloat16))


def test_the_graphs_refuse_a_routed_weight_that_autograd_hands_a_gradient():
    """A routed weight also read outside its table's forward (DeBERTa's relative-position
    table is read by `.weight`): its autograd gradient would be lost, so the hand-over hook
    raises, naming it (StepGraphs itself needs CUDA: its hook alone here)."""
    from mtl_dist.graphs import StepGraphs

    graphs = object.__new__(StepGraphs)
    table = nn.Embedding(4, 2)
    graphs._direct = {id(table.weight): "encoder.embeddings.word_embeddings.weight"}
    graphs._mode = "off"
    graphs._hand_over(table.weight)  # autograd calls it with no gradient for routed weights
    table.weight.grad = torch.ones_like(table.weight)
    with pytest.raises(RuntimeError, match="autograd gave encoder.embeddings.word_embeddings."
                                           "weight a gradient, but its gradient is written"):
        graphs._hand_over(table.weight)


def test_direct_embedding_grads_needs_both_switches_it_builds_on(tmp_path):
    from mtl_dist.config import load_config

    direct_weight_grads = ["train.mixed_precision=bf16", "train.bf16_weights=true",
                           "train.cuda_graphs=true",
                           "train.flat_masters=true", "train.gradient_accumulation_steps=1",
                           "train.direct_weight_grads=true"]
    for given in (["train.gemm_embedding_grads=true"], [], direct_weight_grads):
        with pytest.raises(ConfigError, match="'train.direct_embedding_grads': expected false "
                                              "with train.gemm_embedding_grads="):
            load_config(DEMO, [f"train.output_dir={tmp_path}", *given,
                               "train.direct_embedding_grads=true"])
