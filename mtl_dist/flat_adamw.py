"""AdamW over flat buffers in one elementwise kernel per group (`train.flat_masters`).

Why: with `train.bf16_weights` the optimizer step of BERT-large on an H200 took ~4.4 ms of
GPU kernels: torch's fused AdamW 3.4 ms (~2.8 TB/s, chunked over ~390 tensors), the gradient
norm 0.4 ms, the masters -> bf16 weights copy 0.6 ms (run I2's profile in benchmarks/).
With the encoder's masters, gradients, moments and bf16 weights each laid end to end
(MasterWeights' FlatSegment), `torch.compile` turns `adamw_update` into one kernel that reads
gradient + master + moments once and writes master + moments + the bf16 weight, and the
gradient norm is one reduction: 2.4 ms instead of 4.4 (runs J1, J2). Where the CUDA graphs
leave the gradients in bf16 (MasterWeights.grads_in_bf16) the kernel reads those directly.

Maths: torch's AdamW (its single-tensor form, fp32), the gradient divided by the fused path's
`grad_scale` (clipping folded in, `train.fused_clipping`). Heads stay per tensor (an idle
head must be skipped, not decayed) and go through torch's AdamW, as does a flat group whose
gradients or moments are not the flat views any more. The state dict is AdamW's, so a run
resumes across the switch.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from mtl_dist.errors import MtlDistWarning
from mtl_dist.master import FlatSegment, MasterWeights
from mtl_dist.overlap import OverlappedStep, misaligned_spans


def adamw_update(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, weight: torch.Tensor, divisor: torch.Tensor,
                 scalars: torch.Tensor, beta1: float, beta2: float, eps: float) -> None:
    """One AdamW step of flat fp32 `master` (moments fp32), then `weight` (bf16) = master.
    `scalars`: this step's [1 - lr * weight_decay, lr / bias_correction1,
    sqrt(bias_correction2)], a tensor so that a compiled kernel takes them as arguments."""
    g = grad.float() / divisor  # a bf16 gradient (MasterWeights.grads_in_bf16) cast exactly
    master.mul_(scalars[0])
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / scalars[2]).add_(eps)
    master.sub_(exp_avg / denom * scalars[1])
    weight.copy_(master)


@functools.cache
def compiled_update():
    # Static shapes: one specialisation per flat group (two for the encoder). What changes
    # every step comes in tensors (Dynamo bakes Python floats in as constants).
    return torch.compile(adamw_update, fullgraph=True, dynamic=False)


@functools.cache
def compiled_chunk_update():
    # The chunks of `train.overlap_optimizer`: views at many offsets and of a few sizes, one
    # kernel (dynamic shapes). Their storage offsets are symbolic then, so Inductor could not
    # prove them 16-byte aligned and would drop the aligned (vectorised) loads of this
    # bandwidth-bound kernel; it is told to assume alignment instead, and copies an input
    # that is not (see overlap.misaligned_spans).
    return torch.compile(adamw_update, fullgraph=True, dynamic=True,
                         options={"assume_aligned_inputs": True})


class FlatAdamW(torch.optim.AdamW):
    """torch's AdamW whose groups that are one of `masters`' flat segments step in one kernel."""

    def __init__(self, params, masters: MasterWeights, *, compiled: bool, **kwargs):
        if kwargs.get("amsgrad") or kwargs.get("maximize"):
            raise ValueError("FlatAdamW: amsgrad and maximize are not supported")
        super().__init__(params, **kwargs)
        self._masters = masters
        self._compiled = compiled
        self._update = compiled_update() if compiled else adamw_update
        self.overlap: OverlappedStep | None = None  # see overlap_next_forward
        self._zero_grads_in_step = False
        self._zeroed_in_step: set[int] = set()  # groups whose step zeroes their gradients
        self._segments: dict[int, FlatSegment] = {}
        for i, group in enumerate(self.param_groups):
            seg = masters.segment(group["params"])
            if seg is not None:
                self._segments[i] = seg
        self._moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._host_step: dict[int, int | None] = {}  # a group's step count, known on the host
        for i, seg in self._segments.items():
            self._moments[i] = (torch.zeros_like(seg.master), torch.zeros_like(seg.master))
            self._link_state(i, fresh=True)
        self._ones: dict[torch.device, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(FlatAdamW._relink_after_load)

    # ------------------------------------------------------------------ state
    def _link_state(self, i: int, fresh: bool) -> None:
        """The group's `exp_avg`/`exp_avg_sq` become views of its flat moments (copied in
        from a loaded state); its step count is read once (a sync at start or load only)."""
        group, (exp_avg, exp_avg_sq) = self.param_groups[i], self._moments[i]
        steps = []
        for _, p, span in self._segments[i].spans():
            state = self.state[p]
            if fresh:
                on_device = group["fused"] or group["capturable"]
                state["step"] = torch.zeros((), dtype=torch.float32,
                                            device=p.device if on_device else "cpu")
                state["exp_avg"] = exp_avg[span].view_as(p)
                state["exp_avg_sq"] = exp_avg_sq[span].view_as(p)
            elif state:  # loaded: the same values, moved into the flat moments
                for key, flat in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                    flat[span].copy_(state[key].reshape(-1))
                    state[key] = flat[span].view_as(p)
            steps.append(state.get("step"))
        self._host_step[i] = 0 if fresh else _uniform_step(steps)
        if self._host_step[i] is None:
            counts = sorted({int(float(s)) for s in steps if s is not None})
            warnings.warn(f"train.flat_masters: the loaded optimizer state gives the "
                          f"{len(steps)} parameters of group {i} different step counts "
                          f"({counts[:5]}); that group steps per tensor through torch's AdamW "
                          f"(same maths, slower) for the rest of this run", MtlDistWarning,
                          stacklevel=3)

    def overlap_next_forward(self, encoder: nn.Module, layers: nn.ModuleList,
                             zero_grads: bool) -> OverlappedStep:
        """`train.overlap_optimizer`: from now on the flat groups step chunk by chunk, each
        chunk waited for by the part of `encoder`'s forward that reads it (mtl_dist/overlap.py).
        `zero_grads`: the caller zeroes the gradients after each step (eager micro-steps; a
        CUDA graph overwrites them instead): each chunk then zeroes its own, which zero_grad
        could not do without waiting for every chunk."""
        device = next(iter(self._segments.values())).grad.device
        self.overlap = OverlappedStep(encoder, layers, self._segments, device)
        self._zero_grads_in_step = zero_grads
        if self._compiled:
            self._update = compiled_chunk_update()
            misaligned = misaligned_spans(self.overlap.chunks)
            if misaligned:
                warnings.warn(f"train.overlap_optimizer: {misaligned} of the encoder's chunk "
                              "spans do not start on a 16-byte boundary (parameter sizes not "
                              "multiples of 8): each is copied before its update and back "
                              "after (same result, slower)", MtlDistWarning, stacklevel=2)
        return self.overlap

    @staticmethod
    def _relink_after_load(optimizer: FlatAdamW) -> None:
        for i in optimizer._segments:
            optimizer._link_state(i, fresh=False)

    def _flat_ready(self, i: int) -> bool:
        """The kernel may run: every gradient and moment is its flat view, one step count."""
        if self._host_step[i] is None:
            return False
        seg, (exp_avg, exp_avg_sq) = self._segments[i], self._moments[i]
        for _, p, span in seg.spans():
            state = self.state[p]
            if not (_is_view(p.grad, seg.grad, span) and state
                    and _is_view(state["exp_avg"], exp_avg, span)
                    and _is_view(state["exp_avg_sq"], exp_avg_sq, span)):
                return False
        return True

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FlatAdamW.step: closures are not supported")
        divisor = getattr(self, "grad_scale", None)
        ready = {i: self._flat_ready(i) for i in self._segments}
        if not all(ready.values()):
            self._masters.grads_to_fp32()  # torch's AdamW reads the fp32 `.grad` views
        hidden, per_tensor, flat = [], [], []
        for i in self._segments:
            group = self.param_groups[i]
            if not ready[i]:
                per_tensor.append(i)
                continue
            flat.append(i)
            for p in group["params"]:  # torch's step below leaves them alone
                hidden.append((p, p.grad))
                p.grad = None
        self._step_flat(flat, divisor)
        try:
            _unhooked(torch.optim.AdamW.step)(self)
        finally:
            for p, grad in hidden:
                p.grad = grad
        for i in per_tensor:  # stepped per tensor above: the bf16 weights, and steps re-read
            self._segments[i].weight.copy_(self._segments[i].master)
            self._host_step[i] = _uniform_step([self.state[p].get("step")
                                                for p in self.param_groups[i]["params"]])

    def _step_flat(self, groups: list[int], divisor) -> None:
        """The flat groups' step: whole buffers, or chunk by chunk (`overlap`)."""
        if not groups:
            return
        device = self._segments[groups[0]].grad.device
        if divisor is None:
            divisor = self._one(device)
        grads = {i: self._masters.flat_grad(self._segments[i]) for i in groups}
        host_scalars = {i: self._scalars(i) for i in groups}
        for i in groups:
            self._host_step[i] += 1
            torch._foreach_add_([self.state[p]["step"] for p in self.param_groups[i]["params"]],
                                1.0)

        zero = self.overlap is not None and self._zero_grads_in_step
        if zero:
            self._zeroed_in_step = set(groups)

        def launch():
            # Pinned: no host sync; the allocator keeps the buffer until the copy has run.
            scalars = {i: s.to(device, non_blocking=True) for i, s in host_scalars.items()}
            return functools.partial(self._update_span, grads, scalars, divisor, zero)

        if self.overlap is None:
            update = launch()
            for i in groups:
                update(i, None)
            return
        # The chunks read the gradients and the clip scale on the overlap's side stream:
        # the scale (a fresh tensor each step) is not handed back to the allocator before.
        if self.overlap.side_stream is not None and divisor.is_cuda:
            divisor.record_stream(self.overlap.side_stream)
        self.overlap.run(launch)

    def _scalars(self, i: int) -> torch.Tensor:
        """This step's [1 - lr * weight_decay, lr / bias_correction1, sqrt(bias_correction2)]
        of group `i`, on the host."""
        group, step = self.param_groups[i], self._host_step[i] + 1
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        return torch.tensor([1 - lr * group["weight_decay"], lr / (1 - beta1 ** step),
                             (1 - beta2 ** step) ** 0.5], dtype=torch.float32,
                            pin_memory=self._segments[i].grad.is_cuda)

    def _update_span(self, grads: dict[int, torch.Tensor], scalars: dict[int, torch.Tensor],
                     divisor: torch.Tensor, zero: bool, i: int, span: slice | None) -> None:
        """AdamW over `span` of group `i`'s flat buffers (None: the whole buffers); `zero`: its
        fp32 gradients are zeroed after (what zero_grad does, see overlap_next_forward)."""
        if i not in grads:  # a group stepping per tensor this time (see step)
            return
        seg, group = self._segments[i], self.param_groups[i]
        exp_avg, exp_avg_sq = self._moments[i]
        beta1, beta2 = group["betas"]
        tensors = (seg.master, grads[i], exp_avg, exp_avg_sq, seg.weight)
        if span is not None:
            tensors = tuple(t[span] for t in tensors)
        self._update(*tensors, divisor, scalars[i], float(beta1), float(beta2),
                     float(group["eps"]))
        if zero:
            seg.grad[span].zero_()

    def _one(self, device: torch.device) -> torch.Tensor:
        if device not in self._ones:
            self._ones[device] = torch.ones((), device=device)
        return self._ones[device]

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Flat groups' gradients are their views again, zeroed (one memset; a gradient that
        had been replaced would otherwise keep summing); the rest as asked."""
        flat_ids = set()
        self._masters.grads_in_bf16 = False
        zeroed, self._zeroed_in_step = self._zeroed_in_step, set()
        for i, seg in self._segments.items():
            if i not in zeroed:  # else the overlapped step's chunks did (or will, in order)
                seg.grad.zero_()
            for _, p, span in seg.spans():
                if not _is_view(p.grad, seg.grad, span):
                    p.grad = seg.grad[span].view_as(p)
                flat_ids.add(id(p))
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in flat_ids or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()


def _unhooked(step):
    """`step` without the wrapper that runs the optimizer step hooks. torch wraps the step of
    every optimizer class that has an instance (AdamW's too, once one is built in the process),
    and FlatAdamW's own wrapper has run them already."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


def _is_view(tensor: torch.Tensor | None, flat: torch.Tensor, span: slice) -> bool:
    """`tensor` starts where `span` of `flat` does (the layout never changes otherwise).
    Pointer arithmetic, not `flat[span]`: this runs for every parameter at every step."""
    return tensor is not None and \
        tensor.data_ptr() == flat.data_ptr() + span.start * flat.element_size()


def _uniform_step(steps: list) -> int | None:
    """The group's common step count (0 before any), or None where the tensors disagree."""
    if any(s is None for s in steps):
        return 0 if all(s is None for s in steps) else None
    values = {float(s) for s in steps}
    return int(values.pop()) if len(values) == 1 else None
