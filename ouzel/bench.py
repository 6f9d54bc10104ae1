"""`ouzel bench`: prefill and decode throughput as the context grows, and llama-bench's pp/tg pair.

Frontier walk (ds4-bench's method): one sequence reads a fixed long text; at each frontier
(2k, 4k, 8k, ...) it has prefilled only the new interval since the previous frontier (timed), then
decodes `tg` greedy tokens (EOS ignored, timed) and drops them again. Decode speed is also put
against its floor: the bytes of weights one token reads (routed experts: only the top-k of E)
divided by the device's copy bandwidth, measured here on a large tensor. The `jit` column counts
the Triton kernels compiled inside a row's timed work (a fresh machine compiles each kernel once,
then Triton keeps it on disk): a row with compiles timed some of that compiling.
"""
from __future__ import annotations

import csv
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .errors import OuzelError
from .kernels.cuda import compiles

DEFAULT_FRONTIERS = (2048, 4096, 8192, 16384, 32768)

# Varied paragraphs, numbered so the walk never sees one exact repeat (a real text, fixed forever).
_PARAGRAPHS = (
    "The river starts high in the hills, where snow melts into thin streams that join under the pines. "
    "By the time it reaches the valley it is wide and slow, and the town has grown along both banks.",
    "An inference engine reads a model's weights from disk, places them on a device, and runs the same "
    "layers for every token: attention over what came before, then a feed-forward block, then the next layer.",
    "She kept a notebook of every bird she saw that spring: dippers on the stones below the mill, a heron "
    "in the reeds, swallows over the meadow at dusk, and once, very early, an owl on the fence post.",
    "To measure a program honestly, run it on the same machine, with the same inputs, several times, and "
    "report the conditions with the numbers: the card, the model file, the context, the exact command.",
    "The recipe asks for flour, water, salt and patience. Mix, rest for an hour, fold, rest again; the "
    "dough becomes smooth and elastic, and the bread that comes out of the oven is better for the waiting.",
    "Compilers turn loops into vector instructions when they can prove the iterations independent; a "
    "single aliasing pointer or a branch inside the loop body is often enough to keep the code scalar.",
)


def bench_text(min_chars: int) -> str:
    parts, i = [], 0
    while sum(map(len, parts)) < min_chars:
        parts.append(f"Section {i + 1}. {_PARAGRAPHS[i % len(_PARAGRAPHS)]} "
                     f"(note {i * 37 % 101}, page {i // len(_PARAGRAPHS) + 1})\n")
        i += 1
    return "".join(parts)


