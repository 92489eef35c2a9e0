"""Shared encoder + one classification head per task, and the loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mtl_dist.config import ATTENTION_KERNELS, COMPILE_TUNING
from mtl_dist.errors import ConfigError
from mtl_dist.lt_gemms import linear_grads, lt_linear

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


class HeadStep(nn.Module):
    """One task's part of the forward after the encoder: the model's dropout, the task's head
    and the loss. Its own module so that `train.compile_heads` can compile it as one graph;
    MultiTaskModel keeps these in a plain dict (not registered: their parameters are the
    heads', and the state dict stays as it was)."""

    def __init__(self, dropout: nn.Module, head: nn.Module):
        super().__init__()
        self.dropout = dropout
        self.head = head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        logits = self.head(self.dropout(hidden), attention_mask)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return loss, logits

# ----------------------------------------------------------------- weight gradients written in place
class LinearGradInto(torch.autograd.Function):
    """F.linear whose backward writes the weight gradient into a given tensor and hands
    autograd none for it (the weight's `.grad` stays None). With `cublaslt_gemms`
    (`train.cublaslt_gemms`) its three GEMMs run by cuBLASLt without a workspace."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, cublaslt_gemms=False):
        ctx.save_for_backward(x, weight)
        # Not saved for backward: the targets are views of one flat buffer, so each layer's
        # write bumps the version counter every other target shares, and autograd's check
        # of saved tensors would refuse the next layer's backward.
        ctx.target = target
        ctx.has_bias = bias is not None
        ctx.cublaslt_gemms = cublaslt_gemms
        if cublaslt_gemms:
            rows = lt_linear(x.reshape(-1, x.shape[-1]), weight, bias)
            return rows.view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x, _ = linear_grads(rows, x.reshape(-1, x.shape[-1]), weight, ctx.target,
                                 ctx.needs_input_grad[0], False, ctx.cublaslt_gemms)
        if grad_x is not None:
            grad_x = grad_x.view(*grad.shape[:-1], weight.shape[1])
        grad_bias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None, None


# ----------------------------------------------------------------- packed (unpadded) attention
PACKED_ATTENTION = "mtl_dist_packed"


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float,
                       scale: float | None) -> torch.Tensor:
    """Reference path (CPU, fp32): each token attends to its own packed sequence only.

    The sequences are laid out padded, (sequences, max_seqlen), for SDPA with a key mask:
    O(batch * max_seqlen^2) work like a padded batch, not O(total_tokens^2): a block-diagonal
    mask over a 5,632-token row (33 sequences, 16 heads) took 6.2 s per call on 2 CPU cores,
    this 0.41 s. Static shapes, no host sync (compile-friendly).
    """
    total = q.shape[0]
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    offsets = torch.arange(max_seqlen, device=q.device)
    valid = offsets[None, :] < lengths[:, None]                          # (n, W)
    index = (starts[:, None] + offsets[None, :]).clamp(max=total - 1).reshape(-1)

    def padded(t: torch.Tensor) -> torch.Tensor:                         # (n, heads, W, dim)
        return t.index_select(0, index).view(*valid.shape, *t.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v),
                                         attn_mask=valid[:, None, None, :],
                                         dropout_p=dropout_p, scale=scale).transpose(1, 2)
    out = torch.where(valid[..., None, None], out, 0.0)  # padding slots add nothing below
    return q.new_zeros(q.shape).index_add(0, index, out.reshape(-1, *q.shape[1:]))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, dropout_p: float, scale: float | None,
                     kernel: str = "flash") -> torch.Tensor:
    """Attention over packed sequences, q/k/v (total_tokens, heads, head_dim).

    On CUDA in bf16/fp16: FlashAttention's variable-length kernel (aten op, autograd and a
    meta kernel for torch.compile included), or with kernel="triton" mtl_dist's own
    (triton_attention: tiles of 64, not 128): no padding, no mask. Elsewhere: SDPA over the
    sequences laid out padded to max_seqlen, same maths."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if kernel == "triton":
            from mtl_dist.triton_attention import varlen_attention_triton
            return varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, False, False,
            scale=scale)[0]
    return _segment_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, scale)


