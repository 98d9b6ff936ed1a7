"""What a decoding sweep costs against one --predict per setting, on the same clips and trained model.

    python bench/sweep.py                       # 12 settings, 200 validation clips, ~10 minutes on 2 CPU cores
    python bench/sweep.py --clips 100 --threads 1

A tiny T5 trained for a few epochs on the demo's generated data (quality does not matter here: the
decoding work does), then the same 12 settings (num_beams 1,4,5 x length_penalty 1.0,1.5 x
no_repeat_ngram_size 0,3) two ways:
  sweep     one `--predict --sweep ...`: the model and the clips loaded once, each batch's decoder
            memory (encoder output, frame memory) computed once and reused by every setting
  singles   twelve `--predict` commands, one setting each, as a user would run them
Timed as commands (each a fresh interpreter that loads the model and opens the frame store, as a user's
commands do) and, to show what decoding alone costs, in this process through `main([...])`. The frame
store is built first. Prints the seconds of each, their ratios, and one JSON line.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train_sonar_with_t5 as tsw  # noqa: E402

GRID = {"num_beams": ["1", "4", "5"], "length_penalty": ["1.0", "1.5"], "no_repeat_ngram_size": ["0", "3"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200, help="validation clips decoded")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs before decoding")
    parser.add_argument("--out", default="bench/results/sweep")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, cache = Path(args.out), Path(args.out) / "cache"
    data = out / "data"
    if not (data / "READY").is_file():
        tsw.make_demo_data(data, num_train=600, num_val=args.clips)
    run = out / "run"
    if not (run / "best_model.pt").is_file():
        assert tsw.main(["--output_dir", str(run), "--epochs", str(args.epochs), "--eval_every",
                         str(args.epochs), "--train_features", str(data / "features/train"),
                         "--train_manifest", str(data / "manifests/train.tsv"), "--val_features",
                         str(data / "features/val"), "--val_manifest", str(data / "manifests/val.tsv"),
                         "--sonar_checkpoint", str(data / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
                         "--t5_model", str(data / "t5-tiny"), "--device", "cpu", "--report_to", "none",
                         "--batch_size", "32", "--learning_rate", "1e-3", "--warmup_steps", "50",
                         "--cache_dir", str(cache)]) == 0
    predict = ["--predict", "--checkpoint", str(run / "best_model.pt"), "--features", str(data / "features/val"),
               "--manifest", str(data / "manifests/val.tsv"), "--device", "cpu", "--cache_dir", str(cache),
               "--predictions_file", str(out / "predictions.tsv")]
    assert tsw.main(predict) == 0                                   # the frame store built, caches warm
    grid = " ".join(f"{k}={','.join(v)}" for k, v in GRID.items())
    started = time.perf_counter()
    assert tsw.main(predict + ["--sweep", grid]) == 0
    sweep = time.perf_counter() - started
    combos = [[flag for name, value in zip(GRID, values) for flag in (f"--{name}", value)]
              for values in itertools.product(*GRID.values())]
    started = time.perf_counter()
    for flags in combos:
        assert tsw.main(predict + flags) == 0
    in_process = time.perf_counter() - started
    started = time.perf_counter()
    for flags in combos:     # what a user types: a command each, the interpreter and the model loaded each time
        subprocess.run([sys.executable, str(Path(tsw.__file__)), *predict, *flags], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    commands = time.perf_counter() - started
    sweep_command = time.perf_counter()
    subprocess.run([sys.executable, str(Path(tsw.__file__)), *predict, "--sweep", grid], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    sweep_command = time.perf_counter() - sweep_command
    print(f"| {len(combos)} settings, {args.clips} clips, {args.threads} threads | one --sweep command "
          f"{sweep_command:.1f} s | {len(combos)} --predict commands {commands:.1f} s | ratio "
          f"{sweep_command / commands:.3f} | in one process: sweep {sweep:.1f} s, {len(combos)} predictions "
          f"{in_process:.1f} s, ratio {sweep / in_process:.3f} |")
    print(json.dumps({"settings": len(combos), "clips": args.clips, "sweep_command_s": round(sweep_command, 2),
                      "predict_commands_s": round(commands, 2), "ratio": round(sweep_command / commands, 4),
                      "sweep_in_process_s": round(sweep, 2), "predictions_in_process_s": round(in_process, 2),
                      "ratio_in_process": round(sweep / in_process, 4)}))


if __name__ == "__main__":
    main()
