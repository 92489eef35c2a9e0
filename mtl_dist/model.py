"""Shared encoder + one classification head per task, and the loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mtl_dist.config import ModelConfig


class AttentionPoolingHead(nn.Module):
    """The reference baseline's head: score each token, softmax over real tokens, pool, classify."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(hidden).squeeze(-1)
        # Padding gets -inf so its weight is exactly 0: pad tokens cannot change the logits.
        scores = scores.masked_fill(attention_mask == 0, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(hidden.dtype)
        pooled = torch.bmm(weights.unsqueeze(1), hidden).squeeze(1)
        return self.classifier(self.dropout(pooled))


class ClsHead(nn.Module):
    """Classify from the first ([CLS]) token's hidden state."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden[:, 0]))


HEADS = {"attention": AttentionPoolingHead, "cls": ClsHead}


class MultiTaskModel(nn.Module):
    """One encoder shared by all tasks; `task_id` picks the head (all ranks pick the same one)."""

    def __init__(self, encoder: nn.Module, num_labels: Sequence[int], head: str = "attention",
                 dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict(
            {str(i): HEADS[head](hidden, n, dropout) for i, n in enumerate(num_labels)})
        self.num_labels = list(num_labels)
        # With SDPA, a ready 4D bool mask is used as is: transformers then skips its own mask
        # building, which syncs with the GPU every step (`padding_mask.all()`).
        self.mask_4d = getattr(encoder.config, "_attn_implementation", None) == "sdpa"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_id: int,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        encoder_mask = attention_mask[:, None, None, :].bool() if self.mask_4d else attention_mask
        hidden = self.encoder(input_ids=input_ids, attention_mask=encoder_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        logits = self.heads[str(int(task_id))](self.dropout(hidden), attention_mask)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return loss, logits

    def head_parameter_names(self, task_id: int) -> list[str]:
        """Names of one head's parameters (used to check idle heads stay unchanged)."""
        return [f"heads.{task_id}.{n}" for n, _ in self.heads[str(task_id)].named_parameters()]


def build_encoder(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int = 0) -> nn.Module:
    """A pretrained encoder from a local directory, or a randomly initialised one from `arch`."""
    from transformers import AutoConfig, AutoModel

    if model_cfg.pretrained:
        return AutoModel.from_pretrained(model_cfg.pretrained, add_pooling_layer=False,
                                         local_files_only=True)
    arch = model_cfg.arch
    config = AutoConfig.for_model(
        arch.model_type, vocab_size=vocab_size, hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        hidden_dropout_prob=arch.hidden_dropout_prob,
        attention_probs_dropout_prob=arch.attention_probs_dropout_prob,
        pad_token_id=pad_token_id, type_vocab_size=2)
    return AutoModel.from_config(config, add_pooling_layer=False)


def build_model(model_cfg: ModelConfig, vocab_size: int, num_labels: Sequence[int],
                pad_token_id: int = 0) -> MultiTaskModel:
    """The full multi-task model described by the config."""
    encoder = build_encoder(model_cfg, vocab_size, pad_token_id)
    return MultiTaskModel(encoder, num_labels, head=model_cfg.head, dropout=model_cfg.dropout)


def compile_encoder_layers(model: MultiTaskModel) -> int:
    """`torch.compile` each transformer layer in place (`train.compile`); returns how many.

    Why layers and not the whole model: the layers are identical, so one compiled graph serves
    all of them (parameters are graph inputs) and compile time does not grow with depth; the
    heads and the loss differ per task and stay eager. Inductor fuses the layer's elementwise
    tail (bias, GELU, dropout, residual, LayerNorm, autocast casts) into a few kernels.
    """
    layers = getattr(getattr(model.encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"train.compile: {type(model.encoder).__name__} has no encoder.layer "
                         "list to compile (BERT/RoBERTa-style encoders have one)")
    for layer in layers:
        layer.compile(dynamic=None)
    return len(layers)


def model_shape(model: nn.Module) -> dict[str, list[int]]:
    """Parameter name -> shape: what a checkpoint must match to be loadable into this model."""
    return {name: list(p.shape) for name, p in model.named_parameters()}