def _packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      packed_cu_seqlens: torch.Tensor | None = None,
                      packed_max_seqlen: int | None = None, **kwargs):
    """transformers attention function: packed when given cu_seqlens, else plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {query.shape[0]} rows")
    # squeeze, not [0]: its backward is a view, where select's writes a zero-filled copy
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # (1,h,T,d) -> (T,h,d)
    out = varlen_attention(q, k, v, packed_cu_seqlens, packed_max_seqlen, dropout, scaling,
                           getattr(module.config, "mtl_attention_kernel", "flash"))
    return out.unsqueeze(0), None  # (1, T, h, d), as transformers expects


def enable_packed_attention(model: MultiTaskModel, max_seqlen: int, kernel: str = "flash") -> None:
    """Let `model` take packed batches (`data.packing`); padded batches still work (eval).
    `kernel`: the CUDA varlen kernel (`train.attention_kernel`), one of ATTENTION_KERNELS."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: expected one of {ATTENTION_KERNELS}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    model.encoder.config._attn_implementation = PACKED_ATTENTION
    model.encoder.config.mtl_attention_kernel = kernel
    model.mask_4d = True
    model.packed_max_seqlen = max_seqlen


def verify_packed_attention(model: MultiTaskModel, padded: dict, packed: dict,
                            tolerance: float = 1e-4) -> None:
    """`data.packing` is right only for encoders whose attention goes through transformers'
    attention interface (BERT, RoBERTa, ALBERT, ...): others (MPNet, DeBERTa, Longformer,
    ...) compute it themselves, so in a packed row every sample attended to its neighbours,
    and padded (eval) batches got the 4D bool mask added to the scores instead of masking.
    Some mix tokens across positions outside attention (MobileBERT's trigram embeddings).
    So, once at build: the same samples padded (with the encoder's own 2D mask, the
    reference), padded with the mask packing uses, and packed must give the same logits in
    fp32 eval mode; else a one-line ConfigError. `padded`/`packed`: data.collate(_packed)
    of a few samples of different lengths."""
    def logits(batch: dict) -> torch.Tensor:
        keys = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "cu_seqlens",
                "unpack_index")
        return model(**{k: batch[k] for k in keys if k in batch}, task_id=batch["task_id"])[1]

    was_training, mask_4d = model.training, model.mask_4d
    model.eval()
    name = type(model.encoder).__name__
    try:
        with torch.no_grad():
            model.mask_4d = getattr(model.encoder.config, "_attn_implementation", None) == "sdpa"
            reference = logits(padded)
            model.mask_4d = mask_4d
            try:
                worst = max((logits(b) - reference).abs().max().item() for b in (padded, packed))
            except Exception as error:  # Longformer's own mask code, under the packed attention
                first_line = (str(error).splitlines() or [""])[0]
                raise _packing_refused(name, "its forward failed with packing enabled: "
                                       f"{type(error).__name__}: {first_line}") from error
    finally:
        model.train(was_training)
        model.mask_4d = mask_4d
    if not worst <= tolerance * max(1.0, reference.abs().max().item()):
        raise _packing_refused(name, f"logits differ from padded ones by {worst:.2g}")


def _packing_refused(encoder: str, why: str) -> ConfigError:
    return ConfigError(f"config key 'data.packing': {encoder} does not keep packed samples apart "
                       f"(its attention is not transformers' attention interface): {why}; "
                       "set data.packing=false")


