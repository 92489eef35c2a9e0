"""Whole micro-step CUDA graphs: forward, loss and backward captured once per (task, batch shape).

Why: on an H100 the eager step of a BERT-large is bound by the host issuing ~2,000 kernels
(FACTS.md), not by the GPU. Replaying a captured graph issues them all with one launch. With
lengths padded to a multiple (`data.pad_to_multiple_of`) there are only a few shapes per task.

What stays the same: the maths of every micro-step (same ops, dropout from the same CUDA
generator, gradients accumulated into the same `.grad` tensors, averaged over the group).
What changes: `.grad` tensors are allocated once (a graph writes to fixed addresses). Each
gradient is handed over right after autograd produces it: the first micro-step of a group
copies the encoder's into its `.grad` (no zeroing pass, no per-parameter add: ~1.8 ms per step
on an H200 for BERT-large), later ones add; heads always add (a head may first appear in a
later micro-step) and are zeroed after each optimizer step by `zero_head_grads`. Idle heads
are detached from the optimizer step by `idle_heads_detached`. All graphs share one memory
pool: only one micro-step is in flight at a time.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist.embedding_grads import write_embedding_grads_into
from mtl_dist.model import (
    FusedQKVAttention,
    LinearGradInto,
    embedding_tables,
    stacked_view,
    transformer_layers,
)

WARMUP_ITERS = 3  # eager runs on a side stream before capture (cuBLAS/cuDNN plans, allocator)


class WeightGradIntoLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose weight gradient goes straight
    into `weight_grad_target` (`train.direct_weight_grads`)."""

    weight_grad_target: torch.Tensor
    cublaslt_gemms = False  # train.cublaslt_gemms: LinearGradInto's GEMMs without a workspace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return LinearGradInto.apply(x, self.weight, self.bias, self.weight_grad_target,
                                    self.cublaslt_gemms)


def write_weight_grads_into(layers: nn.Module, targets: dict[int, torch.Tensor],
                            cublaslt_gemms: bool = False) -> set[int]:
    """Every nn.Linear in `layers` whose weight has a target (id(weight) -> tensor of its
    shape) writes its weight gradient there from then on (again: a new target replaces an
    old one), its GEMMs by cuBLASLt without a workspace if `cublaslt_gemms`
    (train.cublaslt_gemms); returns the ids of those weights. Only for Linears that run exactly
    once in every forward (BERT/RoBERTa layers): one that did not run would leave its target as it
    was, one that ran twice (shared weights) would keep only its last gradient.
    A fused q/k/v attention (`train.fused_qkv`) whose three weights and three targets each lie
    end to end (flat masters) writes all three from its one GEMM; otherwise its weights keep
    their gradients (its q/k/v Linears never run)."""
    direct, fused_linears = set(), set()
    for module in layers.modules():
        if isinstance(module, FusedQKVAttention):
            direct |= _write_qkv_weight_grads_into(module, targets)
            module.cublaslt_gemms = cublaslt_gemms
            fused_linears |= {id(m) for m in module.projections}
    for module in layers.modules():
        if type(module) in (nn.Linear, WeightGradIntoLinear) and id(module.weight) in targets \
                and id(module) not in fused_linears:
            module.__class__ = WeightGradIntoLinear
            module.weight_grad_target = targets[id(module.weight)]
            module.cublaslt_gemms = cublaslt_gemms
            direct.add(id(module.weight))
    return direct


def _write_qkv_weight_grads_into(attention: FusedQKVAttention,
                                 targets: dict[int, torch.Tensor]) -> set[int]:
    attention.qkv_weight = attention.qkv_weight_grad_target = None  # no stale target kept
    weights = [m.weight for m in attention.projections]
    if not all(id(w) in targets for w in weights):
        return set()
    stacked = stacked_view(weights)
    target = stacked_view([targets[id(w)] for w in weights])
    if stacked is None or target is None:
        return set()
    attention.qkv_weight, attention.qkv_weight_grad_target = stacked, target
    return {id(w) for w in weights}


def _weakly(method):
    """A hook that calls `method` while its object lives. Autograd keeps a parameter's hooks
    where Python's garbage collector cannot see them, so a bound method there would keep
    StepGraphs, hence the model and its gradients, alive after the trainer is gone
    (2.4 GiB for BERT-large in every later trainer of the process)."""
    ref = weakref.WeakMethod(method)

    def hook(p: nn.Parameter) -> None:
        bound = ref()
        if bound is not None:
            bound(p)

    return hook


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    loss: torch.Tensor


