"""Where torch's reserved GPU memory goes beyond what it allocates, on the lent GPU: the caching
allocator's history is recorded through load, `ouzel bench`'s warm-up and a few pp512/tg128 runs,
then replayed to find the moment of peak reserved memory and what held it.

    python3 bench/memory_trace.py MODEL.gguf [RUNS]

Prints allocated/reserved after each stage, then at the peak of reserved memory: the live
allocations grouped by the first ouzel frame that made them, and which allocations grew the
reserve (segment maps, by ouzel frame). The grouping names the code; the sizes say how much.
"""
from __future__ import annotations

import sys
from collections import defaultdict

import torch


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def where(frames: list[dict]) -> str:
    """The innermost ouzel (or bench) frame of an allocation's stack, else the innermost frame."""
    for f in frames:
        name = f.get("filename", "")
        if "/ouzel/" in name or "/bench/" in name:
            return f"{name.rsplit('/ouzel/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "?"


def stage(label: str) -> None:
    torch.cuda.synchronize()
    print(f"{label:<28} allocated {gib(torch.cuda.memory_allocated())}, reserved {gib(torch.cuda.memory_reserved())}"
          f" (peaks {gib(torch.cuda.max_memory_allocated())} / {gib(torch.cuda.max_memory_reserved())})", flush=True)


def replay(trace: list[dict]) -> None:
    """Walk the trace (reserved = mapped segment bytes, live = allocations not yet freed) to the
    moment of peak reserved memory, the one with the most allocated if several: a segment is mapped
    just before the allocation that needed it, which that moment then includes."""
    def walk(stop: int | None = None):
        reserved = allocated = 0
        live: dict[int, tuple[int, str]] = {}
        grown: dict[str, int] = defaultdict(int)
        best = (0, 0, 0)  # reserved, allocated, index
        for i, ev in enumerate(trace[:stop]):
            act, size, addr = ev["action"], ev.get("size", 0), ev.get("addr", 0)
            if act in ("segment_alloc", "segment_map"):
                reserved += size
                grown[where(ev.get("frames", []))] += size
            elif act in ("segment_free", "segment_unmap"):
                reserved -= size
            elif act == "alloc":
                allocated += size
                live[addr] = (size, where(ev.get("frames", [])))
            elif act == "free_completed":
                allocated -= size
                live.pop(addr, None)
            best = max(best, (reserved, allocated, i + 1))
        return best, live, grown

    (reserved, allocated, at), _, _ = walk()
    _, live, grown = walk(at)
    print(f"\npeak of the trace: reserved {gib(reserved)}, allocated then {gib(allocated)}")
    by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, w in live.values():
        by[w][0] += size
        by[w][1] += 1
    print("live at the peak, by ouzel frame (top 25):")
    for w, (n, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {gib(n):>10} in {c:5d}  {w}")
    print("reserve grown by (segment maps up to the peak, top 15):")
    for w, n in sorted(grown.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {gib(n):>10}  {w}")


def main() -> None:
    from ouzel.bench import Bench, bench_text, copy_bandwidth
    from ouzel.loader import load

    path, runs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    loaded = load(path, device="cuda", progress=False)
    stage("loaded")
    tokens = loaded.tokenizer.encode(bench_text(8 * 1024), add_special=True, parse_special=False)
    b = Bench(loaded.model, dev, 512 + 128 + 1, 128, bw)
    stage("sequence made")
    with torch.inference_mode():
        b.warmup(tokens, 512)
        stage("warm-up")
        for r in range(runs):
            row = b.pp_tg(tokens, 512)
            stage(f"pp512 {row.prefill_tps:.0f} / tg128 {row.decode_tps:.1f}")
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    pools: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])  # segments, bytes, allocated
    for seg in snap["segments"]:
        p = pools[(seg["stream"], seg.get("segment_pool_id"))]
        p[0] += 1
        p[1] += seg["total_size"]
        p[2] += seg["allocated_size"]
    print("\nsegments now, by stream and pool:")
    for (stream, pool), (n, total, used) in sorted(pools.items(), key=lambda kv: -kv[1][1]):
        print(f"  stream {stream:#x} pool {pool}: {n} segments, {gib(total)}, allocated {gib(used)}")
    for trace in snap["device_traces"]:
        if trace:
            replay(trace)


if __name__ == "__main__":
    main()
