"""CPU checks of the CUDA-graph step's pieces that need no GPU (the rest: tests/test_gpu.py)."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from mtl_dist.graphs import _weakly


class _HookOwner:
    """Owns a parameter and hands its gradients to a method, as StepGraphs does."""

    def __init__(self):
        self.param = nn.Parameter(torch.zeros(8))
        self.calls = 0
        self.param.register_post_accumulate_grad_hook(_weakly(self.count))

    def count(self, p: nn.Parameter) -> None:
        self.calls += 1


def test_weak_gradient_hook_fires_while_its_owner_lives_and_lets_it_go():
    owner = _HookOwner()
    (owner.param * 2).sum().backward()
    (owner.param * 3).sum().backward()
    assert owner.calls == 2
    param, gone = owner.param, weakref.ref(owner)
    del owner
    gc.collect()  # a bound method as the hook keeps the owner: autograd hides that cycle
    assert gone() is None
    (param * 2).sum().backward()  # the orphaned hook is a no-op, not an error