class StepGraphs:
    """Replays a captured forward+backward for each (task, shape); captures on first sight
    (or ahead of time: `prepare`)."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None, masters=None,
                 single_micro_step: bool = False, direct_weight_grads: bool = False,
                 cublaslt_gemms: bool = False, direct_embedding_grads: bool = False):
        """`masters` (a MasterWeights, train.bf16_weights): the bf16 gradients are handed over
        into the fp32 masters' `.grad`, and the model's own `.grad` stays None. With flat
        segments (train.flat_masters) and `single_micro_step` (every accumulation group is
        one micro-step), the encoder's stay bf16, copied into the segments' flat bf16
        buffers (MasterWeights.bf16_grad_views), which the flat AdamW kernel reads.
        `direct_weight_grads` (train.direct_weight_grads, needs that bf16 path): the Linear
        layers of the encoder's transformer layers write their weight gradients into those
        buffers from the backward GEMM itself, and are left out of the copy; with
        `cublaslt_gemms` (train.cublaslt_gemms) those Linears' GEMMs run by cuBLASLt without a
        workspace (mtl_dist/lt_gemms.py). `direct_embedding_grads`
        (train.direct_embedding_grads, needs direct_weight_grads): the encoder's
        GemmGradEmbedding tables write theirs into those buffers too."""
        self.model = model
        self.dtype = autocast_dtype
        self.pool = torch.cuda.graph_pool_handle()
        # One side stream for every capture's warm-up: cuBLAS keeps a workspace (32 MiB on
        # Hopper) per stream for the life of the process, so a stream per capture leaked one
        # per (task, shape) graph (28 graphs: 0.9 GiB, measured by benchmarks/memory_peak.py).
        self.side = torch.cuda.Stream()
        self.graphs: dict[tuple, _Captured] = {}
        self.scale = torch.ones((), device="cuda")  # 1 / accumulation group size, set per replay
        self.params = [p for p in model.parameters() if p.requires_grad]
        head_ids = {id(p) for p in model.heads.parameters()}
        self.head_grads: list[torch.Tensor] = []
        self._static: dict[int, tuple[torch.Tensor, bool]] = {}  # id(p) -> (grad, is head)
        self.owns_grads = masters is None
        self.encoder_params = [p for p in self.params if id(p) not in head_ids]
        self.masters = masters
        bf16 = masters.bf16_grad_views() if single_micro_step and masters is not None \
            and masters.segments else {}
        self.grads_stay_bf16 = bool(bf16) and all(id(p) in bf16 for p in self.encoder_params)
        if direct_weight_grads and not self.grads_stay_bf16:
            raise ValueError("StepGraphs: direct_weight_grads needs flat masters and one "
                             "micro-step per accumulation group")
        if direct_embedding_grads and not direct_weight_grads:
            raise ValueError("StepGraphs: direct_embedding_grads needs direct_weight_grads")
        # Written by their GEMMs: never handed over (their .grad stays None).
        direct = write_weight_grads_into(
            transformer_layers(model, "train.direct_weight_grads"), bf16, cublaslt_gemms) \
            if direct_weight_grads else set()
        if direct_embedding_grads:
            direct |= write_embedding_grads_into(embedding_tables(model), bf16)
        # Their gradients are written in place: one that autograd hands over too was read
        # outside the routed forward (see _hand_over)
        self._direct = {id(p): name for name, p in model.named_parameters() if id(p) in direct}
        self._handed_over = [(bf16[id(p)], p) for p in self.encoder_params
                             if id(p) not in direct] if self.grads_stay_bf16 else None
        for p in self.params:
            holder = p if masters is None else masters.master(p)
            if holder.grad is None:
                holder.grad = torch.zeros_like(holder)
            is_head = id(p) in head_ids
            self._static[id(p)] = (holder.grad, is_head)
            if is_head:
                self.head_grads.append(holder.grad)
            p.register_post_accumulate_grad_hook(_weakly(self._hand_over))
        self._mode = "off"  # "warmup": drop each gradient; "capture": record its hand-over
        self._first = True  # the micro-step being captured opens its accumulation group

    def _hand_over(self, p: nn.Parameter) -> None:
        """Autograd just put p's gradient of this micro-step in p.grad (a fresh tensor):
        move it into the static gradient, captured as one copy or add kernel. The eager
        warm-up passes before a capture drop it instead: the static gradients may hold a
        group's earlier micro-steps, and keeping them untouched needs no saved copy of them
        (a copy of every gradient, 1.3 GB for BERT-large, on top of the peak)."""
        # (autograd runs this hook for a routed weight too, with no gradient: fine)
        if id(p) in self._direct and p.grad is not None:
            raise RuntimeError(
                f"StepGraphs: autograd gave {self._direct[id(p)]} a gradient, but its gradient "
                "is written in place (train.direct_weight_grads / train.direct_embedding_grads): "
                "the weight is also read outside its module's forward, and that gradient would "
                "be lost; set those switches to false for this model")
        if self._mode == "off":
            return
        static, is_head = self._static[id(p)]
        if not (self.owns_grads or is_head):  # bf16_weights: cast in one go after backward
            if self._mode == "warmup":
                p.grad = None
            return
        if self._mode == "capture":
            if self._first and not is_head:
                static.copy_(p.grad)
            else:
                static.add_(p.grad)
        p.grad = None  # back to the pool; the next parameter's gradient can reuse it

    def _micro_step(self, inputs: dict[str, torch.Tensor], task_id: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None, cache_enabled=False):
            loss, _ = self.model(task_id=task_id, **inputs)
        (loss * self.scale).backward()
        if self._mode == "capture" and not self.owns_grads:
            self._cast_into_masters()
        return loss.detach()

    def _cast_into_masters(self) -> None:
        """bf16_weights: the encoder's bf16 gradients into the fp32 masters' in one
        multi-tensor kernel, copied on a group's first micro-step, added later. Why not a
        `copy_` per gradient in the hook: a bf16 -> fp32 copy_ runs PyTorch's unrolled
        casting kernel, 1.9 ms per step for BERT-large on an H200 (about 1 TB/s)."""
        pairs = self._handed_over if self._handed_over is not None else \
            [(self._static[id(p)][0], p) for p in self.encoder_params]
        have = [(t, p) for t, p in pairs if p.grad is not None]
        statics = [t for t, _ in have]
        grads = [p.grad for _, p in have]
        if self._first:
            torch._foreach_copy_(statics, grads)
            unused = [t for t, p in pairs if p.grad is None]
            if unused:  # no gradient in this micro-step: none from earlier groups either
                torch._foreach_zero_(unused)
        else:
            torch._foreach_add_(statics, grads)
        for _, p in have:
            p.grad = None

    def _capture(self, inputs: dict[str, torch.Tensor], task_id: int, first: bool) -> _Captured:
        for module in self.model.modules():
            if isinstance(module, FusedQKVAttention):
                module.check_stacked_weights()
        static = {k: v.clone() for k, v in inputs.items()}
        grads = [self._static[id(p)][0] for p in self.params]
        self._first = first
        for p in self.params:
            p.grad = None  # autograd hands each new gradient to _hand_over
        try:
            self._mode = "warmup"
            # The warm-up's dropout must not advance the CUDA generator: a resumed run captures
            # its graphs again, at other steps, and would draw other dropout masks from then on
            # than the run it resumes (each replay advances it as much as an eager micro-step).
            rng = torch.cuda.get_rng_state()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                for _ in range(WARMUP_ITERS):
                    self._micro_step(static, task_id)
            torch.cuda.current_stream().wait_stream(self.side)
            torch.cuda.set_rng_state(rng)
            self._mode = "capture"  # recorded, not run: the static gradients stay as they are
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                loss = self._micro_step(static, task_id)
        finally:
            self._mode = "off"
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g if self.owns_grads else None
        return _Captured(graph, static, loss)

    def prepare(self, inputs: dict[str, torch.Tensor], task_id: int, first: bool) -> _Captured:
        """The graph of this micro-batch's (task, shapes, `first`), captured if new. Capturing
        leaves the model, its gradients and the CUDA generator as they were, so it may run
        ahead of time (`train.precapture_graphs`) with any batch of the same shapes."""
        key = (task_id, first, *((k, tuple(v.shape)) for k, v in inputs.items()))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(inputs, task_id, first)
        return captured

    def run(self, inputs: dict[str, torch.Tensor], task_id: int, group: int,
            first: bool = True) -> torch.Tensor:
        """One micro-batch (`first`: it opens its accumulation group): loss (a graph-owned
        tensor: read it before the next call)."""
        captured = self.prepare(inputs, task_id, first)
        for name, value in inputs.items():
            captured.inputs[name].copy_(value, non_blocking=True)
        if self.grads_stay_bf16 and not (first and group == 1):
            raise RuntimeError(f"StepGraphs: bf16 gradients need one micro-step per group, "
                               f"got a group of {group}")
        self.scale.fill_(1.0 / group)
        captured.graph.replay()
        if self.grads_stay_bf16:
            self.masters.grads_in_bf16 = True
        return captured.loss

    def zero_head_grads(self) -> None:
        """After the optimizer step: heads accumulate in every micro-step, so start at zero."""
        torch._foreach_zero_(self.head_grads)

    @contextmanager
    def idle_heads_detached(self, heads: dict[int, list[nn.Parameter]]):
        """Hide idle heads' (zero) gradients from the optimizer, as `set_to_none` would."""
        hidden = [(p, p.grad) for params in heads.values() for p in params]
        for p, _ in hidden:
            p.grad = None
        try:
            yield
        finally:
            for p, grad in hidden:
                p.grad = grad
