"""The flat AdamW step overlapped with the next forward (`train.overlap_optimizer`).

Why: on the H100 of issue 8 the flat AdamW kernel took 3.0 of the step's 22.9 ms of GPU
kernels (run S), bound by memory bandwidth, after the backward and before the next forward;
the forward's GEMMs are bound by compute. The forward reads the layers' weights one layer at
a time, so it need not wait for the whole step: only for the part it is about to read.

How: the encoder's flat buffers (`train.flat_masters`) are cut into chunks in the order the
forward reads them: chunk 0 is every encoder parameter outside the transformer layers (the
embeddings, read first; a pooler), then one chunk per layer. FlatAdamW hands its step to
`OverlappedStep.run`, which updates chunk after chunk on a side CUDA stream, recording an
event after each; the encoder waits (on the GPU, not the host) for chunk 0 before it starts,
layer k for chunk k + 1. Inside a CUDA graph those waits are wait nodes on external events:
each replay waits for the latest step's chunks. Anything else that reads the weights, masters
or moments (evaluation, a checkpoint, EMA, the end of training) calls `settle()` first.

On CPU there are no streams: the chunks are deferred instead, each run when the forward
reaches its module or when something settles the step. The waits and the settle points are
the same as on the GPU, so a CPU test sees a missed one as stale weights (on the GPU: a race).

Maths: each element's update is the same as in the whole-buffer step, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import nn

from mtl_dist.errors import ConfigError
from mtl_dist.master import FlatSegment

# (optimizer group index, slice of its flat buffers): what one call of the update covers
Span = tuple[int, slice]


def chunk_spans(layers: nn.ModuleList,
                segments: Mapping[int, FlatSegment]) -> list[list[Span]]:
    """The spans of every chunk, in the order the forward reads them: chunk 0 holds the
    parameters outside `layers`, chunk k + 1 those of layers[k]. Runs of neighbouring
    parameters of one chunk are one span."""
    chunk_of = {id(p): k + 1 for k, layer in enumerate(layers) for p in layer.parameters()}
    chunks: list[list[Span]] = [[] for _ in range(len(layers) + 1)]
    for i, seg in segments.items():
        run_chunk, run_start, end = None, 0, 0
        for p, _, span in seg.spans():
            k = chunk_of.get(id(p), 0)
            if k != run_chunk:
                if run_chunk is not None:
                    chunks[run_chunk].append((i, slice(run_start, span.start)))
                run_chunk, run_start = k, span.start
            end = span.stop
        if run_chunk is not None:
            chunks[run_chunk].append((i, slice(run_start, end)))
    return chunks


def misaligned_spans(chunks: list[list[Span]], alignment: int = 8) -> int:
    """How many spans start off a multiple of `alignment` elements (8 bf16 weights: 16
    bytes, what the compiled update's vectorised loads assume; a misaligned one is copied
    before each update and back after: same result, slower)."""
    return sum(1 for spans in chunks for _, span in spans if span.start % alignment)


class OverlappedStep:
    """Runs an optimizer step over the chunks so that the next forward waits per chunk."""

    def __init__(self, encoder: nn.Module, layers: nn.ModuleList,
                 segments: Mapping[int, FlatSegment], device: torch.device):
        self.chunks = chunk_spans(layers, segments)
        self.device = device
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._events: list[torch.cuda.Event] = []
        if self._side is not None:
            # External: captured into a CUDA graph, a wait is a node that waits for the event's
            # latest record at each replay. Recorded once now: torch skips a wait on an event
            # never recorded, and a graph captured before the first step would lack the node.
            self._events = [_external_event() for _ in self.chunks]
            for event in self._events:
                event.record(self._side)
        self._deferred: list[Callable[[], None] | None] = [None] * len(self.chunks)
        encoder.register_forward_pre_hook(partial(self._wait_hook, 0))
        for k, layer in enumerate(layers):
            self._wait_before(layer, k + 1)
        # CPU: a chunk whose module the forward skipped runs when the forward ends, before the
        # backward and the next step read the gradients it reads (the GPU runs it anyway).
        encoder.register_forward_hook(self._settle_deferred)

    def _wait_before(self, layer: nn.Module, k: int) -> None:
        compiled = layer._compiled_call_impl  # set by Module.compile (train.compile)
        if compiled is None:
            layer.register_forward_pre_hook(partial(self._wait_hook, k))
            return

        # A hook would run inside the compiled code (Dynamo traces the module's hooks): the
        # wait goes in front of it instead, and the compiled graph stays as it was.
        def waiting_call(*args, **kwargs):
            self.wait(k)
            return compiled(*args, **kwargs)

        layer._compiled_call_impl = waiting_call

    def _wait_hook(self, k: int, module: nn.Module, args) -> None:
        self.wait(k)

    def _settle_deferred(self, module: nn.Module, args, output) -> None:
        if self._side is None:
            self.settle()

    def run(self, launch: Callable[[], Callable[[int, slice], None]]) -> None:
        """One optimizer step. `launch()` (called once: e.g. its scalars to the device)
        returns the update of one span, which then runs over every chunk in order. GPU: now,
        on the side stream, after all the main stream has queued (the gradients, the clip
        scale); CPU: each chunk when the forward reaches it, or at `settle()`."""
        self.settle()  # a step still pending (CPU) runs first: steps never reorder
        if self._side is None:
            update = launch()
            self._deferred = [partial(_update_chunk, update, spans) for spans in self.chunks]
            return
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            update = launch()
            for spans, event in zip(self.chunks, self._events, strict=True):
                _update_chunk(update, spans)
                event.record(self._side)

    def wait(self, k: int) -> None:
        """What runs next on the current stream waits for chunk `k` of the latest step."""
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_event(self._events[k])
            return
        update, self._deferred[k] = self._deferred[k], None
        if update is not None:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                update()

    def settle(self) -> None:
        """What runs next on the current stream sees the whole step (GPU: a wait on the
        device, no host sync)."""
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            return
        for k in range(len(self.chunks)):
            self.wait(k)

    @property
    def side_stream(self) -> torch.cuda.Stream | None:
        return self._side


def _external_event() -> torch.cuda.Event:
    try:
        return torch.cuda.Event(external=True)
    except TypeError:  # torch before external events
        raise ConfigError(f"config key 'train.overlap_optimizer': needs CUDA events that a "
                          f"CUDA graph can wait on (torch.cuda.Event(external=True)), which "
                          f"torch {torch.__version__} lacks; set it to false") from None


def _update_chunk(update: Callable[[int, slice], None], spans: list[Span]) -> None:
    for i, span in spans:
        update(i, span)
