#!/usr/bin/env bash
# A manual check (not part of .ci/run: it needs two virtual environments): a model trained under one
# major version of transformers predicts the same under the other, for a tied (t5-small-like) and an
# untied (T5 v1.1-like) tiny T5, a frozen NLLB-style decoder (M2M100 with language codes; the checkpoint
# names its base) and a BART decoder with LoRA adapters (needs peft in both).
#   .ci/cross_version.sh VENV_5X VENV_4X        e.g. .ci/cross_version.sh .venv ../venv457
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 ROOT="$root"
first=$1 second=$2
for kind in tied untied nllb_frozen bart_lora; do
  for pair in "$first $second" "$second $first"; do
    read -r train predict <<< "$pair"
    out="$work/$kind-$(basename "$train")"
    "$train/bin/python" - "$out" "$kind" <<'PY'
import sys, os
sys.path.insert(0, os.environ["ROOT"])
sys.path.insert(0, os.environ["ROOT"] + "/tests")
import train_sonar_with_t5 as tsw, tiny, transformers
from transformers import AutoTokenizer
out, kind = sys.argv[1], sys.argv[2]
tsw.make_demo_data(out, num_train=48, num_val=12, feature_dim=64, t5_folder="t5")
if kind == "untied":
    tiny.build_untied_t5(AutoTokenizer.from_pretrained(f"{out}/t5"), f"{out}/t5")
decoder = {"nllb_frozen": ("nllb", ["--freeze_t5"]), "bart_lora": ("bart", ["--lora_rank", "4"])}.get(kind)
if decoder:
    tiny.build_tiny_seq2seq(AutoTokenizer.from_pretrained(f"{out}/t5"), f"{out}/decoder", decoder[0], d_model=64)
code = tsw.main(["--sonar_checkpoint", f"{out}/checkpoints/sonar_encoder_finetuned/best_encoder.pt",
    "--train_features", f"{out}/features/train", "--train_manifest", f"{out}/manifests/train.tsv",
    "--val_features", f"{out}/features/val", "--val_manifest", f"{out}/manifests/val.tsv", "--t5_model", f"{out}/decoder" if decoder else f"{out}/t5",
    "--output_dir", f"{out}/run", "--epochs", "3", "--batch_size", "8", "--learning_rate", "1e-3",
    "--warmup_steps", "2", "--device", "cpu", "--num_beams", "1", "--max_new_tokens", "20", "--report_to", "none",
    *(decoder[1] if decoder else [])])
assert code == 0
PY
    "$predict/bin/python" - "$out" "$kind" "$train" <<'PY'
import sys, os
sys.path.insert(0, os.environ["ROOT"])
import train_sonar_with_t5 as tsw, transformers
out, kind, train = sys.argv[1:4]
assert tsw.main(["--predict", "--checkpoint", f"{out}/run/best_model.pt", "--features", f"{out}/features/val",
                 "--device", "cpu"]) == 0
predicted = dict(l.split("\t") for l in open(f"{out}/run/predictions.tsv").read().splitlines()[1:])
best = {l.split("\t")[0]: l.split("\t")[2] for l in open(f"{out}/run/best_predictions.tsv").read().splitlines()[1:]}
model = tsw.SONARwithT5.from_checkpoint(f"{out}/run/best_model.pt")
same = predicted == best and tsw.is_untied(model.t5) == (kind == "untied")
print(f"{kind}: trained with {os.path.basename(train)}, predicted with transformers {transformers.__version__}: "
      f"{'same predictions' if same else 'DIFFERENT'}")
sys.exit(0 if same else 1)
PY
  done
done
rm -rf "$work"
