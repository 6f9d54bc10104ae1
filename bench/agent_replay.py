"""Replay a coding-agent session against the engine and compare KV policies (not a test).

The session: one large system+tools prompt (25k tokens by default, --prompt-tokens for CPU),
a main conversation interleaved with two sub-agents that share that prefix, and an engine
restart in the middle. Every policy runs through the same Scheduler/BlockManager:

  ouzel         every session's blocks stay resident (LRU) + disk tier
                (sub-agents have their own, smaller system prompt: no prefix shared with main)
  single-slot   only the last sequence's KV stays resident (one live session, as ds4 keeps)
  single+disk   one live session, plus the disk tier

Reported per policy: prefill tokens computed, TTFT per turn, disk bytes written. Then aggregate
decode tok/s at 1, 4 and 16 concurrent streams.

  python bench/agent_replay.py --prompt-tokens 2000          # CPU-sized
  python bench/agent_replay.py --device cuda                 # full 25k
"""
from __future__ import annotations

import argparse
import json
import queue
import shutil
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import ouzel  # noqa: E402
from ouzel.engine.request import Request  # noqa: E402
from ouzel.engine.sampler import SamplingParams  # noqa: E402
from ouzel.server.engine import ServeConfig, ServeEngine  # noqa: E402

TOOL = {"name": "tool_{i}", "description": "Operate on the repository: step {i} of the build. Reads files, "
        "runs commands and reports results as JSON.", "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "file path relative to the repository root"},
            "mode": {"type": "string", "enum": ["read", "write", "run"]}}, "required": ["path"]}}

# (agent, user message) in arrival order; "restart" restarts the engine on the same disk dir
SCRIPT = [("main", "Read the build script and tell me what it does."),
          ("sub_a", "Sub-task: list the test files."),
          ("main", "Now run the unit tests."),
          ("sub_b", "Sub-task: check the linter configuration."),
          ("sub_a", "Which of those tests are slow?"),
          ("main", "Summarise the failures."),
          ("restart", ""),
          ("main", "Fix the first failure."),
          ("sub_b", "Does the linter pass now?"),
          ("main", "Write the commit message.")]


def system_prompt(llm, n_tokens: int) -> str:
    parts, i = ["You are a coding agent. Tools:\n"], 0
    while len(llm.tokenize("".join(parts))) < n_tokens:
        parts.append(json.dumps(TOOL).replace("{i}", str(i)) + "\n")
        i += 1
    return "".join(parts)


def generate(engine: ServeEngine, ids: list[int], max_tokens: int, ignore_eos: bool = False):
    q: queue.Queue = queue.Queue()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    engine.scheduler.submit(Request(ids, params, q.put))
    toks = []
    while True:
        e = q.get()
        if e.kind == "token":
            toks.append(e.token)
        elif e.kind == "done":
            return toks, e.usage
        else:
            raise RuntimeError(e.error)


def keep_only(engine: ServeEngine, tokens: list[int]) -> None:
    """Single-slot policy: drop every resident cached block that is not part of `tokens`."""
    keep = set(engine.kv.index.keys_of(tokens))
    pool = engine.pool
    for b in list(pool.cached):
        if pool.hash_of[b] not in keep:
            engine.kv.index.drop_block(b)
            pool.forget(b)


