"""Exponential moving average of the trainable weights, kept in fp32 beside the model.

Under DeepSpeed ZeRO-3 (`zero3_optimizer` given) the parameters are partitioned: each rank
keeps the fp32 shadow of its own partitions only (`p.ds_tensor`), so EMA memory stays
partitioned too. The checkpoint format is the same in every case, the FULL fp32 shadow per
parameter name: a ZeRO-3 EMA state loads into a run without ZeRO, at another world size, and
back. Gathering it is collective, so under ZeRO-3 every rank enters `for_checkpoint()` around
the save (rank 0 then holds the full shadow for `state_dict()`); elsewhere that is a no-op.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

GATHER_BUCKET_NUMEL = 1 << 25  # fp32 elements per gather: 128 MiB of partitions per rank


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float, zero3_optimizer: Any = None):
        self.decay = decay
        self.zero3 = zero3_optimizer
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._full: dict[str, torch.Tensor] | None = None
        params = self._params(model)
        if self.zero3 is not None:
            for name, p in zip(self.names, params, strict=True):
                if not hasattr(p, "ds_tensor") or p.ds_tensor.numel() != p.partition_numel():
                    raise RuntimeError(f"EMA under ZeRO-3: parameter {name} has no resident "
                                       "partition (NVMe parameter offload is not supported)")
            import torch.distributed as dist

            # this rank's place in each partition group, not the group: a group held here
            # outlived close() (its gloo threads then ended at interpreter exit)
            self._layout = {n: (dist.get_rank(group=p.ds_process_group), tuple(p.ds_shape))
                            for n, p in zip(self.names, params, strict=True)}
        self.shadow = [t.detach().float().clone() for t in self._current(params)]

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    def _current(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the shadow tracks: the full tensors, or this rank's ZeRO-3 partitions."""
        return [p.ds_tensor for p in params] if self.zero3 is not None else params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = [t.detach().float() for t in self._current(self._params(model))]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextmanager
    def applied(self, model: nn.Module):
        """Temporarily put the EMA weights into the model (for evaluation and best saves);
        afterwards the weights are restored bit-exactly."""
        params = self._params(model)
        if self.zero3 is not None:
            with self._zero3_applied(params):
                yield model
            return
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow, strict=True):
                p.copy_(s.to(p.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)

    @contextmanager
    def _zero3_applied(self, params: list[torch.Tensor]):
        """Collective. Swap the partitions' contents with the shadow. Gathered copies (the
        persistent small parameters DeepSpeed keeps gathered, and any a forward left behind)
        are released first and the persistent ones re-gathered from the swapped partitions,
        exactly as DeepSpeed does around its own checkpoint saves; the same on the way back."""
        partitions = [p.ds_tensor for p in params]
        backup = [t.detach().clone() for t in partitions]
        self._set_partitions(partitions, [s.to(t.dtype) for s, t in
                                          zip(self.shadow, partitions, strict=True)])
        try:
            yield
        finally:
            self._set_partitions(partitions, backup)

    @torch.no_grad()
    def _set_partitions(self, partitions: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.zero3.checkpoint_event_prologue()  # every gathered parameter released
        for t, v in zip(partitions, values, strict=True):
            t.copy_(v)
        self.zero3.checkpoint_event_epilogue()  # persistent parameters gathered again

    @contextmanager
    def for_checkpoint(self, model: nn.Module):
        """Collective under ZeRO-3 (all ranks, around the checkpoint save): rank 0 holds the
        full fp32 shadow while inside, for `state_dict()`. Without ZeRO-3: nothing to do."""
        if self.zero3 is None:
            yield
            return
        self._full = self._gather_full(self._params(model))
        try:
            yield
        finally:
            self._full = None

    @torch.no_grad()
    def _gather_full(self, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full fp32 shadow per name, on rank 0 (CPU); {} elsewhere. Bucketed gathers."""
        import torch.distributed as dist

        group = params[0].ds_process_group if params else None
        world = dist.get_world_size(group=group)
        rank = dist.get_rank()
        dst = dist.get_global_rank(group, 0) if group is not None else 0
        full: dict[str, torch.Tensor] = {}
        start = 0
        while start < len(params):
            end, numel = start, 0
            while end < len(params) and (end == start or numel + self.shadow[end].numel()
                                         <= GATHER_BUCKET_NUMEL):
                numel += self.shadow[end].numel()
                end += 1
            flat = torch.cat([s.reshape(-1) for s in self.shadow[start:end]])
            parts = [torch.empty_like(flat) for _ in range(world)] if rank == dst else None
            dist.gather(flat, parts, dst=dst, group=group)
            if rank == dst:
                ranks = [p.cpu().split([s.numel() for s in self.shadow[start:end]])
                         for p in parts]
                for i in range(start, end):
                    p = params[i]
                    whole = torch.cat([r[i - start] for r in ranks])[:p.ds_numel]
                    full[self.names[i]] = whole.view(p.ds_shape).clone()
            start = end
        return full

    def state_dict(self) -> dict:
        if self.zero3 is None:
            shadow = dict(zip(self.names, self.shadow, strict=True))
        elif self._full is not None:
            shadow = self._full
        else:
            raise RuntimeError("EMA under ZeRO-3: state_dict() needs the full shadow; call it "
                               "inside `with ema.for_checkpoint(model):` on every rank")
        return {"decay": self.decay, "shadow": shadow}

    def load_state_dict(self, state: dict) -> None:
        """The full fp32 shadow per name; under ZeRO-3 each rank keeps its own partitions."""
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:3]}")
        self.decay = state["decay"]
        if self.zero3 is None:
            self.shadow = [state["shadow"][n].to(s.device, torch.float32).clone()
                           for n, s in zip(self.names, self.shadow, strict=True)]
            return
        shadow = []
        for name, s in zip(self.names, self.shadow, strict=True):
            rank, shape = self._layout[name]
            full = state["shadow"][name]
            if tuple(full.shape) != shape:
                raise ValueError(f"EMA state: '{name}' has shape {tuple(full.shape)}, the model "
                                 f"has {shape}")
            full = full.to(torch.float32).reshape(-1)
            pn = s.numel()
            part = torch.zeros(pn, dtype=torch.float32)
            piece = full[rank * pn:(rank + 1) * pn]
            part[:piece.numel()] = piece
            shadow.append(part.to(s.device))
        self.shadow = shadow