@dataclass
class Row:
    mode: str  # "frontier" or "pp-tg"
    context: int  # tokens in the sequence when decode starts
    prefill_tokens: int  # tokens computed for this interval
    prefill_s: float
    prefill_tps: float
    decode_tokens: int
    decode_s: float
    decode_tps: float
    floor_fraction: float  # decode time floor (weight bytes / bandwidth) / measured time per token
    compiles: int = 0  # Triton kernels compiled inside the timed prefill and decode (JIT warm-up)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"cpu: {cpu}, {torch.get_num_threads()} threads"
    return str(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 5) -> float:
    """Bytes/s of a large device tensor copy (read + write counted), best of `reps`."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _nbytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return 0 if not w.is_floating_point() else w.numel() * w.element_size()  # int tables: one row read
    return int(getattr(w, "nbytes", 0))


def decode_weight_bytes(model) -> int:
    """Weight bytes one decoded token reads: all but the embedding table (one row), and of each
    routed-expert set only top_k / n_experts (shared experts count whole)."""
    from .layers.linear import Embedding
    from .layers.moe import RoutedExperts

    share = {}
    for mod in model.modules():
        gate, experts = getattr(mod, "gate", None), getattr(mod, "experts", None)
        if isinstance(experts, RoutedExperts) and hasattr(gate, "top_k"):
            share[id(experts)] = gate.top_k / experts.n_experts
    seen, total = set(), 0.0
    for mod in model.modules():
        shapes = getattr(mod, "expected_shapes", None)
        if shapes is None or isinstance(mod, Embedding):
            continue
        for attr in shapes():
            w = getattr(mod, attr, None)
            if w is None or id(w) in seen:
                continue
            seen.add(id(w))
            total += _nbytes(w) * share.get(id(mod), 1.0)
    return int(total)


class Bench:
    """One sequence of `model` on `device`, sized to hold `max_tokens`."""

    def __init__(self, model, device: torch.device, max_tokens: int, tg: int, bandwidth: float):
        from .engine.generate import Sequence
        self.device, self.tg, self.bandwidth = device, tg, bandwidth
        self.seq = Sequence(model, max_tokens, device)
        self.weight_bytes = decode_weight_bytes(model)
        self.jit = 0  # Triton compiles in the timed regions since the last row

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, int, float]:
        _sync(self.device)
        t0 = time.perf_counter()
        with compiles() as c:
            logits = self.seq.prefill(ids)
        self.jit += c.n
        _sync(self.device)
        return logits, len(ids) - self.seq.reused, time.perf_counter() - t0

    def _decode(self, logits: torch.Tensor) -> tuple[int, float]:
        """Greedy, EOS ignored; returns (tokens, seconds). The loop greedy generation runs: on CUDA
        each step fed its token from the device, a token ahead of the host's read-back
        (`generate._decode_ahead`); on a CPU argmax().item() per step. The first step is not
        timed: after a prefill to a new depth it may capture a CUDA graph or compile a kernel for
        the state's new size (DeepSeek V4's indexer at 16k: 4 s, once)."""
        logits = self.seq.step(int(logits.argmax().item()))
        n = min(self.tg, self.seq.max_tokens - len(self.seq.tokens))
        _sync(self.device)
        t0 = time.perf_counter()
        from .engine.generate import ahead_enabled
        with compiles() as c:
            if ahead_enabled(self.device):
                from .engine.generate import _decode_ahead
                from .engine.sampler import SamplingParams
                params = SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True)  # token 0 needs no step
                for _ in _decode_ahead(self.seq, logits, params, set()):
                    pass
            else:
                for _ in range(n):
                    logits = self.seq.step(int(logits.argmax().item()))
            _sync(self.device)
        self.jit += c.n
        return n, time.perf_counter() - t0

    def _drop_to(self, n: int) -> None:
        self.seq.kv.trim(n)
        self.seq.tokens = self.seq.tokens[:min(n, self.seq.kv.length)]

    def _row(self, mode, ctx, pn, ps, dn, ds) -> Row:
        floor = self.weight_bytes / self.bandwidth if self.bandwidth else 0.0
        jit, self.jit = self.jit, 0
        return Row(mode, ctx, pn, ps, pn / ps if ps else 0.0, dn, ds, dn / ds if ds else 0.0,
                   floor * dn / ds if ds else 0.0, jit)

    def warmup(self, tokens: list[int], first: int | None = None) -> None:
        """A full prefill chunk plus a partial one and a few steps first: kernel compilation, the
        first call of each matmul shape (library heuristics) and first-touch page faults belong to
        no frontier. The KV cache is then sized for the whole run, so no decode step or prefill
        chunk is re-captured (CUDA graphs) inside a timed region."""
        chunk = self.seq.chunk
        self.seq.reset()
        logits = self.seq.prefill(tokens[:min(chunk + 32, len(tokens), self.seq.max_tokens - 8)])
        if hasattr(self.seq.kv, "reserve"):  # before the steps: their capture then holds for the run
            self.seq.kv.reserve(self.seq.max_tokens)
        for _ in range(min(4, self.tg)):
            logits = self.seq.step(int(logits.argmax().item()))
        self.seq.reset()
        # each chunk size's forward (its graph captured on the sized cache), or the largest one the run
        # holds, and the first timed prefill (`first` tokens): under 2048-token chunks a 512-token
        # prompt is one eager forward of 512 on a model without chunk graphs, whose kernels compile
        # for it (DeepSeek V4: 4 Triton compiles, ~3 s)
        sizes = (chunk, *self.seq.chunk_graphs, *([first] if first else []))
        for n in sorted({min(n, len(tokens), self.seq.max_tokens) for n in sizes}):
            self.seq.prefill(tokens[:n])
            self.seq.reset()

    def frontiers(self, tokens: list[int], frontiers: list[int], on_row=None) -> list[Row]:
        rows = []
        for f in frontiers:
            logits, pn, ps = self._prefill(tokens[:f])
            dn, ds = self._decode(logits)
            rows.append(self._row("frontier", f, pn, ps, dn, ds))
            if on_row:
                on_row(rows[-1])
            self._drop_to(f)
        return rows

    def pp_tg(self, tokens: list[int], pp: int) -> Row:
        self.seq.reset()
        logits, pn, ps = self._prefill(tokens[:pp])
        dn, ds = self._decode(logits)
        return self._row("pp-tg", pp, pn, ps, dn, ds)


def parse_frontiers(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            n = int(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            raise OuzelError(f"--frontiers: {part!r} is not a token count (e.g. 2k,4k or 2048,4096)") from None
        if n <= 0:
            raise OuzelError("--frontiers must be positive")
        out.append(n)
    if out != sorted(set(out)):
        raise OuzelError("--frontiers must increase")
    return out


def write_csv(rows: list[Row], path: str, device: str, model: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([fl.name for fl in fields(Row)] + ["device", "model"])
        for r in rows:
            w.writerow(list(asdict(r).values()) + [device, model])


def plot(rows: list[Row], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"ouzel bench: --plot needs matplotlib (pip install matplotlib); {path} not written", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ctx = [r.context for r in rows]
    ax.plot(ctx, [r.prefill_tps for r in rows], "o-", label="prefill (new interval)")
    ax.plot(ctx, [r.decode_tps for r in rows], "s-", label="decode")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="tokens/s", title=title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def add_arguments(p) -> None:
    p.add_argument("--frontiers", default=",".join(str(f) for f in DEFAULT_FRONTIERS),
                   help="context frontiers to walk, e.g. 2k,4k,8k (default 2k..32k; capped by --ctx and "
                        "the model's context)")
    p.add_argument("--pp", type=int, default=None, help="instead of the walk: prefill this many tokens "
                   "from empty, then decode --tg (llama-bench's -p/-n pair)")
    p.add_argument("--tg", type=int, default=128, help="tokens decoded at each frontier (default 128)")
    p.add_argument("--runs", type=int, default=3, help="with --pp: repetitions, the median row is shown "
                   "(llama-bench's -r; default 3)")
    p.add_argument("--text-file", default=None, help="walk this text instead of the built-in one")
    p.add_argument("--csv", default=None, help="write the rows to this CSV file")
    p.add_argument("--plot", default=None, help="write a PNG of both curves (needs matplotlib)")


def run(args) -> int:
    from .loader import load as load_model, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tg < 1 or (args.pp is not None and args.pp < 1) or args.runs < 1:
        raise OuzelError("--tg, --pp and --runs must be positive")
    device = resolve_device(args.device)
    bw = copy_bandwidth(device)
    if device.type == "cuda":  # the probe's 2 GiB are not the model's: out of the cache and the peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    loaded = load_model(args.model, device, progress=sys.stderr.isatty())
    model_ctx = int(loaded.config.opt("max_position_embeddings", 4096))
    limit = min(args.ctx or model_ctx, model_ctx)
    if args.pp is not None:
        wanted = [args.pp]
    else:
        wanted = parse_frontiers(args.frontiers)
    frontiers = [f for f in wanted if f + args.tg + 1 <= limit]  # + the untimed first step
    if not frontiers:
        raise OuzelError(f"no frontier fits: {wanted[0]} + --tg {args.tg} tokens exceed the context ({limit})")
    dropped = [f for f in wanted if f not in frontiers]
    text = Path(args.text_file).read_text() if args.text_file else bench_text(8 * frontiers[-1])
    tokens = loaded.tokenizer.encode(text, add_special=True, parse_special=False)
    if len(tokens) < frontiers[-1]:
        raise OuzelError(f"the text has {len(tokens)} tokens; the walk needs {frontiers[-1]}")

    dev_name = device_name(device)
    # the KV cache is sized for what the walk needs, not the model's full (maybe 1M) context
    b = Bench(loaded.model, device, frontiers[-1] + args.tg + 1, args.tg, bw)
    print(f"device: {dev_name}\nmodel:  {loaded.path} ({loaded.architecture}, {loaded.nbytes / 1e9:.2f} GB file)\n"
          f"decode reads {b.weight_bytes / 1e9:.3f} GB of weights per token; copy bandwidth {bw / 1e9:.1f} GB/s "
          f"-> floor {b.weight_bytes / bw * 1e3:.2f} ms/token")
    if dropped:
        print(f"skipped frontiers beyond the context ({limit}): {', '.join(map(str, dropped))}")
    print(f"{'mode':>8} {'context':>8} {'prefill tok':>11} {'prefill t/s':>11} {'decode tok':>10} "
          f"{'decode t/s':>10} {'of floor':>8} {'jit':>4}")

    def show(r: Row) -> None:
        print(f"{r.mode:>8} {r.context:>8} {r.prefill_tokens:>11} {r.prefill_tps:>11.1f} {r.decode_tokens:>10} "
              f"{r.decode_tps:>10.2f} {r.floor_fraction:>8.1%} {r.compiles:>4}", flush=True)

    with torch.inference_mode():
        b.warmup(tokens, frontiers[0])
        if args.pp is not None:
            runs = [b.pp_tg(tokens, args.pp) for _ in range(args.runs)]
            pick = lambda key: sorted(runs, key=key)[len(runs) // 2]  # noqa: E731
            p, d = pick(lambda r: r.prefill_tps), pick(lambda r: r.decode_tps)
            rows = [Row("pp-tg", p.context, p.prefill_tokens, p.prefill_s, p.prefill_tps, d.decode_tokens,
                        d.decode_s, d.decode_tps, d.floor_fraction, sum(r.compiles for r in runs))]
            show(rows[0])
        else:
            rows = b.frontiers(tokens, frontiers, on_row=show)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated by torch, "
              f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved "
              f"(weights {loaded.nbytes / 2**30:.2f} GiB in the file)")
    if args.csv:
        write_csv(rows, args.csv, dev_name, str(loaded.path))
    if args.plot:
        plot(rows, args.plot, f"{Path(loaded.path).name} on {dev_name}")
    return 0
