"""Packed (unpadded) training batches (`data.packing`) and compiled layers (`train.compile`):
same maths as the padded, eager path on CPU (the GPU flash path: tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from mtl_dist.config import load_config
from mtl_dist.data import collate, collate_packed
from mtl_dist.errors import ConfigError
from mtl_dist.model import compile_encoder_layers, enable_packed_attention
from tests._models import samples, tiny_model
from tests._runs import DEMO, NO_DROPOUT, assert_losses_close, run_cli


def test_packed_batch_layout():
    batch = collate_packed(samples([5, 3, 7]), pad_token_id=0, max_length=8, pack_multiple=8)
    assert batch["input_ids"].shape == (1, 16)  # 15 tokens + at least one pad token -> 16
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 15, 16]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0]
    padded = collate(samples([5, 3, 7]), pad_token_id=0, max_length=8)
    ids = batch["input_ids"][0][batch["unpack_index"]] * batch["attention_mask"]
    assert torch.equal(ids[:, :7], padded["input_ids"])
    types = batch["token_type_ids"][0][batch["unpack_index"]] * batch["attention_mask"]
    assert torch.equal(types[:, :7], padded["token_type_ids"])
    assert batch["attention_mask"].sum() == 15


def test_packed_row_always_ends_with_a_pad_sequence():
    batch = collate_packed(samples([4, 4]), pad_token_id=0, max_length=8, pack_multiple=8)
    assert batch["cu_seqlens"].tolist() == [0, 4, 8, 16]  # 8 real tokens: row of 16, tail of 8


@pytest.mark.parametrize("model_type,head", [("bert", "attention"), ("bert", "cls"),
                                             ("roberta", "attention"),
                                             # RoBERTa-style positions (from padding_idx + 1)
                                             # in types beyond roberta's own classes
                                             ("xlm-roberta-xl", "attention"),
                                             ("data2vec-text", "attention")])
def test_packed_forward_equals_padded_forward(model_type, head):
    torch.manual_seed(0)
    model = tiny_model(model_type, head, pad_token_id=1).eval()
    enable_packed_attention(model, max_seqlen=16)
    rows = samples([5, 9, 3, 12])
    padded = collate(rows, pad_token_id=1, max_length=16)
    packed = collate_packed(rows, pad_token_id=1, max_length=16, pack_multiple=8)
    with torch.no_grad():
        loss_a, a = model(padded["input_ids"], padded["attention_mask"], 0,
                          token_type_ids=padded["token_type_ids"], labels=padded["labels"])
        loss_b, b = model(packed["input_ids"], packed["attention_mask"], 0,
                          token_type_ids=packed["token_type_ids"], labels=packed["labels"],
                          position_ids=packed["position_ids"], cu_seqlens=packed["cu_seqlens"],
                          unpack_index=packed["unpack_index"])
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)


def test_pack_multiple_larger_than_max_length_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"data.pack_multiple.*<= data.max_length \(64\).*300"):
        load_config(DEMO, ["data.packing=true", "data.max_length=64", "data.pack_multiple=300"])


def test_packed_training_losses_equal_padded_training_losses(tmp_path):
    common = [f"data.cache_dir={tmp_path}/c", "train.max_steps=6", "train.log_steps=1",
              "checkpoint.save_best=false", "train.eval_at_epoch_end=false", *NO_DROPOUT]
    run_cli(["train", str(DEMO), f"train.output_dir={tmp_path}/padded", *common])
    run_cli(["train", str(DEMO), f"train.output_dir={tmp_path}/packed", "data.packing=true",
             "data.pack_multiple=16", *common])
    assert_losses_close(tmp_path / "padded", tmp_path / "packed", 1e-5, steps=6)


@pytest.mark.slow
def test_compiled_layers_train_like_eager_layers(tmp_path):
    """Also with the compile switches that pick Triton kernels and their launches (no effect on
    CPU, where they must still build and train)."""
    common = [f"data.cache_dir={tmp_path}/c", "train.max_steps=4", "train.log_steps=1",
              "checkpoint.save_best=false", "train.eval_at_epoch_end=false", *NO_DROPOUT]
    run_cli(["train", str(DEMO), f"train.output_dir={tmp_path}/eager", *common])
    run_cli(["train", str(DEMO), f"train.output_dir={tmp_path}/compiled", "train.compile=true",
             "train.compile_pdl=true", "train.compile_mix_order_reduction=false", *common],
            timeout=600)
    assert_losses_close(tmp_path / "eager", tmp_path / "compiled", 1e-4, steps=4)


@pytest.mark.parametrize("tuning, tuned", [("none", False), ("coordinate_descent", True)])
def test_compile_tuning_reaches_inductor_in_every_layer(tuning, tuned):
    model = tiny_model(head="cls", layers=3, vocab_size=100)
    assert compile_encoder_layers(model, tuning) == 3
    for layer in model.encoder.encoder.layer:
        options = layer._compiled_call_impl.get_compiler_config()
        assert options["coordinate_descent_tuning"] is tuned


@pytest.mark.parametrize("mix_order, pdl", [(True, False), (False, True)])
def test_compile_switches_reach_inductor_in_every_layer(mix_order, pdl):
    model = tiny_model(head="cls", layers=3, vocab_size=100)
    assert compile_encoder_layers(model, "coordinate_descent", mix_order_reduction=mix_order,
                                  pdl=pdl) == 3
    for layer in model.encoder.encoder.layer:
        options = layer._compiled_call_impl.get_compiler_config()
        assert options["coordinate_descent_tuning"] is True  # the tuning's options kept
        assert options.get("triton.mix_order_reduction", True) is mix_order
        assert options.get("triton.enable_pdl", False) is pdl


def test_compile_switches_reach_the_trainer(monkeypatch, tmp_path):
    import mtl_dist.trainer as trainer_module

    seen = []
    monkeypatch.setattr(trainer_module, "compile_encoder_layers",
                        lambda model, *switches: seen.append(switches))
    cfg = load_config(DEMO, [f"train.output_dir={tmp_path}", f"data.cache_dir={tmp_path}/c",
                             "train.compile=true", "train.compile_mix_order_reduction=false",
                             "train.compile_pdl=true"])
    trainer_module.Trainer(cfg)
    assert seen == [("none", False, True)]


@pytest.mark.parametrize("key, on, option, switch, lacks", [
    ("train.compile_mix_order_reduction", "false", "mix_order_reduction",
     {"mix_order_reduction": False}, "no mix-order reduction to turn off"),
    ("train.compile_pdl", "true", "enable_pdl", {"pdl": True},
     "no Programmatic Dependent Launch"),
])
def test_compile_switches_are_refused_without_compiled_layers_or_inductor_support(
        monkeypatch, key, on, option, switch, lacks):
    import torch._inductor.config as inductor

    default = "true" if on == "false" else "false"
    with pytest.raises(ConfigError, match=f"'{key}': expected {default} with train.compile=false"):
        load_config(DEMO, [f"{key}={on}"])
    monkeypatch.delattr(inductor.triton, option, raising=False)  # an older torch's Inductor
    with pytest.raises(ConfigError, match=f"'{key}': torch .*Inductor has {lacks} "
                                          rf"\(no triton.{option}\); set it to {default}$"):
        compile_encoder_layers(tiny_model(head="cls", layers=1, vocab_size=100), **switch)


def test_compile_tuning_is_refused_without_compiled_layers_or_with_an_unknown_name():
    with pytest.raises(ConfigError, match="'train.compile_tuning': expected 'none' with "
                                          "train.compile=false"):
        load_config(DEMO, ["train.compile_tuning=coordinate_descent"])
    with pytest.raises(ConfigError, match="'train.compile_tuning': expected one of none, "
                                          "coordinate_descent, got 'max_autotune'"):
        load_config(DEMO, ["train.compile=true", "train.compile_tuning=max_autotune"])


def test_segment_attention_equals_attention_within_each_sequence():
    """The CPU path of packed attention: each sequence (the pad tail too) attends only to
    itself; values and gradients equal SDPA run on each sequence alone."""
    from mtl_dist.model import varlen_attention

    torch.manual_seed(0)
    lengths = [5, 1, 12, 7, 3]  # the last one plays the pad tail
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 2, 4, requires_grad=True) for _ in range(3))
    out = varlen_attention(q, k, v, cu, max_seqlen=12, dropout_p=0.0, scale=None)
    parts = [torch.nn.functional.scaled_dot_product_attention(
        *(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
    expected = torch.cat(parts)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direct", [False, True], ids=["copied", "direct_weight_grads"])
def test_packed_attention_hands_q_k_v_gradients_to_the_projections_as_views(direct):
    """The compiled backward of a packed layer copies no q/k/v gradient on its way from the
    attention kernel to the projections' GEMMs: `query[0]` there made select's backward write
    a zero-filled tensor and a clone per layer (written twice with train.direct_weight_grads)."""
    from torch import nn
    from torch._inductor.utils import run_and_get_code

    from mtl_dist.graphs import write_weight_grads_into
    from mtl_dist.model import transformer_layers

    torch._dynamo.reset()
    model = tiny_model()
    enable_packed_attention(model, max_seqlen=16)
    compile_encoder_layers(model)
    if direct:
        layers = transformer_layers(model, "test")
        linears = [m for m in layers.modules() if type(m) is nn.Linear]
        write_weight_grads_into(layers, {id(m.weight): torch.zeros_like(m.weight)
                                         for m in linears})
    packed = collate_packed(samples([5, 9, 3, 12]), pad_token_id=0, max_length=16,
                            pack_multiple=8)

    def step():
        loss, _ = model(packed["input_ids"], packed["attention_mask"], 0,
                        token_type_ids=packed["token_type_ids"], labels=packed["labels"],
                        position_ids=packed["position_ids"], cu_seqlens=packed["cu_seqlens"],
                        unpack_index=packed["unpack_index"])
        loss.backward()

    _, code = run_and_get_code(step)
    backward = "\n".join(code)
    assert "weight_grad_into" in backward if direct else "extern_kernels.mm" in backward
    assert "select_backward" not in backward and "clone" not in backward
