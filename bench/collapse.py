"""Mode collapse on the demo data: the default model and one change to it each, same step budget.

    python bench/collapse.py                      # 30 epochs each, ~10 minutes on 2 CPU cores
    python bench/collapse.py --epochs 10 --configs default,greedy

The guide's own bridge (queries over ONE key), its troubleshooting steps and the embedding-only model were
measured here until 2026-12-07, when they were retired (their numbers: docs/benchmarks/collapse.md).

Data: `--demo`'s generated How2Sign-shaped set (2,200 train / 200 val sentences, features built
from per-word "signs" on a large shared component, so the frozen encoder's embeddings of different
clips have mean pairwise cosine >= 0.99), a tiny T5 (d_model 128, 2+2 layers). Every config uses
the same data, seed, optimiser, schedule and deterministic beam-4 decoding; only the bridge flags
differ. Prints a markdown table, then one JSON object as the last line.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train_sonar_with_t5 as tsw  # noqa: E402

CONFIGS = {
    "default": [],
    # one change to the default each (the archive in docs/benchmarks/collapse.md measured these on an earlier
    # default, with bridges and flags since retired)
    "no_label_smoothing": ["--label_smoothing", "0"],
    "memory_tokens_1": ["--memory_tokens", "1"],
    "memory_tokens_32": ["--memory_tokens", "32"],
    "layers_2": ["--bridge_layers", "2"],
    "dropout_0": ["--bridge_dropout", "0"],
    "greedy": ["--num_beams", "1"],
}


def run(name, out, epochs, extra):
    flags = ["--demo", "--output_dir", str(out / name), "--epochs", str(epochs), "--eval_every", str(epochs),
             "--device", "cpu", *CONFIGS[name], *extra]
    started = time.time()
    code = tsw.main(flags)
    if code != 0:
        raise SystemExit(f"config {name} failed with exit code {code}")
    results = json.loads((out / name / "results.json").read_text())
    last = tsw.read_jsonl(out / name / "metrics.jsonl")[-1]
    return {"config": name, "flags": " ".join(CONFIGS[name]) or "(defaults)", "bleu": results["val_bleu"],
            "chrf": results["val_chrf"], "distinct": results["distinct_share"],
            "encoder_cosine": last["encoder_cosine"], "bridge_spread_clips": last["bridge_spread_clips"],
            "bridge_spread_positions": last["bridge_spread_positions"],
            "collapse": tsw.diagnose_collapse(last) or "", "seconds": round(time.time() - started)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per config (69 steps each)")
    parser.add_argument("--configs", default="default", help=f"comma-separated, from {sorted(CONFIGS)}")
    parser.add_argument("--out", default="bench/results/collapse", help="where runs and data go")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = []
    for name in args.configs.split(","):
        # Each run finds the demo data in its own output dir; share one copy through a link.
        (out / name).mkdir(parents=True, exist_ok=True)
        shared = out / "demo_data"
        if not (shared / "READY").is_file():
            tsw.make_demo_data(shared)
        link = out / name / "demo_data"
        if not link.exists():
            link.symlink_to(shared.resolve())
        rows.append(run(name, out, args.epochs, extra))
    print("\n| config | BLEU | chrF | distinct | encoder cosine | bridge spread clips / positions | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} (`{r['flags']}`) | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['distinct']:.1%} | "
              f"{r['encoder_cosine']:.4f} | {r['bridge_spread_clips']:.3f} / {r['bridge_spread_positions']:.3f} | "
              f"{r['seconds']} s |")
    for r in rows:
        if r["collapse"]:
            print(f"{r['config']}: {r['collapse']}")
    print(json.dumps({"epochs": args.epochs, "results": rows}))


if __name__ == "__main__":
    main()
