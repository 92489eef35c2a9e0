"""fp32 master weights for a model that runs in bf16 (`train.bf16_weights`).

Why: under autocast the weights are fp32 and every forward casts each Linear weight to bf16,
every weight gradient leaves its GEMM in bf16 and is cast to fp32, and the residual stream
and LayerNorms run in fp32. With the model itself in bf16 none of those casts run and the
elementwise work moves half the bytes: 22.7 -> 20.1 ms of GPU kernels per forward+backward of
BERT-large on an H200 (benchmarks/precision_probe.py). The optimizer keeps its maths: AdamW
updates fp32 masters with fp32 moments from fp32 copies of the gradients, and the masters
are copied back into the bf16 weights after each step. The GEMMs see the same bf16 weights
as under autocast; activations between them are rounded to bf16 (bf16 noise).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class FlatSegment:
    """Parameters laid end to end (`train.flat_masters`): their fp32 masters, the masters'
    fp32 gradients and the model's bf16 weights are views into these three 1-D buffers, so
    one elementwise kernel can update them all (mtl_dist/flat_adamw.py)."""

    params: list[nn.Parameter]  # the model's, in layout order
    masters: list[torch.Tensor]
    master: torch.Tensor
    grad: torch.Tensor
    weight: torch.Tensor
    grad_bf16: torch.Tensor | None = None  # see MasterWeights.bf16_grad_views

    def spans(self) -> Iterator[tuple[nn.Parameter, torch.Tensor, slice]]:
        """(model parameter, its master, its slice of every flat buffer), in layout order."""
        start = 0
        for p, m in zip(self.params, self.masters, strict=True):
            end = start + m.numel()
            yield p, m, slice(start, end)
            start = end


class MasterWeights:
    """The fp32 masters of `model`'s trainable parameters; casts `model` to bf16.

    The optimizer, gradient clipping and EMA work on the masters (`named_parameters()` has
    the model's names); the model's own `.grad` is a per-micro-step bf16 buffer that
    `take_grads` moves into the masters' fp32 `.grad` (CUDA graphs write there directly).
    Each of `flat_segments` (lists of the model's parameters) becomes a FlatSegment: its
    masters' `.grad` are then always the (zeroed or summed) views, never None.
    """

    def __init__(self, model: nn.Module, flat_segments: Sequence[Sequence[nn.Parameter]] = ()):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # Taken before the cast: a pretrained fp32 checkpoint keeps its full precision.
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        model.to(torch.bfloat16)
        self.segments = [self._lay_flat(list(params)) for params in flat_segments]
        self._by_param = {id(p): m for p, m in zip(self.params, self.masters, strict=True)}
        self._flat_ids = {id(m) for s in self.segments for m in s.masters}
        # True while this step's gradients of the flat segments are in their bf16 buffers
        # (set by the CUDA graphs, see bf16_grad_views), not in the fp32 ones.
        self.grads_in_bf16 = False

    @torch.no_grad()
    def _lay_flat(self, params: list[nn.Parameter]) -> FlatSegment:
        """Moves `params` (bf16 by now) and their masters into flat buffers, in this order."""
        index = {id(p): i for i, p in enumerate(self.params)}
        total = sum(p.numel() for p in params)
        device = params[0].device
        master = torch.empty(total, dtype=torch.float32, device=device)
        grad = torch.zeros(total, dtype=torch.float32, device=device)
        weight = torch.empty(total, dtype=torch.bfloat16, device=device)
        masters, start = [], 0
        for p in params:
            i, end = index[id(p)], start + p.numel()
            m = master[start:end].view_as(p)
            m.copy_(self.masters[i])
            m.requires_grad_(True)
            m.grad = grad[start:end].view_as(p)
            weight[start:end].copy_(p.data.reshape(-1))
            p.data = weight[start:end].view_as(p)
            self.masters[i] = m
            masters.append(m)
            start = end
        return FlatSegment(params, masters, master, grad, weight)

    @torch.no_grad()
    def relink_model(self) -> None:
        """Makes the model's flat-segment parameters views of their bf16 buffer again.
        `Module.to(device)` with a device index on a device whose tensors carry none (CPU, as
        accelerate's prepare does) rebinds every parameter to a copy: the flat step would then
        write weights the model no longer reads. Their values (a broadcast may have changed
        them) are kept."""
        for seg in self.segments:
            for p, _, span in seg.spans():
                view = seg.weight[span].view_as(p)
                if p.data.data_ptr() != view.data_ptr():
                    view.copy_(p.data)
                    p.data = view

    def segment(self, masters: Sequence[torch.Tensor]) -> FlatSegment | None:
        """The FlatSegment holding exactly `masters`, in order (an optimizer group), or None."""
        for seg in self.segments:
            if len(seg.masters) == len(masters) and \
                    all(a is b for a, b in zip(seg.masters, masters, strict=True)):
                return seg
        return None

    def bf16_grad_views(self) -> dict[int, torch.Tensor]:
        """id(model parameter) -> a view of its segment's flat bf16 gradient buffer (allocated
        here). CUDA graphs of one-micro-step groups copy each bf16 gradient there and set
        `grads_in_bf16`: the flat AdamW kernel then reads 2 bytes per parameter instead of a
        fp32 copy's write and read (4 + 4), and the clip norm reads half the bytes. Exact: a
        bf16 -> fp32 cast loses nothing."""
        views = {}
        for seg in self.segments:
            if seg.grad_bf16 is None:
                seg.grad_bf16 = torch.zeros_like(seg.grad, dtype=torch.bfloat16)
            for p, _, span in seg.spans():
                views[id(p)] = seg.grad_bf16[span].view_as(p)
        return views

    @torch.no_grad()
    def grads_to_fp32(self) -> None:
        """Where this step's flat gradients are in bf16: into the fp32 `.grad` views, for
        anything that reads the masters' `.grad` (torch's AdamW, clip_grad_norm_)."""
        if self.grads_in_bf16:
            for seg in self.segments:
                seg.grad.copy_(seg.grad_bf16)
            self.grads_in_bf16 = False

    def flat_grad(self, seg: FlatSegment) -> torch.Tensor:
        """This step's gradient of `seg`: its bf16 or its fp32 buffer (`grads_in_bf16`)."""
        return seg.grad_bf16 if self.grads_in_bf16 else seg.grad

    def grads_for_norm(self) -> list[torch.Tensor]:
        """The masters' gradients for clipping: a flat segment's as one tensor."""
        return self.flat_grads() + self.loose_grads()

    def flat_grads(self) -> list[torch.Tensor]:
        """This step's gradient of each flat segment, one tensor each."""
        return [self.flat_grad(s) for s in self.segments]

    def loose_grads(self) -> list[torch.Tensor]:
        """The gradients of the masters outside the flat segments (the heads'), where set."""
        return [m.grad for m in self.masters
                if id(m) not in self._flat_ids and m.grad is not None]

    def master(self, param: nn.Parameter) -> torch.Tensor:
        return self._by_param[id(param)]

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(model name, fp32 master): what EMA and the fp32 export read."""
        return zip(self.names, self.masters, strict=True)

    @torch.no_grad()
    def take_grads(self) -> None:
        """Eager path: move the bf16 gradients into the masters' fp32 ones (added to what
        earlier micro-steps left there); a parameter without a gradient (an idle head) leaves
        its master's as it is (None after the optimizer's zero_grad)."""
        for p, m in zip(self.params, self.masters, strict=True):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:  # the group's earlier micro-steps, summed in fp32
                m.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def broadcast_from_first_rank(self) -> None:
        """Collective. Every rank starts from rank 0's masters, as DDP starts every rank from
        rank 0's weights: the ranks' random initialisations differ (per-rank seeds), and a rank
        whose masters kept its own would overwrite DDP's weights with them after one step."""
        for m in self.masters:
            dist.broadcast(m.data, src=0)
        self.copy_to_model()

    @torch.no_grad()
    def copy_to_model(self, flat: bool = True) -> None:
        """After the optimizer step (and after loading masters): the bf16 weights follow.
        `flat=False`: not the flat segments' (the flat optimizer step wrote them itself)."""
        pairs = [(p.data, m) for p, m in zip(self.params, self.masters, strict=True)
                 if flat or id(m) not in self._flat_ids]
        if pairs:
            torch._foreach_copy_(*map(list, zip(*pairs, strict=True)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.detach() for n, m in self.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"no master weight for '{missing[0]}' ({len(missing)} missing)")
        for n, m in self.named_parameters():
            if tuple(state[n].shape) != tuple(m.shape):
                raise ValueError(f"master weight '{n}' has shape {tuple(state[n].shape)}, "
                                 f"the model has {tuple(m.shape)}")
            m.copy_(state[n])
        self.copy_to_model()
