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

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


class MasterWeights:
    """The fp32 masters of `model`'s trainable parameters; casts `model` to bf16.

    The optimizer, gradient clipping and EMA work on the masters (`named_parameters()` has
    the model's names); the model's own `.grad` is a per-micro-step bf16 buffer that
    `take_grads` moves into the masters' fp32 `.grad` (CUDA graphs write there directly).
    """

    def __init__(self, model: nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # Taken before the cast: a pretrained fp32 checkpoint keeps its full precision.
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self._by_param = {id(p): m for p, m in zip(self.params, self.masters, strict=True)}
        model.to(torch.bfloat16)

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
    def copy_to_model(self) -> None:
        """After the optimizer step (and after loading masters): the bf16 weights follow."""
        torch._foreach_copy_([p.data for p in self.params], self.masters)

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
