"""The CUDA path as users take it, checked on one GPU in under 10 minutes; prints one table.

    python bench/gpu_check.py                 # on a machine with a GPU (no internet needed)
    python bench/gpu_check.py --out runs/gpu  # keep the runs

Every run is its own `python train_sonar_with_t5.py` process, as a Colab cell starts it, on generated
How2Sign-shaped data (clips of (60-300, 256), real-English-like targets: bench/throughput.py's make_data) with a
decoder of t5-small's dimensions (d_model 512, 6+6 layers, vocabulary 32,128; random weights, since a GPU machine
may be offline):
  cell5_auto   the guide's Cell 5 flags (2 epochs, batch 16, LR 5e-5, warm-up 100, --freeze_encoder, --device cuda)
               with --precision auto: the precision it chose and why, from the log's first lines
  cell5_bf16   the same with --precision bf16 (on a GPU below compute capability 8.0 the log warns: emulated)
  cell5_fp32   the same with --precision fp32
  predict      --predict with cell5_auto's best_model.pt reproduces its best_predictions.tsv exactly
  torchrun     cell5_auto under torchrun on 2 GPUs (only where there are two)
  throughput   bench/throughput.py --device cuda --shapes t5-small (its own process): training samples/s
Exit code 0 only when every step passed. Put the table in docs/benchmarks/speed.md with the GPU's name.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from throughput import SHAPES, make_data  # noqa: E402

CELL5 = ["--freeze_encoder", "--epochs", "2", "--batch_size", "16", "--learning_rate", "5e-5", "--warmup_steps", "100",
         "--device", "cuda", "--report_to", "none"]
TRAIN_CLIPS = 600


def command(args, timeout):
    """(exit code, seconds, last lines of the output) of one process."""
    started = time.time()
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return done.returncode, time.time() - started, (done.stdout + done.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        return 124, time.time() - started, f"timed out after {timeout} s"


def train(data, out, precision, launcher=()):
    flags = ["--sonar_checkpoint", str(data / "encoder.pt"), "--train_features", str(data / "features"),
             "--train_manifest", str(data / "train.tsv"), "--val_features", str(data / "features"),
             "--val_manifest", str(data / "val.tsv"), "--t5_model", str(data / "t5"), "--output_dir", str(out),
             "--cache_dir", str(data / "cache"), "--precision", precision, *CELL5]
    code, seconds, tail = command([*(launcher or [sys.executable]), str(ROOT / "train_sonar_with_t5.py"), *flags], 240)
    log = (out / "train.log").read_text() if (out / "train.log").is_file() else ""
    chosen = next((line.split("Precision: ", 1)[1] for line in log.splitlines() if "Precision: " in line), "?")
    warned = [line.split(" ", 2)[-1] for line in log.splitlines() if "emulated" in line or "fp16 with" in line]
    if code != 0 or not (out / "results.json").is_file():
        return False, seconds, f"exit {code}: {tail.splitlines()[-1] if tail else ''}"
    bleu = json.loads((out / "results.json").read_text())["val_bleu"]
    return True, seconds, f"precision {chosen}; val BLEU {bleu:.2f}" + (f"; warned: {warned[0][:90]}" if warned else "")


def predict(data, out):
    code, seconds, tail = command([sys.executable, str(ROOT / "train_sonar_with_t5.py"), "--predict", "--checkpoint",
                                   str(out / "best_model.pt"), "--features", str(data / "features"), "--manifest",
                                   str(data / "val.tsv"), "--device", "cuda", "--cache_dir", str(data / "cache")], 120)
    if code != 0:
        return False, seconds, f"exit {code}: {tail.splitlines()[-1] if tail else ''}"
    best = [line.split("\t")[::2] for line in (out / "best_predictions.tsv").read_text().splitlines()[1:]]
    again = [line.split("\t") for line in (out / "predictions.tsv").read_text().splitlines()[1:]]
    same = sorted(map(tuple, best)) == sorted(map(tuple, again))
    return same, seconds, f"{len(again)} clips, {'the same' if same else 'NOT the same'} as best_predictions.tsv"


def throughput():
    code, seconds, tail = command([sys.executable, str(ROOT / "bench" / "throughput.py"), "--device", "cuda",
                                   "--shapes", "t5-small", "--no-seed_pipeline"], 300)
    if code != 0:
        return False, seconds, f"exit {code}: {tail.splitlines()[-1] if tail else ''}"
    result = json.loads(tail.strip().splitlines()[-1])
    return True, seconds, (f"{result['train_samples_per_s']:.1f} samples/s training ({result['precision']}), bare T5 "
                           f"{result['bare_samples_per_s']:.1f}, eval {result['eval_sentences_per_s']:.1f} sentences/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where the data and runs go (default: a temporary folder)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a machine with a GPU")
    gpu = torch.cuda.get_device_name(0)
    capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        data = root / "data"
        if not (data / "t5").is_dir():
            make_data(data, SHAPES["t5-small"], TRAIN_CLIPS)
        rows = [("cell5_auto", *train(data, root / "cell5_auto", "auto")),
                ("cell5_bf16", *train(data, root / "cell5_bf16", "bf16")),
                ("cell5_fp32", *train(data, root / "cell5_fp32", "fp32")),
                ("predict", *predict(data, root / "cell5_auto"))]
        if torch.cuda.device_count() >= 2:
            rows.append(("torchrun", *train(data, root / "torchrun", "auto", [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])))
        rows.append(("throughput", *throughput()))
    print(f"\n{gpu} (compute capability {capability}), torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)")
    print("| step | passed | seconds | result |\n|---|---|---|---|")
    for name, passed, seconds, detail in rows:
        print(f"| {name} | {'yes' if passed else 'NO'} | {seconds:.0f} | {detail} |")
    return 0 if all(passed for _, passed, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
