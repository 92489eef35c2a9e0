"""train.attention_kernel=triton: mtl_dist's varlen attention kernel (mtl_dist/triton_attention.py).

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the
switch is read when the kernels are defined), in fp32: its bf16 matmul is not usable. They
are checked against attention computed per sequence in fp32 with the very dropout mask the
kernels draw. The GPU tests check bf16 against FlashAttention 2 and training end to end.
"""

from __future__ import annotations

import pytest
import torch

from mtl_dist.config import ConfigError, load_config
from tests._runs import DEMO, FAST, in_triton_interpreter

triton = pytest.importorskip("triton")
tl = triton.language
from mtl_dist.triton_attention import _keep, _threshold, _width  # noqa: E402

LENGTHS = [5, 70, 1, 130, 64, 17]  # one token, a full tile, over two tiles, a tile's edge


@triton.jit
def _mask_kernel(OUT, SEED, n_tokens, threshold, WIDTH: tl.constexpr, BITS: tl.constexpr,
                 ROUNDS: tl.constexpr):
    """Tiles of 16 x 16, not the kernels' 64 x 64: the mask must not depend on the tiling."""
    head, block = tl.program_id(0), tl.program_id(1)
    rows = block * 16 + tl.arange(0, 16)
    for k0 in tl.static_range(0, WIDTH, 16):
        keep = _keep(tl.load(SEED), head, rows, k0, threshold, n_tokens, WIDTH, 16, BITS, ROUNDS)
        cols = k0 + tl.arange(0, 16)
        tl.store(OUT + (head * n_tokens + rows[:, None]) * WIDTH + cols[None, :],
                 keep.to(tl.int8), mask=rows[:, None] < n_tokens)


def keep_mask(seed: torch.Tensor, heads: int, tokens: int, max_seqlen: int, p: float):
    """(heads, tokens, width) bool: the dropout mask the kernels draw for `seed`."""
    width = _width(max_seqlen)
    out = torch.zeros(heads, tokens, width, dtype=torch.int8, device=seed.device)
    from mtl_dist import triton_attention

    _mask_kernel[(heads, triton.cdiv(tokens, 16))](out, seed, tokens, _threshold(p), WIDTH=width,
                                                   BITS=triton_attention.MASK_BITS,
                                                   ROUNDS=triton_attention.PHILOX_ROUNDS)
    return out.bool()


def reference(q, k, v, cu_seqlens, p, scale, keep):
    """Attention per sequence in fp32, dropout by `keep` (key positions within the sequence)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1).float() for t in (q, k, v))   # (heads, L, dim)
        probs = torch.softmax(qs @ ks.transpose(1, 2) * scale, -1)
        if p > 0:
            probs = probs * keep[:, a:b, : b - a] / (1 - p)
        out[a:b] = (probs @ vs).transpose(0, 1)
    return out


def packed_qkv(lengths, heads, dim, dtype, device):
    """q, k, v as strided views of one (tokens, 3 * heads * dim) tensor (what fused q/k/v
    hands the kernel), with cu_seqlens."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    tokens = int(cu[-1])
    fused = torch.randn(tokens, 3 * heads * dim, dtype=dtype, device=device)
    q, k, v = (t.view(tokens, heads, dim).detach().requires_grad_()
               for t in fused.split(heads * dim, dim=1))
    return q, k, v, cu


def kernel_errors(p: float, dtype=torch.float32, device="cpu", heads=2, dim=16,
                  lengths=LENGTHS) -> dict:
    """Max abs differences of out, dq, dk, dv from `reference`, through the autograd op with a
    seed drawn as the op draws it, and the mask's keep fraction."""
    from mtl_dist.triton_attention import dropout_seed, varlen_attention_triton

    torch.manual_seed(0)
    q, k, v, cu = packed_qkv(lengths, heads, dim, dtype, device)
    max_seqlen, scale = max(lengths) + 3, dim ** -0.5   # max_seqlen above the longest: allowed
    state = torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()
    seed = dropout_seed(device)
    (torch.cuda.set_rng_state if device == "cuda" else torch.set_rng_state)(state)
    out = varlen_attention_triton(q, k, v, cu, max_seqlen, p, None)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    keep = keep_mask(seed, heads, q.shape[0], max_seqlen, p) if p > 0 else None
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_inputs, cu, p, scale, keep)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.float())
    errors = {name: (a.float() - b).abs().max().item() for name, a, b in
              zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True)}
    if keep is not None:
        within = torch.cat([keep[:, a:b, : b - a].reshape(heads, -1) for a, b in
                            zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)], 1)
        errors["keep_fraction"] = within.float().mean().item()
        errors["heads_differ"] = bool((within[0] != within[1]).any())
    return errors


