"""The one table of bench/gpu/run.sh, from the JSON rows its benchmarks wrote (missing parts are named).

    python bench/gpu/table.py OUT [--record OUT/gpu.json]   # --record: the table with its provenance, for
                                                            # docs/results.py add
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ["benchmark", "lmrec", "reference (same run)", "ratio"]


def rows(out: Path, name: str) -> list[dict]:
    p = out / name
    return json.loads(p.read_text()) if p.exists() else []


def table(out: Path) -> list[list[str]]:
    body = []
    for r in rows(out, "gen.json"):
        ratio = f"{r['vs_sdpa']:.2f}×" if "vs_sdpa" in r else "—"
        body.append([f"Qwen3-{r['shape']} shape, 32k packs, {r['impl']}",
                      f"{r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f} %, peak {r['peak_gib']:.1f} GiB",
                      "transformers' sdpa on the same packs", ratio])
    for r in rows(out, "longformer.json"):
        body.append([f"Longformer_ZH MLM 4,096 tokens, {r['impl']} (attention dropout {r['dropout']})",
                      f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.1f} GiB", "HF's kernels",
                      f"{r['vs_hf']:.2f}× speed, {r['mem_vs_hf']:.2f}× memory"])
    for r in rows(out, "infer.json"):
        if r["part"] == "beam":
            body.append([f"beam search, {r['model']} model, {r['items']:,} items",
                          f"{r['ours_p50_ms']:.2f} / {r['ours_p99_ms']:.2f} ms per query (p50/p99)",
                          f"HF generate {r['hf_p50_ms']:.2f} / {r['hf_p99_ms']:.2f} ms", f"{r['speedup']:.1f}×"])
        elif r["part"] == "rank":
            body.append([f"full ranking 10M × 128, chunks of {r['chunk']:,}", f"{r['ms_per_query']:.3f} ms per query",
                          f"one product + topk {r['ref_ms_per_query']:.3f} ms", f"{r['ratio']:.2f}×"])
        elif r["part"] == "finetune":
            body.append(["RecFormer finetuning (hidden 768, 12 layers)", f"{r['ours_samples_per_s']:.1f} samples/s",
                          f"HF kernels {r['hf_samples_per_s']:.1f}", f"{r['ratio']:.2f}×"])
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("bench/gpu/out"))
    ap.add_argument("--record", help="also write the table and its provenance here (docs/results.py add)")
    args = ap.parse_args()
    out = args.out
    env = (out / "env.txt").read_text().strip().splitlines() if (out / "env.txt").exists() else []
    print("| " + " · ".join(env) + " |\n| --- | --- | --- | --- |" if env else "")
    body = table(out)
    print("| " + " | ".join(COLUMNS) + " |")
    for row in body:
        print("| " + " | ".join(row) + " |")
    log = out / "gpu_tests.log"
    tests = None
    if log.exists():
        last = [ln for ln in log.read_text().splitlines() if " passed" in ln or " failed" in ln or "error" in ln]
        tests = last[-1] if last else "no summary (timed out?)"
        print(f"\nGPU tests: {tests}")
    if args.record:
        from lmrec.provenance import Table, write_record

        note = "; ".join([*env[2:], *([f"GPU tests: {tests}"] if tests else [])])
        write_record(args.record, Table(title="On one GPU: bench/gpu/run.sh", columns=COLUMNS, rows=body, note=note),
                     command="bash bench/gpu/run.sh")


if __name__ == "__main__":
    main()