def replay(llm, policy: str, system: str, args) -> dict:
    disk_dir = tempfile.mkdtemp(prefix="ouzel-bench-") if policy != "single-slot" else None

    def new_engine():
        cfg = ServeConfig(model=args.model, max_batch=4, kv_mem_mb=args.kv_mem_mb, kv_disk_dir=disk_dir,
                          kv_disk_space_mb=args.disk_mb)
        return ServeEngine(llm, cfg).start()

    engine = new_engine()
    generate(engine, llm.tokenize("warm up the kernels"), 2)
    # sub-agents have their own system prompt (a role line first, then a third of the tools), as
    # coding agents' sub-agents do: they share no prefix with the main conversation
    sub = system[:len(system) // 3]
    sessions = {"main": [{"role": "system", "content": system}],
                "sub_a": [{"role": "system", "content": "You are sub-agent A, a test runner.\n" + sub}],
                "sub_b": [{"role": "system", "content": "You are sub-agent B, a linter.\n" + sub}]}
    turns, prefill, written = [], 0, 0
    for agent, text in SCRIPT:
        if agent == "restart":
            written += engine.kv.disk.bytes_written if engine.kv.disk else 0
            engine.stop()
            engine = new_engine()
            turns.append({"agent": "restart"})
            continue
        msgs = sessions[agent]
        msgs.append({"role": "user", "content": text})
        ids = llm.chat_prompt(msgs)
        out, usage = generate(engine, ids, args.max_tokens)
        msgs.append({"role": "assistant", "content": llm.detokenize(out)})
        if policy != "ouzel":
            keep_only(engine, ids + out)
        computed = usage.prompt_tokens - usage.cached_tokens
        prefill += computed
        turns.append({"agent": agent, "prompt": usage.prompt_tokens, "cached": usage.cached_tokens,
                      "disk": usage.disk_tokens, "prefill": computed, "ttft_s": round(usage.prefill_s, 3)})
    written += engine.kv.disk.bytes_written if engine.kv.disk else 0
    engine.stop()
    if disk_dir:
        shutil.rmtree(disk_dir, ignore_errors=True)
    return {"policy": policy, "prefill_tokens": prefill, "disk_bytes_written": written,
            "ttft_total_s": round(sum(t.get("ttft_s", 0) for t in turns), 2), "turns": turns}


def decode_throughput(llm, args, streams: int) -> float:
    cfg = ServeConfig(model=args.model, max_batch=max(streams, 1), kv_mem_mb=args.kv_mem_mb)
    engine = ServeEngine(llm, cfg).start()
    prompts = [llm.chat_prompt([{"role": "user", "content": f"Story number {i}: once upon a time"}])
               for i in range(streams)]
    generate(engine, prompts[0], 2)  # warm-up
    m = engine.scheduler.metrics
    tokens0, seconds0 = m.decode_tokens, m.decode_s
    threads = [threading.Thread(target=generate, args=(engine, p, args.decode_tokens, True)) for p in prompts]
    [t.start() for t in threads]
    [t.join() for t in threads]
    engine.stop()
    # steps that only decoded (no prefill chunk in them): tokens out per second of forward time
    return (m.decode_tokens - tokens0) / (m.decode_s - seconds0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-tokens", type=int, default=25000)
    ap.add_argument("--max-tokens", type=int, default=16, help="reply tokens per turn")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens per stream in the throughput test")
    ap.add_argument("--kv-mem-mb", type=int, default=2048)
    ap.add_argument("--disk-mb", type=int, default=8192)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = ouzel.load(args.model, device=args.device, ctx=args.prompt_tokens + 2048)
    system = system_prompt(llm, args.prompt_tokens)
    print(f"model {args.model} on {args.device}, torch threads {torch.get_num_threads()}, "
          f"system+tools prompt {len(llm.tokenize(system))} tokens, {args.max_tokens} reply tokens per turn")
    results = [replay(llm, p, system, args) for p in ("ouzel", "single-slot", "single+disk")]
    print(f"\n{'policy':<12} {'prefill tok':>11} {'TTFT sum s':>10} {'disk MB written':>15}   TTFT per turn (s)")
    for r in results:
        per = " ".join("|R|" if t["agent"] == "restart" else f"{t['ttft_s']:.2f}" for t in r["turns"])
        print(f"{r['policy']:<12} {r['prefill_tokens']:>11} {r['ttft_total_s']:>10.2f} "
              f"{r['disk_bytes_written'] / 2**20:>15.1f}   {per}")
    print("\nturns (ouzel): agent, prompt, cached (of which disk), prefilled")
    for t in results[0]["turns"]:
        if t["agent"] != "restart":
            print(f"  {t['agent']:<6} {t['prompt']:>6} {t['cached']:>6} ({t['disk']:>5}) {t['prefill']:>6}")
        else:
            print("  -- restart --")
    print("\naggregate decode tok/s (greedy, ignore_eos, "
          f"{args.decode_tokens} tokens per stream, decode-only steps):")
    for n in (int(s) for s in args.streams.split(",")):
        print(f"  {n:>3} streams: {decode_throughput(llm, args, n):7.1f} tok/s")


if __name__ == "__main__":
    main()