def _interpreted(call: str, dq_atomic: bool, bits: int = 16, rounds: int = 10) -> dict:
    """`call` (a function of this file, with its arguments) run with Triton's CPU interpreter
    and these module constants of triton_attention; what it returns, through JSON."""
    setup = ("from mtl_dist import triton_attention; "
             f"triton_attention.DQ_ATOMIC = {dq_atomic}; triton_attention.MASK_BITS = {bits}; "
             f"triton_attention.PHILOX_ROUNDS = {rounds}; import tests.test_triton_attention as t")
    return in_triton_interpreter(setup, f"t.{call}")


@pytest.mark.parametrize(("p", "dq_atomic", "bits", "rounds"),
                         [(0.0, False, 16, 10), (0.3, False, 16, 10), (0.0, True, 16, 10),
                          (0.3, True, 16, 10), (0.3, True, 8, 7)])
def test_kernels_compute_attention_per_sequence_with_their_dropout_mask(p, dq_atomic, bits,
                                                                         rounds):
    """Forward, dq, dk and dv (Triton's CPU interpreter, fp32) equal per-sequence attention;
    with dropout, the forward and both backward kernels drop the same entries (the mask read
    back from the same counter), ~p of them, differently per head. dq by its own kernel, or
    summed by the dk/dv kernel's programs (DQ_ATOMIC); 16 or 8 bits per entry."""
    errors = _interpreted(f"kernel_errors({p})", dq_atomic, bits, rounds)
    for name in ("out", "dq", "dk", "dv"):
        assert errors[name] < 1e-4, errors
    if p:
        assert abs(errors["keep_fraction"] - (1 - p)) < 0.05, errors
        assert errors["heads_differ"], errors


def _far_scores_errors() -> dict:
    """Every score of a sequence near -100 (natural log): keys past its end score 0, whose
    exp(0 - lse) overflows fp32, and must not reach the gradients (inf * 0 = NaN)."""
    from mtl_dist.triton_attention import varlen_attention_triton

    torch.manual_seed(0)
    tokens, dim = 5, 16
    q = (torch.randn(tokens, 1, dim) * 0.1 + 5.0).requires_grad_()
    k = (torch.randn(tokens, 1, dim) * 0.1 - 5.0).requires_grad_()
    v = torch.randn(tokens, 1, dim).requires_grad_()
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    out = varlen_attention_triton(q, k, v, cu, tokens, 0.0, None)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    return {"max_score": (q[:, 0] @ k[:, 0].T * dim ** -0.5).max().item(),
            "finite": all(bool(t.isfinite().all()) for t in (out, *grads))}


@pytest.mark.parametrize("dq_atomic", [False, True])
def test_gradients_stay_finite_when_every_score_is_far_below_zero(dq_atomic):
    result = _interpreted("_far_scores_errors()", dq_atomic)
    assert result["max_score"] < -90 and result["finite"], result


def test_attention_kernel_needs_packing_and_a_known_kernel(tmp_path):
    common = [f"train.output_dir={tmp_path}/o", *FAST]
    with pytest.raises(ConfigError, match="train.attention_kernel.*data.packing=false"):
        load_config(DEMO, [*common, "train.attention_kernel=triton"])
    with pytest.raises(ConfigError, match="train.attention_kernel.*one of flash, triton"):
        load_config(DEMO, [*common, "data.packing=true", "data.pack_multiple=64", "train.attention_kernel=cudnn"])
    cfg = load_config(DEMO, [*common, "data.packing=true", "data.pack_multiple=64", "train.attention_kernel=triton"])
    assert cfg.train.attention_kernel == "triton"


