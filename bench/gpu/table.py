"""The one table of bench/gpu/run.sh, from the JSON rows its benchmarks wrote (missing parts are named)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(out: Path, name: str) -> list[dict]:
    p = out / name
    return json.loads(p.read_text()) if p.exists() else []


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/gpu/out")
    env = (out / "env.txt").read_text().strip().splitlines() if (out / "env.txt").exists() else []
    print("| " + " · ".join(env) + " |\n| --- | --- | --- | --- |" if env else "")
    print("| benchmark | lmrec | reference (same run) | ratio |")
    for r in rows(out, "gen.json"):
        ref = "transformers' sdpa on the same packs"
        ratio = f"{r['vs_sdpa']:.2f}×" if "vs_sdpa" in r else "—"
        print(f"| Qwen3-{r['shape']} shape, 32k packs, {r['impl']} | {r['tokens_per_s']:,.0f} tokens/s, MFU "
              f"{100 * r['mfu']:.1f} %, peak {r['peak_gib']:.1f} GiB | {ref} | {ratio} |")
    for r in rows(out, "longformer.json"):
        print(f"| Longformer_ZH MLM 4,096 tokens, {r['impl']} (attention dropout {r['dropout']}) | "
              f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gib']:.1f} GiB | HF's kernels | "
              f"{r['vs_hf']:.2f}× speed, {r['mem_vs_hf']:.2f}× memory |")
    for r in rows(out, "infer.json"):
        if r["part"] == "beam":
            print(f"| beam search, {r['model']} model, {r['items']:,} items | {r['ours_p50_ms']:.2f} / "
                  f"{r['ours_p99_ms']:.2f} ms per query (p50/p99) | HF generate {r['hf_p50_ms']:.2f} / "
                  f"{r['hf_p99_ms']:.2f} ms | {r['speedup']:.1f}× |")
        elif r["part"] == "rank":
            print(f"| full ranking 10M × 128, chunks of {r['chunk']:,} | {r['ms_per_query']:.3f} ms per query | one "
                  f"product + topk {r['ref_ms_per_query']:.3f} ms | {r['ratio']:.2f}× |")
        elif r["part"] == "finetune":
            print(f"| RecFormer finetuning (hidden 768, 12 layers) | {r['ours_samples_per_s']:.1f} samples/s | HF "
                  f"kernels {r['hf_samples_per_s']:.1f} | {r['ratio']:.2f}× |")
    log = out / "gpu_tests.log"
    if log.exists():
        last = [ln for ln in log.read_text().splitlines() if " passed" in ln or " failed" in ln or "error" in ln]
        print(f"\nGPU tests: {last[-1] if last else 'no summary (timed out?)'}")


if __name__ == "__main__":
    main()
