"""Whole micro-step CUDA graphs: forward, loss and backward captured once per (task, batch shape).

Why: on an H100 the eager step of a BERT-large is bound by the host issuing ~2,000 kernels
(FACTS.md), not by the GPU. Replaying a captured graph issues them all with one launch. With
lengths padded to a multiple (`data.pad_to_multiple_of`) there are only a few shapes per task.

What stays the same: the maths of every micro-step (same ops, dropout from the same CUDA
generator, gradients accumulated into the same `.grad` tensors, averaged over the group).
What changes: `.grad` tensors are allocated once and zeroed in place (a graph writes to fixed
addresses), so idle heads are detached from the optimizer step by `idle_heads_detached`.
All graphs share one memory pool: only one micro-step is in flight at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

WARMUP_ITERS = 3  # eager runs on a side stream before capture (cuBLAS/cuDNN plans, allocator)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    loss: torch.Tensor


class StepGraphs:
    """Replays a captured forward+backward for each (task, shape); captures on first sight."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None):
        self.model = model
        self.dtype = autocast_dtype
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured] = {}
        self.scale = torch.ones((), device="cuda")  # 1 / accumulation group size, set per replay
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def _micro_step(self, inputs: dict[str, torch.Tensor], task_id: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None, cache_enabled=False):
            loss, _ = self.model(task_id=task_id, **inputs)
        (loss * self.scale).backward()
        return loss.detach()

    def _capture(self, inputs: dict[str, torch.Tensor], task_id: int) -> _Captured:
        static = {k: v.clone() for k, v in inputs.items()}
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        saved = [g.clone() for g in grads]  # warm-up backward passes must not leak into .grad
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                self._micro_step(static, task_id)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self._micro_step(static, task_id)
        for g, s in zip(grads, saved, strict=True):
            g.copy_(s)
        return _Captured(graph, static, loss)

    def run(self, inputs: dict[str, torch.Tensor], task_id: int, group: int) -> torch.Tensor:
        """One micro-batch: loss (a graph-owned tensor: read it before the next call)."""
        key = (task_id, *(tuple(v.shape) for v in inputs.values()))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(inputs, task_id)
        for name, value in inputs.items():
            captured.inputs[name].copy_(value, non_blocking=True)
        self.scale.fill_(1.0 / group)
        captured.graph.replay()
        return captured.loss

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