def test_packed_attention_reads_the_kernel_from_the_encoder_config(monkeypatch):
    """The attention interface passes the configured kernel to varlen_attention."""
    from mtl_dist import model as model_module

    seen = []
    monkeypatch.setattr(model_module, "varlen_attention",
                        lambda *args: seen.append(args[-1]) or args[0])

    class Module:
        config = type("Config", (), {"mtl_attention_kernel": "triton"})()

    q = torch.zeros(1, 2, 4, 8)
    model_module._packed_attention(Module(), q, q, q, None, packed_cu_seqlens=torch.tensor([0, 4]),
                                   packed_max_seqlen=4)
    assert seen == ["triton"]


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_cuda_in_bf16_match_per_sequence_attention(p):
    """BERT-large heads (16 x 64), a packed row's lengths, q/k/v as views of one tensor."""
    lengths = [166, 73, 300, 12, 91, 128, 1, 64, 45]
    errors = kernel_errors(p, torch.bfloat16, "cuda", heads=16, dim=64, lengths=lengths)
    for name in ("out", "dq", "dk", "dv"):
        assert errors[name] < 3e-2, errors
    if p:
        assert abs(errors["keep_fraction"] - (1 - p)) < 0.01, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_flash_attention_without_dropout():
    from mtl_dist.triton_attention import varlen_attention_triton

    torch.manual_seed(0)
    lengths = [166, 73, 300, 12, 91, 128, 1, 64, 45]
    q, k, v, cu = packed_qkv(lengths, 16, 64, torch.bfloat16, "cuda")
    grad = torch.randn(q.shape, dtype=q.dtype, device="cuda")
    outs = {}
    for name in ("triton", "flash"):
        if name == "triton":
            out = varlen_attention_triton(q, k, v, cu, 300, 0.0, None)
        else:
            out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, 300, 300, 0.0, False,
                                                          False)[0]
        outs[name] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for a, b in zip(*outs.values(), strict=True):
        assert (a.float() - b.float()).abs().max().item() < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dropout_draws_a_new_mask_at_every_graph_replay():
    """The seed comes from the CUDA generator inside the graph: each replay drops anew."""
    from mtl_dist.triton_attention import varlen_attention_triton

    torch.manual_seed(0)
    q, k, v, cu = packed_qkv([100, 60], 4, 64, torch.bfloat16, "cuda")
    q, k, v = (t.detach() for t in (q, k, v))
    varlen_attention_triton(q, k, v, cu, 128, 0.1, None)  # compile before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = varlen_attention_triton(q, k, v, cu, 128, 0.1, None)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recommended_set_trains_with_the_triton_kernel_like_flash(tmp_path):
    """Compiled layers, CUDA graphs, flat masters, fused q/k/v: losses as FlashAttention's."""
    from tests.test_gpu import COMPILED_PACKED, run

    common = ["train.bf16_weights=true", "train.cuda_graphs=true", "train.fused_clipping=true",
              "train.flat_masters=true", "train.gradient_accumulation_steps=1",
              "train.direct_weight_grads=true", "train.fused_qkv=true", *COMPILED_PACKED]
    flash, _, _ = run(tmp_path, "flash", *common)
    mine, trainer, _ = run(tmp_path, "triton", *common, "train.attention_kernel=triton")
    assert trainer.module.encoder.config.mtl_attention_kernel == "triton"
    from tests._runs import assert_losses_close
    assert_losses_close(flash, mine, 0.02, steps=30)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stop_and_resume_with_the_triton_kernel_and_dropout_follows_the_straight_run(tmp_path):
    """A compiled run with the Triton kernel and dropout, stopped at step 7 and resumed in the
    same process, follows the uninterrupted run to bf16 noise, what the README promises for
    compiled resumes: the compiled layers' kernels depend on the shapes met first, and the
    resumed invocation meets steps 8-16's shapes in another order than the straight run did.
    It was asserted bit for bit until run AF (H100, 2026-12-07), where, run alone, the resumed
    run matched at steps 8-9 and then differed by ~1e-4 (step 10: 2.4525 against 2.4524); it
    had passed alone in run AE. A wrong restore (dropout seed, RNG, optimizer, sampler) moves
    the losses by far more: the CPU tests check those bit for bit."""
    from tests._runs import assert_losses_close, checkpoint_model
    from tests.test_gpu import COMPILED_PACKED, DROPOUT, run

    common = ["train.cuda_graphs=true", "train.max_steps=16", *DROPOUT,
              "train.attention_kernel=triton", *COMPILED_PACKED]
    # Both start from a reset Dynamo, as a fresh process would (run AD: a process's first
    # compiled run and a later one can differ); the resume stays in the split run's process.
    straight, _, _ = run(tmp_path, "straight", *common, fresh_dynamo=True)
    split, first, _ = run(tmp_path, "split", *common, "train.stop_after_steps=7",
                          fresh_dynamo=True)
    assert first.state.global_step == 7
    run(tmp_path, "split", *common, "train.resume=auto")
    assert_losses_close(split, straight, 5e-4, steps=16)  # run AF: at most 1e-4 apart
    # The weights as a whole, not tensor by tensor: a key bias gets no gradient but rounding
    # noise (softmax ignores a per-row constant), which AdamW scales up to full steps (run AF:
    # 3e-4 apart in a tensor of norm 0.012).
    resumed, uninterrupted = checkpoint_model(split, 16), checkpoint_model(straight, 16)
    assert resumed.keys() == uninterrupted.keys()
    gap = sum((resumed[n].double() - w.double()).square().sum() for n, w in uninterrupted.items())
    size = sum(w.double().square().sum() for w in uninterrupted.values())
    assert gap.sqrt() <= 1e-3 * size.sqrt(), (gap.sqrt().item(), size.sqrt().item())
