"""Where the peak GPU memory of a throughput variant comes from, and what outlives its trainer.

Runs one `throughput.py` variant (same workload, same trainer end to end) with the CUDA
allocator's history recorded, then replays the allocation trace to find the moment of the
peak of allocated bytes and groups the blocks alive then by where they were allocated (the
innermost mtl_dist / benchmarks frame and the innermost frame). After the trainer is deleted
it lists what is still allocated the same way (a second variant in one process read 3.2 GiB
more than the first).

    python benchmarks/memory_peak.py --variant 11 --warmup 100 --steps 100 \
        --out benchmarks/results/memory_peak_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import weakref
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (this folder's sibling script)

OURS = ("/mtl_dist/", "/benchmarks/")


def _frame(f: dict) -> str:
    return f"{Path(f['filename']).name}:{f['line']} {f['name']}"


def allocation_site(frames: list[dict]) -> str:
    """'innermost of our frames <- innermost frame' (frames come innermost first)."""
    if not frames:
        return "(no stack recorded)"
    ours = next((f for f in frames if any(o in f["filename"] for o in OURS)), None)
    inner = _frame(frames[0])
    return f"{_frame(ours)} <- {inner}" if ours else inner


def group_by_site(blocks: list[tuple[int, list[dict]]], top: int = 15) -> list[dict]:
    sizes: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for size, frames in blocks:
        site = allocation_site(frames)
        sizes[site] += size
        counts[site] += 1
    ranked = sorted(sizes, key=sizes.get, reverse=True)[:top]
    return [{"site": s, "gib": sizes[s] / 2**30, "blocks": counts[s]} for s in ranked]


def _apply(live: dict[int, tuple[int, list[dict]]], event: dict) -> int:
    """One trace event on the live blocks (alloc / free_requested: the allocator's 'allocated'
    counter moves on these); returns the change of allocated bytes."""
    if event["action"] == "alloc":
        live[event["addr"]] = (event["size"], event.get("frames", []))
        return event["size"]
    if event["action"] == "free_requested" and event["addr"] in live:
        return -live.pop(event["addr"])[0]
    return 0


def peak_from_trace(trace: list[dict]) -> dict:
    """The moment of the peak of allocated bytes, and the blocks alive then by site."""
    live: dict[int, tuple[int, list[dict]]] = {}
    total = peak = peak_at = 0
    for i, event in enumerate(trace):
        total += _apply(live, event)
        if total > peak:
            peak, peak_at = total, i
    live = {}  # a second pass up to the peak: copying the live set at every new peak is slow
    for event in trace[:peak_at + 1]:
        _apply(live, event)
    at = trace[peak_at] if trace else {}
    return {"peak_gib_replayed": peak / 2**30, "peak_event": peak_at, "events": len(trace),
            "peak_event_site": allocation_site(at.get("frames", [])),
            "live_at_peak_by_site": group_by_site(list(live.values()))}


def still_allocated() -> dict:
    blocks = [(b["size"], b.get("frames", []))
              for seg in torch.cuda.memory._snapshot()["segments"] for b in seg["blocks"]
              if b["state"] == "active_allocated"]
    return {"allocated_gib": torch.cuda.memory_allocated() / 2**30,
            "by_site": group_by_site(blocks)}


def referrer_chain(obj, depth: int = 5, width: int = 5) -> list[str]:
    """Who keeps `obj` alive: referrer types, `depth` levels up (frames and our lists skipped)."""
    lines: list[str] = []
    skip = {id(lines)}

    def walk(o, level):
        if level == depth:
            return
        refs = [r for r in gc.get_referrers(o)
                if id(r) not in skip and type(r).__name__ not in ("frame", "list_iterator")]
        skip.add(id(refs))
        for r in refs[:width]:
            desc = type(r).__qualname__
            if isinstance(r, dict):
                desc += f" keys={list(r)[:6]}"
            lines.append("  " * level + desc)
            walk(r, level + 1)

    walk(obj, 0)
    return lines


def watch_trainer() -> dict:
    """Keeps weak references to the next trainer and its model."""
    from mtl_dist.trainer import Trainer

    watched: dict = {}
    fit = Trainer.fit

    def watching_fit(self, *args, **kwargs):
        watched["model"] = weakref.ref(self.module)
        watched["trainer"] = weakref.ref(self)
        return fit(self, *args, **kwargs)

    Trainer.fit = watching_fit
    return watched


def leftovers(watched: dict) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    model = watched["model"]()
    return {**still_allocated(), "trainer_alive": watched["trainer"]() is not None,
            "model_alive": model is not None,
            "model_kept_by": referrer_chain(model) if model is not None else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=int, default=11, help="index in throughput.py's list")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/memory_peak.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    name, overrides = throughput.variant_list()[args.variant]
    root = Path(tempfile.mkdtemp(prefix="mtl_mem_"))
    throughput.make_data(root)
    watched = watch_trainer()
    torch.cuda.memory._record_memory_history(max_entries=5_000_000, stacks="python")
    row = throughput.run_mtl(root, name, overrides, args.warmup, args.steps)
    trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": " ".join(sys.argv), "variant": name, "overrides": overrides,
              "run": row, "peak": peak_from_trace(trace)}
    del trace
    result["after_trainer_deleted"] = leftovers(watched)
    torch._dynamo.reset()  # what throughput.py does before its next variant
    result["after_dynamo_reset"] = leftovers(watched)
    torch.cuda.memory._record_memory_history(enabled=None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("run", "peak", "after_trainer_deleted",
                                            "after_dynamo_reset")}, indent=1))


if __name__ == "__main__":
    main()
