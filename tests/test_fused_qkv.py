"""`train.fused_qkv`: query, key and value projected by one GEMM over their stacked weights —
the same outputs, gradients, parameters and training as three Linears (CPU; GPU: test_gpu.py)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from mtl_dist.config import load_config
from mtl_dist.data import collate, collate_packed
from mtl_dist.errors import ConfigError
from mtl_dist.graphs import WeightGradIntoLinear, write_weight_grads_into
from mtl_dist.master import MasterWeights
from mtl_dist.model import (
    FusedQKVAttention,
    compile_encoder_layers,
    enable_fused_qkv,
    enable_packed_attention,
    stacked_view,
    transformer_layers,
)
from mtl_dist.trainer import flat_segments
from tests._models import samples, tiny_model
from tests._runs import DEMO, assert_switch_trains_alike

LENGTHS = [5, 9, 3, 12]


def loss_of(model, packed: bool, task: int = 0) -> torch.Tensor:
    """Task `task`'s loss on a small batch (labels below 3: valid for every head)."""
    batch = samples(LENGTHS, task_id=task)
    if packed:
        b = collate_packed(batch, pad_token_id=0, max_length=16, pack_multiple=8)
        return model(b["input_ids"], b["attention_mask"], task,
                     token_type_ids=b["token_type_ids"], labels=b["labels"],
                     position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"],
                     unpack_index=b["unpack_index"])[0]
    b = collate(batch, pad_token_id=0, max_length=16)
    return model(b["input_ids"], b["attention_mask"], task, token_type_ids=b["token_type_ids"],
                 labels=b["labels"])[0]


def qkv_linears(model) -> list[nn.Linear]:
    return [m for layer in transformer_layers(model, "test") for m in layer.attention.self.projections]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_fused_qkv_gives_the_split_projections_loss_and_gradients(model_type, packed):
    torch.manual_seed(0)
    split = tiny_model(model_type, pad_token_id=0 if model_type == "bert" else 1)
    fused = copy.deepcopy(split)
    assert enable_fused_qkv(fused) == 2
    for model in (split, fused):
        if packed:
            enable_packed_attention(model, max_seqlen=16)
    calls = []  # the fused layers never run their q/k/v Linears
    for linear in qkv_linears(fused):
        linear.register_forward_hook(lambda *_: calls.append(1))
    losses = [loss_of(model, packed) for model in (split, fused)]
    for loss in losses:
        loss.backward()
    assert not calls
    assert all(isinstance(layer.attention.self, FusedQKVAttention)
               for layer in transformer_layers(fused, "test"))
    assert list(fused.state_dict()) == list(split.state_dict())  # same parameters, same names
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for (name, a), (_, b) in zip(split.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def _gemms_in_compiled_forward(fused: bool) -> int:
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = tiny_model(layers=1).eval()
    enable_packed_attention(model, max_seqlen=16)
    if fused:
        enable_fused_qkv(model)
    compile_encoder_layers(model)
    with torch.no_grad():
        _, code = run_and_get_code(lambda: loss_of(model, packed=True))
    source = "\n".join(code)
    return sum(source.count(f"extern_kernels.{op}(") for op in ("mm", "addmm"))


def test_compiled_fused_layer_projects_q_k_v_in_one_gemm():
    """Inductor keeps the one GEMM: a layer's forward runs 4 (q/k/v, attention output, FFN in
    and out) where the split layer runs 6."""
    assert _gemms_in_compiled_forward(fused=False) == 6
    assert _gemms_in_compiled_forward(fused=True) == 4


def _flat_bf16_model():
    """A fused tiny model in bf16 with flat masters, and its flat bf16 gradient views."""
    torch.manual_seed(0)
    model = tiny_model()
    enable_packed_attention(model, max_seqlen=16)
    enable_fused_qkv(model)
    cfg = load_config(DEMO, ["train.mixed_precision=bf16", "train.bf16_weights=true",
                            "train.flat_masters=true"])
    masters = MasterWeights(model, flat_segments(model, cfg))
    return model, masters.bf16_grad_views()


def test_stacked_view_only_where_the_tensors_lie_end_to_end():
    flat = torch.arange(12.0)
    a, b, c = flat[:4].view(2, 2), flat[4:8].view(2, 2), flat[8:].view(2, 2)
    stacked = stacked_view([a, b, c])
    assert stacked is not None and stacked.data_ptr() == flat.data_ptr()
    assert torch.equal(stacked, flat.view(6, 2))
    assert stacked_view([a, c]) is None  # a gap
    assert stacked_view([b, a]) is None  # out of order
    assert stacked_view([a, torch.zeros(2, 2)]) is None  # another storage
    base = torch.arange(8.0)
    rows = [base.as_strided((1, 4), (7, 1)), base[4:].view(1, 4)]  # size 1: any stride
    assert torch.equal(stacked_view(rows), base.view(2, 4))
    biases = torch.arange(6.0)
    assert torch.equal(stacked_view([biases[:3], biases[3:]]), biases)


def test_direct_weight_grads_write_the_three_from_one_gemm_into_the_flat_buffer():
    """With flat masters the fused attention writes q/k/v's weight gradients, from its one GEMM,
    into their slices of the flat bf16 buffer; they equal the gradients autograd gives the
    same bf16 model without the switch, to bf16 noise."""
    model, views = _flat_bf16_model()
    reference = copy.deepcopy(model)
    layers = transformer_layers(model, "test")
    direct = write_weight_grads_into(layers, views)
    qkv = qkv_linears(model)
    assert {id(m.weight) for m in qkv} <= direct
    assert not any(isinstance(m, WeightGradIntoLinear) for m in qkv)  # never run: not rewired
    assert sum(isinstance(m, WeightGradIntoLinear) for m in layers.modules()) == 3 * len(layers)
    for layer in layers:
        attention = layer.attention.self
        assert attention.qkv_weight.data_ptr() == attention.query.weight.data_ptr()
        assert attention.qkv_weight_grad_target.data_ptr() == \
            views[id(attention.query.weight)].data_ptr()
    for view in views.values():
        view.fill_(float("nan"))
    loss_of(model, packed=True).backward()
    loss_of(reference, packed=True).backward()
    for (name, p), (_, ref) in zip(model.named_parameters(), reference.named_parameters(),
                                   strict=True):
        if id(p) in direct:
            assert p.grad is None, name
            got = views[id(p)]
        else:
            got = p.grad
        torch.testing.assert_close(got.float(), ref.grad.float(), rtol=2e-2, atol=2e-3,
                                   msg=name)


@pytest.mark.parametrize("projection", ["query", "value"])
def test_a_re_pointed_weight_is_refused_before_a_capture_and_stale_targets_are_dropped(
        projection):
    model, views = _flat_bf16_model()
    layers = transformer_layers(model, "test")
    write_weight_grads_into(layers, views)
    attention = layers[0].attention.self
    attention.check_stacked_weights()  # as laid out: fine
    with torch.no_grad():
        weight = getattr(attention, projection).weight
        weight.data = weight.data.clone()
    with pytest.raises(RuntimeError, match="train.fused_qkv: the query/key/value weights were"):
        attention.check_stacked_weights()
    # targets that no longer stack: the old target is dropped, autograd takes over
    write_weight_grads_into(layers, {k: v.clone() for k, v in views.items()})
    assert attention.qkv_weight is None and attention.qkv_weight_grad_target is None


def test_trainer_installs_the_fused_attention_in_every_layer(tmp_path):
    from mtl_dist.trainer import Trainer

    trainer = Trainer(load_config(DEMO, [f"train.output_dir={tmp_path}/out",
                                         f"data.cache_dir={tmp_path}/c", "train.fused_qkv=true"]))
    layers = transformer_layers(trainer.module, "test")
    assert all(isinstance(layer.attention.self, FusedQKVAttention) for layer in layers)


def test_fused_attention_without_flat_targets_keeps_autograd_gradients():
    """Targets that do not lie end to end (no flat masters): the fused GEMM's weights get their
    gradients from autograd, and only the other Linears write theirs directly."""
    torch.manual_seed(0)
    model = tiny_model()
    enable_fused_qkv(model)
    layers = transformer_layers(model, "test")
    targets = {id(m.weight): torch.zeros_like(m.weight)
               for m in layers.modules() if type(m) is nn.Linear}
    direct = write_weight_grads_into(layers, targets)
    assert direct.isdisjoint(id(m.weight) for m in qkv_linears(model))
    loss_of(model, packed=False).backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
               for m in qkv_linears(model))


