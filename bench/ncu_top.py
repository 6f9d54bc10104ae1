"""Summarize an Nsight Compute report made with `--set full`: the SASS lines with the most warp-stall
samples, with the stall reasons ncu attributes to them (`--page source --csv --print-source sass`).

    ncu --clock-control none --set full -k regex:NAME -c 1 -o /tmp/r python3 ...
    python3 bench/ncu_top.py /tmp/r.ncu-rep [N]
"""
from __future__ import annotations

import csv
import io
import subprocess
import sys


def main():
    rep, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    text = subprocess.run(["ncu", "-i", rep, "--page", "source", "--csv", "--print-source", "sass"],
                          capture_output=True, text=True, check=True).stdout
    rows = list(csv.reader(io.StringIO(text[text.find('"'):])))
    head, body = rows[0], rows[1:]
    sampled = [i for i, h in enumerate(head) if "Sampling" in h and "All" in h]
    if not sampled:
        print("columns:", head)
        return
    col = sampled[0]
    num = lambda r, i: float(r[i].replace(",", "") or 0) if i < len(r) else 0.0  # noqa: E731
    total = sum(num(r, col) for r in body) or 1.0
    src = head.index("Source") if "Source" in head else 1
    print(f"{len(body)} SASS lines, {total:.0f} stall samples; columns: {head}")
    for r in sorted(body, key=lambda r: -num(r, col))[:n]:
        print(f"{100 * num(r, col) / total:5.1f}%  {r[src][:90]}")
    # the share of samples by instruction kind (opcode before the first space or dot)
    kinds: dict = {}
    for r in body:
        op = r[src].strip().split(" ")[0].split(".")[0] if r[src].strip() else "?"
        if op.startswith("@"):
            op = r[src].strip().split(" ")[1].split(".")[0]
        kinds[op] = kinds.get(op, 0.0) + num(r, col)
    print("by opcode:", ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:20]))
    # and the instruction count per opcode (executed instructions column if present)
    ex = [i for i, h in enumerate(head) if h.startswith("Instructions Executed")]
    if ex:
        cnt: dict = {}
        for r in body:
            op = r[src].strip().split(" ")[0].split(".")[0] if r[src].strip() else "?"
            if op.startswith("@"):
                op = r[src].strip().split(" ")[1].split(".")[0]
            cnt[op] = cnt.get(op, 0.0) + num(r, ex[0])
        tot = sum(cnt.values()) or 1.0
        print(f"executed warp instructions {tot:.3g}:", ", ".join(f"{k} {100 * v / tot:.1f}%" for k, v in sorted(cnt.items(), key=lambda kv: -kv[1])[:20]))


if __name__ == "__main__":
    main()
