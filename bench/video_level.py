"""Video-level features (--feature_fps) train as well as the same data cut per sentence.

    python bench/video_level.py                  # 3 runs of the demo recipe, ~15 minutes on 2 CPU cores

The demo's data (2,200 train / 200 val sentences, frozen-embedding cosine 0.99) written twice from
the same clips: one file per sentence, and one file per video of 15 sentences with 0-3 rest frames
between them (the users' layout; `tests/tiny.py`'s make_video_project). Trained with the demo's flags
(30 epochs, batch 32, LR 1e-3), seed 42, on:
  per_sentence   manifests/{train,val}.tsv with per-sentence files (what --demo trains on)
  csv_spans      How2Sign's CSV, spans from START_REALIGNED/END_REALIGNED (--feature_fps 8)
  tsv_next_start the users' TSV (id = video, duration = start): a sentence ends where the next one
                 starts, so its span also holds the rest frames after it (--feature_fps 8)
Prints a table, then one JSON line.
"""

import argparse
import json
import shlex
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train_sonar_with_t5 as tsw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402

FPS = str(tsw.DEMO_FPS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="bench/results/video_level")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", default="", help='flags added to every run, e.g. "--frame_stride 4"')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not (out / "clips" / "READY").is_file():
        tsw.make_demo_data(out / "clips")
    if not (out / "videos" / "READY").is_file():
        tiny.make_video_project(out / "videos", t5_folder=None)
    runs = {
        "per_sentence": ("clips", "{split}.tsv", []),
        "csv_spans": ("videos", "how2sign_realigned_{split}.csv", ["--feature_fps", FPS]),
        "tsv_next_start": ("videos", "{split}.tsv", ["--feature_fps", FPS]),
    }
    rows = []
    for name, (layout, manifest, extra) in runs.items():
        root = out / layout
        flags = [f"--{k}={v}" for k, v in tsw.DEMO_SETTINGS.items()] + [
            "--epochs", str(args.epochs), "--eval_every", str(args.epochs), "--device", "cpu",
            "--sonar_checkpoint", str(root / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
            "--t5_model", str(out / "clips" / "t5-tiny"), "--output_dir", str(out / "runs" / name), *extra,
            *shlex.split(args.extra)]
        for split in ("train", "val"):
            flags += [f"--{split}_features", str(root / "features" / split),
                      f"--{split}_manifest", str(root / "manifests" / manifest.format(split=split))]
        started = time.time()
        if tsw.main(flags) != 0:
            raise SystemExit(f"{name} failed")
        results = json.loads((out / "runs" / name / "results.json").read_text())
        rows.append({"run": name, "bleu": results["val_bleu"], "chrf": results["val_chrf"],
                     "distinct": results["distinct_share"], "val_clips": results["val_clips"],
                     "seconds": round(time.time() - started)})
    print("\n| run | BLEU | chrF | distinct | val clips | time |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['distinct']:.1%} | {r['val_clips']} | "
              f"{r['seconds']} s |")
    print(json.dumps({"epochs": args.epochs, "runs": rows}))


if __name__ == "__main__":
    main()