def test_fused_qkv_trains_like_three_linears(tmp_path):
    assert_switch_trains_alike(tmp_path, "train.fused_qkv")


def test_fused_qkv_refuses_zero_stage_3():
    with pytest.raises(ConfigError, match="train.fused_qkv.*train.zero_stage=3"):
        load_config(DEMO, ["train.fused_qkv=true", "train.zero_stage=3"])


def test_fused_qkv_names_a_model_without_q_k_v_linears():
    model = tiny_model()
    transformer_layers(model, "test")[0].attention.self.key = nn.Linear(32, 16)
    with pytest.raises(ConfigError, match="'train.fused_qkv': BertSelfAttention has no query, key"):
        enable_fused_qkv(model)


def test_a_fused_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """`torch.save(model)` of a fused model: the run-time class is rebuilt on load, even in an
    interpreter that never enabled fused_qkv, and gives the same outputs."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    enable_fused_qkv(model)
    batch = collate(samples(LENGTHS), pad_token_id=0, max_length=16)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], 0,
                       token_type_ids=batch["token_type_ids"])[1]
    torch.save({"model": model, "batch": batch}, tmp_path / "model.pt")
    script = (
        "import sys, torch\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "model, b = saved['model'], saved['batch']\n"
        "attention = model.encoder.encoder.layer[0].attention.self\n"
        "print(type(attention).__name__, type(attention).__mro__[1].__name__)\n"
        "with torch.no_grad():\n"
        "    out = model(b['input_ids'], b['attention_mask'], 0, token_type_ids=b['token_type_ids'])\n"
        "torch.save(out[1], sys.argv[2])\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["FusedQKVBertSelfAttention", "FusedQKVAttention"]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, rtol=0, atol=0)
    assert isinstance(copy.deepcopy(model).encoder.encoder.layer[0].attention.self,
                      FusedQKVAttention)