# ----------------------------------------------------------------- q, k and v in one GEMM
def stacked_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """`tensors` stacked along dim 0 as one view, without a copy, where they lie end to end in
    one storage (flat masters lay the q/k/v weights out so); else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if not (t.is_contiguous() and t.dtype == first.dtype and t.shape[1:] == first.shape[1:]
                and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                and t.storage_offset() == offset):
            return None
        offset += t.numel()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    # contiguous strides: a size-1 leading dimension may carry any stride of its own
    return first.detach().as_strided(shape, torch.empty(shape, device="meta").stride())


class FusedQKVAttention:
    """Mixin for a BERT/RoBERTa self-attention (`train.fused_qkv`): query, key and value come
    out of one GEMM against their weights stacked, (3 * hidden, hidden). Same parameters and
    state dict, same maths (each output column is the same dot product).

    Why: a (tokens, 1024) x (1024, 1024) GEMM fills under one wave of an H200's SMs at these
    token counts; the stacked one fills three, and the backward adds no three input
    gradients. Forward + backward of the projections per layer on packed rows: 174.9 -> 120.8
    us (benchmarks/attention_kernels.py). The eager path copies the weights into the stack
    each forward (autograd splits the gradient back); with `train.direct_weight_grads`, the
    CUDA graphs set `qkv_weight` (the stack as a view of the flat bf16 weights, no copy) and
    `qkv_weight_grad_target` (where one GEMM writes all three weight gradients).
    """

    qkv_weight: torch.Tensor | None = None
    qkv_weight_grad_target: torch.Tensor | None = None
    cublaslt_gemms = False  # train.cublaslt_gemms, with the target (write_weight_grads_into)

    def __reduce_ex__(self, protocol):
        """Pickled as its base class plus state: the fused class is made at run time, so
        pickle could not find it by name (`torch.save(model)`, spawn workers)."""
        reduced = super().__reduce_ex__(protocol)
        base = next(c for c in type(self).__mro__[1:]
                    if c is not FusedQKVAttention and not issubclass(c, FusedQKVAttention))
        return (_new_fused_qkv, (base,), *reduced[2:])

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The query, key and value Linears, in the order their weights are stacked."""
        return self.query, self.key, self.value

    def check_stacked_weights(self) -> None:
        """`qkv_weight` must still be the weights the model holds: a parameter re-pointed
        after it was set (`p.data = ...`) would be seen by every other Linear but not here."""
        if self.qkv_weight is None:
            return
        now = stacked_view([m.weight for m in self.projections])
        if now is None or now.data_ptr() != self.qkv_weight.data_ptr():
            raise RuntimeError("train.fused_qkv: the query/key/value weights were re-pointed "
                               "after their stacked view was taken (write_weight_grads_into)")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if cache is not None:
            raise ValueError("train.fused_qkv: encoder self-attention only, got a cache")
        hidden_shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query, key, value = (t.view(hidden_shape).transpose(1, 2) for t in
                             self._qkv(hidden_states).split(self.all_head_size, dim=-1))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          self.eager_attention)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=self.dropout.p if self.training else 0.0,
                                 scaling=self.scaling, **kwargs)
        return out.reshape(*hidden_states.shape[:-1], -1).contiguous(), weights

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.query.bias is None else \
            torch.cat([m.bias for m in self.projections])
        if self.qkv_weight_grad_target is not None and torch.is_grad_enabled():
            return LinearGradInto.apply(x, self.qkv_weight, bias, self.qkv_weight_grad_target,
                                        self.cublaslt_gemms)
        return F.linear(x, torch.cat([m.weight for m in self.projections]), bias)


_FUSED_QKV_CLASSES: dict[type, type] = {}


def _fused_qkv_class(cls: type) -> type:
    """`cls` (e.g. BertSelfAttention) with FusedQKVAttention's forward; one class per `cls`."""
    if cls not in _FUSED_QKV_CLASSES:
        import sys

        eager = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"train.fused_qkv: {cls.__name__}'s module has no "
                             "eager_attention_forward (BERT/RoBERTa-style encoders have one)")
        _FUSED_QKV_CLASSES[cls] = type(f"FusedQKV{cls.__name__}", (FusedQKVAttention, cls),
                                       {"eager_attention": staticmethod(eager)})
    return _FUSED_QKV_CLASSES[cls]


def _new_fused_qkv(base: type) -> FusedQKVAttention:
    """An empty FusedQKV`base` for unpickling; its state is set after."""
    cls = _fused_qkv_class(base)
    return cls.__new__(cls)


def _has_qkv_linears(module: nn.Module | None) -> bool:
    linears = [getattr(module, name, None) for name in ("query", "key", "value")]
    return all(type(m) is nn.Linear for m in linears) \
        and len({(m.in_features, m.out_features, m.bias is None) for m in linears}) == 1 \
        and hasattr(module, "attention_head_size") and hasattr(module, "all_head_size")


def enable_fused_qkv(model: MultiTaskModel) -> int:
    """`train.fused_qkv`: every transformer layer's self-attention projects q, k and v in one
    GEMM (FusedQKVAttention); returns how many. Before compile and CUDA graphs."""
    layers = transformer_layers(model, "train.fused_qkv")
    for layer in layers:
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if isinstance(attention, FusedQKVAttention):
            continue
        if not _has_qkv_linears(attention):
            where = type(attention if attention is not None else layer).__name__
            raise ConfigError(f"config key 'train.fused_qkv': {where} has no query, key and "
                              "value Linears of one shape (BERT/RoBERTa self-attention has); "
                              "set train.fused_qkv=false")
        attention.__class__ = _fused_qkv_class(type(attention))
    return len(layers)


