"""Tiny models and samples built in memory, for tests of the model code."""

from __future__ import annotations

from types import SimpleNamespace

from mtl_dist.model import build_model


def samples(lengths, task_id=0):
    return [{"input_ids": list(range(2, 2 + n)), "token_type_ids": [0] * (n - 2) + [1, 1],
             "label": i % 3, "task_id": task_id, "index": i} for i, n in enumerate(lengths)]


def tiny_model(model_type="bert", head="attention", layers=2, vocab_size=50, pad_token_id=0,
               num_labels=(3,)):
    """A 32-wide encoder without dropout, one head per entry of `num_labels` (one 3-label
    head)."""
    arch = SimpleNamespace(model_type=model_type, hidden_size=32, num_hidden_layers=layers,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    return build_model(SimpleNamespace(pretrained=None, arch=arch, head=head, dropout=0.0),
                       vocab_size=vocab_size, num_labels=list(num_labels), pad_token_id=pad_token_id)


def assert_same_gradients(got, want, rtol=1e-5, atol=1e-6) -> None:
    """Every parameter of model `got` has model `want`'s gradient (same parameter names)."""
    import torch

    grads = dict(got.named_parameters())
    assert grads.keys() == dict(want.named_parameters()).keys()
    for name, p in want.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=rtol, atol=atol, msg=name)