class MultiTaskModel(nn.Module):
    """One encoder shared by all tasks; `task_id` picks the head (all ranks pick the same one)."""

    gather_unpack_backward = False  # train.gather_unpack_backward (set by the trainer)

    def __init__(self, encoder: nn.Module, num_labels: Sequence[int], head: str = "attention",
                 dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict(
            {str(i): HEADS[head](hidden, n, dropout) for i, n in enumerate(num_labels)})
        self.head_kind = head
        self.num_labels = list(num_labels)
        # With SDPA, a ready 4D bool mask is used as is: transformers then skips its own mask
        # building, which syncs with the GPU every step (`padding_mask.all()`).
        self.mask_4d = getattr(encoder.config, "_attn_implementation", None) == "sdpa"
        self.packed_max_seqlen: int | None = None  # set by enable_packed_attention
        self.position_offset = position_offset(encoder)
        # An encoder with one token type (RoBERTa-family) or none (DistilBERT) gets all zeros
        # (not None: a packed row may outrun RoBERTa's zeros buffer): a WordPiece tokenizer
        # still marks a pair's second text 1, an index error in the embeddings.
        self.token_types = getattr(encoder.config, "type_vocab_size", 0) > 1
        self.head_steps = {task: HeadStep(self.dropout, head) for task, head in self.heads.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_id: int,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None,
                unpack_index: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        if not self.token_types and token_type_ids is not None:
            token_type_ids = torch.zeros_like(token_type_ids)
        if cu_seqlens is not None:
            hidden = self._packed_hidden(input_ids, token_type_ids, position_ids, cu_seqlens,
                                         unpack_index, attention_mask)
        else:
            encoder_mask = attention_mask[:, None, None, :].bool() if self.mask_4d \
                else attention_mask
            hidden = self.encoder(input_ids=input_ids, attention_mask=encoder_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
        step = self._head_step(str(int(task_id)))
        if not torch.is_grad_enabled():  # evaluation: eager (train.compile_heads compiles
            return step.forward(hidden, attention_mask, labels)  # the training step only)
        return step(hidden, attention_mask, labels)

    def _head_step(self, task: str) -> HeadStep:
        """The task's HeadStep, made again (compiled again, if it was) for a head replaced
        since the model was built."""
        step, head = self.head_steps[task], self.heads[task]
        if step.head is not head or step.dropout is not self.dropout:
            compiled = step._compiled_call_impl is not None
            step = self.head_steps[task] = HeadStep(self.dropout, head)
            if compiled:
                _compile_head_step(step)
        return step

    def _packed_hidden(self, input_ids, token_type_ids, position_ids, cu_seqlens,
                       unpack_index, attention_mask) -> torch.Tensor:
        """Encode a packed batch (1, T) and gather it back to (batch, width, hidden) for the heads."""
        if self.packed_max_seqlen is None:
            raise RuntimeError("a packed batch needs enable_packed_attention(model, max_seqlen)")
        hidden = self.encoder(input_ids=input_ids, token_type_ids=token_type_ids,
                              position_ids=position_ids + self.position_offset,
                              packed_cu_seqlens=cu_seqlens,
                              packed_max_seqlen=self.packed_max_seqlen).last_hidden_state
        # index_select, not hidden[0][unpack_index]: its backward is an index_add, while
        # advanced indexing's (a sort) cost 4 ms per step on an H200 (BERT-large, batch 32).
        if self.gather_unpack_backward and torch.is_grad_enabled():
            # reshape, not hidden[0]: select's backward zero-fills a (1, T, H) tensor and copies
            rows = UnpackRows.apply(hidden.reshape(-1, hidden.shape[-1]),
                                    unpack_index.reshape(-1), attention_mask.reshape(-1) != 0)
        else:
            rows = hidden[0].index_select(0, unpack_index.reshape(-1))
        return rows.view(*unpack_index.shape, hidden.shape[-1])

    def head_parameter_names(self, task_id: int) -> list[str]:
        """Names of one head's parameters (used to check idle heads stay unchanged)."""
        return [f"heads.{task_id}.{n}" for n, _ in self.heads[str(task_id)].named_parameters()]


class UnpackRows(torch.autograd.Function):
    """A packed batch's token rows gathered into the heads' (samples × max_length) slots
    (`index_select`), whose backward gathers each token's gradient from its one valid slot
    instead of adding every slot's into a zeroed tensor (`train.gather_unpack_backward`).

    Why: index_select's backward is a fill plus an index_add of all samples × max_length slots
    (9,600 rows of 1,024 at batch 32 and length 300) by bf16 atomics: ~75 µs per step on the
    H100 (run Y9's profile), for ~3,500 tokens. Exact for mtl_dist's heads: they mask the pad
    slots (attention pooling's weights there are exactly 0, the CLS head reads slot 0), so a
    pad slot's gradient is exactly zero and each token's is its valid slot's (the same values;
    a -0.0 stays -0.0 where the index_add gave +0.0); tokens in no valid slot (the pack's pad
    tail) get zero, as before. No host sync: the inverse map is built on the device by one
    scatter.
    """

    @staticmethod
    def forward(ctx, rows, index, valid):
        tokens = rows.shape[0]
        slots = torch.arange(index.numel(), device=index.device, dtype=index.dtype)
        inverse = torch.full((tokens + 1,), -1, device=index.device, dtype=index.dtype)
        # pad slots all write to the extra last entry, which is dropped
        inverse.scatter_(0, torch.where(valid, index, tokens), slots)
        ctx.save_for_backward(inverse[:tokens])
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        picked = grad.index_select(0, inverse.clamp(min=0))
        return picked.masked_fill((inverse < 0).unsqueeze(1), 0), None, None


def build_encoder(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int = 0) -> nn.Module:
    """A pretrained encoder from a local directory, or a randomly initialised one from `arch`.

    Weights load in fp32 whatever dtype the checkpoint was saved in (transformers' default
    keeps a bf16 checkpoint bf16): mixed precision is `train.mixed_precision`'s job, and
    AdamW on bf16 weights would lose most small updates."""
    from safetensors import SafetensorError
    from transformers import AutoModel

    from mtl_dist.config import pretrained_weights_problem

    config, kwargs = encoder_config(model_cfg, vocab_size, pad_token_id)
    if not model_cfg.pretrained:
        try:
            return AutoModel.from_config(config, **kwargs)
        except (AssertionError, ValueError, TypeError, NotImplementedError) as exc:
            # a type whose sizes model.arch cannot state (squeezebert asserts on its own)
            raise _unbuildable(model_cfg.arch.model_type, exc) from None
    try:
        return AutoModel.from_pretrained(model_cfg.pretrained, local_files_only=True,
                                         dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:  # a dir without (readable) weights
        raise _unloadable(model_cfg.pretrained, exc) from None
    except SafetensorError as exc:  # a weight file cut short (its message names no file)
        problem = pretrained_weights_problem(model_cfg.pretrained)
        raise _unloadable(model_cfg.pretrained, problem or exc) from None


def encoder_config(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int = 0):
    """The encoder's transformers config and the keyword arguments its class takes; a model
    type that transformers does not know, or that is no encoder, is a one-line ConfigError
    (also from `mtl-dist check`, before any launch)."""
    from transformers import AutoConfig

    if model_cfg.pretrained:
        try:
            config = AutoConfig.from_pretrained(model_cfg.pretrained, local_files_only=True)
        except (OSError, ValueError) as exc:  # no (readable) config.json, or an unknown type
            raise _unloadable(model_cfg.pretrained, exc) from None
        return config, _encoder_kwargs(config, f"model.pretrained ({model_cfg.pretrained})")
    arch = model_cfg.arch
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # a decoder type (gpt2) printed two token-id warnings before its one-line refusal below
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.for_model(
            arch.model_type, vocab_size=vocab_size, hidden_size=arch.hidden_size,
            num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
            intermediate_size=arch.intermediate_size,
            max_position_embeddings=arch.max_position_embeddings,
            hidden_dropout_prob=arch.hidden_dropout_prob,
            attention_probs_dropout_prob=arch.attention_probs_dropout_prob,
            pad_token_id=pad_token_id, type_vocab_size=2)
    except ValueError:
        raise ConfigError(f"config key 'model.arch.model_type': {arch.model_type!r} is not a "
                          "model type transformers knows (e.g. bert, roberta, electra)") from None
    except (NotImplementedError, TypeError) as exc:  # a type model.arch cannot describe
        raise _unbuildable(arch.model_type, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return config, _encoder_kwargs(config, "config key 'model.arch.model_type'")


def _unbuildable(model_type: str, exc: Exception) -> ConfigError:
    detail = " ".join(str(exc).split())[:200] or type(exc).__name__
    return ConfigError(f"config key 'model.arch': cannot build a {model_type!r} encoder from "
                       f"it: {detail}")


def _unloadable(directory: str, exc: Exception | str) -> ConfigError:
    detail = " ".join(str(exc).split())[:300]
    return ConfigError(f"model.pretrained: cannot load an encoder from {directory}: {detail}")


def _encoder_kwargs(config, source: str) -> dict:
    """add_pooling_layer=False where the encoder class takes it (BERT, RoBERTa: the heads
    pool, the pooler would be unused weights); ELECTRA, DistilBERT, DeBERTa have no pooler
    and refuse the argument. A model type that is no encoder is a one-line error."""
    import inspect

    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
        MODEL_MAPPING,
    )

    kind = type(config)
    decoder_only = kind in MODEL_FOR_CAUSAL_LM_MAPPING and kind not in MODEL_FOR_MASKED_LM_MAPPING
    if kind not in MODEL_MAPPING or decoder_only or getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{source}: model type {config.model_type!r}: expected a transformer "
                          "encoder (BERT/RoBERTa family), not a decoder or encoder-decoder")
    encoder_class = MODEL_MAPPING[type(config)]
    takes_pooler = isinstance(encoder_class, type) and \
        "add_pooling_layer" in inspect.signature(encoder_class.__init__).parameters
    return {"add_pooling_layer": False} if takes_pooler else {}


def build_model(model_cfg: ModelConfig, vocab_size: int, num_labels: Sequence[int],
                pad_token_id: int = 0, max_length: int | None = None) -> MultiTaskModel:
    """The full multi-task model described by the config; `max_length` (data.max_length)
    must fit its position embeddings: one-line ConfigError, not an index error mid-run."""
    encoder = build_encoder(model_cfg, vocab_size, pad_token_id)
    padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    if not model_cfg.pretrained and padding_idx not in (None, pad_token_id):
        # MPNet fixes its padding index at 1 whatever the config says: a tokenizer padding
        # with another id had its token 1 ([UNK]) embedded as zeros and shifting positions
        raise ConfigError(f"config key 'model.arch.model_type': {model_cfg.arch.model_type!r} "
                          f"pads with token id {padding_idx}, the tokenizer with "
                          f"{pad_token_id}: use a tokenizer whose pad id is {padding_idx}, or "
                          "another model type")
    limit = usable_positions(encoder)
    if max_length is not None and max_length > limit:
        raise ConfigError(f"config key 'data.max_length': expected <= {limit} (the encoder's "
                          f"position embeddings, less a RoBERTa-style padding offset), got "
                          f"{max_length}")
    return MultiTaskModel(encoder, num_labels, head=model_cfg.head, dropout=model_cfg.dropout)


def position_offset(encoder: nn.Module) -> int:
    """Where the encoder's position ids start: RoBERTa-style embeddings (those with a
    padding_idx: roberta, xlm-roberta(-xl), camembert, data2vec-text, mpnet, ...) number
    positions from padding_idx + 1; BERT-style ones from 0. Read from the embeddings, not a
    list of model types, so that a type no list names still gets the right positions."""
    padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    return 0 if padding_idx is None else padding_idx + 1


def usable_positions(encoder: nn.Module) -> int:
    """The input length the encoder's position table covers."""
    return encoder.config.max_position_embeddings - position_offset(encoder)


def compile_encoder_layers(model: MultiTaskModel, tuning: str = "none",
                           mix_order_reduction: bool = True, pdl: bool = False) -> int:
    """`torch.compile` each transformer layer in place (`train.compile`); returns how many.

    Why layers and not the whole model: the layers are identical, so one compiled graph serves
    all of them (parameters are graph inputs) and compile time does not grow with depth; the
    heads and the loss differ per task and stay eager. Inductor fuses the layer's elementwise
    tail (bias, GELU, dropout, residual, LayerNorm, autocast casts) into a few kernels.
    `tuning` (`train.compile_tuning`) picks Inductor options, COMPILE_TUNING; they change
    kernel launch configs only (Triton kernels: no effect on CPU), not the maths.
    `mix_order_reduction=False` (`train.compile_mix_order_reduction`) turns off Inductor's
    mix-order reduction: the LayerNorm backward's weight and bias gradients are summed by
    reductions of their own instead of one kernel's row blocks plus a column sum (Triton only;
    the same sums in another order).
    `pdl=True` (`train.compile_pdl`): the layers' Triton kernels are launched with Programmatic
    Dependent Launch (Hopper and later; elsewhere Inductor leaves it out): each may start while
    the kernel before it finishes, and waits inside, before its first read of that kernel's
    output, so ~1 us of launch latency per kernel overlaps the one before (the same maths).
    """
    layers = transformer_layers(model, "train.compile")
    options = dict(COMPILE_TUNING[tuning])
    if not mix_order_reduction:
        options.update(_inductor_option("train.compile_mix_order_reduction",
                                        "triton.mix_order_reduction", False,
                                        "no mix-order reduction to turn off"))
    if pdl:
        options.update(_inductor_option("train.compile_pdl", "triton.enable_pdl", True,
                                        "no Programmatic Dependent Launch"))
    for layer in layers:
        layer.compile(dynamic=None, options=options or None)
    return len(layers)


def compile_heads(model: MultiTaskModel) -> int:
    """`torch.compile` each task's HeadStep in place (`train.compile_heads`): the dropout before
    the head, the head and the loss as one graph, for training (evaluation runs them eager);
    returns how many. Why: eager, they are ~20 small kernels forward and ~25 backward, several
    of them passes over every (sample, slot) hidden state (dropout, the score GEMV, masking,
    the pooling's gradients: 32 x 300 x 1,024 in the reference workload); Inductor fuses them.

    The steps share one code object, so one cache of Dynamo's `recompile_limit` graphs: one
    graph per distinct label count (the classifier's shape is guarded; the parameters are
    inputs, as for the layers), with dynamic batch shapes from the start (no static graph
    first). A run with more distinct label counts than the limit allows would run some heads
    eager without a word: the limit is raised to fit them."""
    steps = list(model.head_steps.values())
    label_counts = len(set(model.num_labels))
    needed = label_counts + 2  # headroom: a grad-mode or dtype change
    if torch._dynamo.config.recompile_limit < needed:
        torch._dynamo.config.recompile_limit = needed
    for step in steps:
        _compile_head_step(step)
    return len(steps)


def _compile_head_step(step: HeadStep) -> None:
    step.compile(dynamic=True)


def _inductor_option(key: str, option: str, value: bool, lacks: str) -> dict[str, bool]:
    """{option: value} for the compiled layers, if this torch's Inductor has `option` (a dotted
    name such as triton.enable_pdl); else a one-line error naming the config `key`."""
    import torch._inductor.config as inductor

    group, name = option.split(".")
    if not hasattr(getattr(inductor, group), name):
        raise ConfigError(f"config key '{key}': torch {torch.__version__}'s Inductor has "
                          f"{lacks} (no {option}); set it to {str(not value).lower()}")
    return {option: value}


def transformer_layers(model: MultiTaskModel, switch: str) -> nn.ModuleList:
    """The encoder's stack of transformer layers (BERT/RoBERTa: `encoder.encoder.layer`), which
    `switch` (a config key, named in the error) works on."""
    layers = getattr(getattr(model.encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(f"config key '{switch}': {type(model.encoder).__name__} has no "
                          "encoder.layer list (BERT/RoBERTa-style encoders have one); set "
                          f"{switch}=false")
    return layers


def embedding_tables(model: MultiTaskModel) -> nn.Module:
    """The encoder's input embeddings (BERT/RoBERTa: `encoder.embeddings`: word, position and
    token-type tables), which `train.direct_embedding_grads` works on."""
    embeddings = getattr(model.encoder, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        raise ConfigError(f"config key 'train.direct_embedding_grads': "
                          f"{type(model.encoder).__name__} has no embeddings module "
                          "(BERT/RoBERTa-style encoders have one); set "
                          "train.direct_embedding_grads=false")
    return embeddings


def model_shape(model: nn.Module) -> dict[str, list[int]]:
    """Parameter name -> shape: what a checkpoint must match to be loadable into this model."""
    return {name: list(p.shape) for name, p in model.named_parameters()}
