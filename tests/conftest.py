"""Shared fixtures: a tiny How2Sign-shaped project laid out as the guide expects, built offline."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Frame stores of the tests go to a folder of their own, not the user's ~/.cache.
os.environ["SONAR_T5_CACHE"] = tempfile.mkdtemp(prefix="sonar_t5_test_cache_")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(2)

import train_sonar_with_t5 as tsw  # noqa: E402

# Subprocesses get one thread each: two torch processes with default threads on 2 cores crawl.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

CELL5 = """--sonar_checkpoint checkpoints/sonar_encoder_finetuned/best_encoder.pt
    --train_features features/train --train_manifest manifests/train.tsv
    --val_features features/val --val_manifest manifests/val.tsv
    --output_dir checkpoints/sonar_t5_attention_test --t5_model t5-small --freeze_encoder
    --epochs 2 --batch_size 16 --learning_rate 5e-5 --warmup_steps 100 --device cuda""".split()


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="session")
def project_template(tmp_path_factory):
    """48 training and 12 validation clips, a messy train manifest, encoder, tiny T5 in ./t5-small."""
    root = tmp_path_factory.mktemp("project")
    info = tsw.make_demo_data(root, num_train=48, num_val=12, feature_dim=64, t5_folder="t5-small")
    return info


@pytest.fixture
def project(project_template, tmp_path, monkeypatch):
    """A fresh copy of the project, as the current directory (the guide's Colab layout)."""
    root = tmp_path / "How2Sign_SONAR"
    shutil.copytree(project_template["root"], root)
    monkeypatch.chdir(root)
    return root


def torchrun(flags, processes=2):
    """train_sonar_with_t5.py under torchrun (gloo on CPU, one thread a process): the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(ROOT / "train_sonar_with_t5.py"), *flags]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def quick_flags(root, out, *extra):
    """Paths of the project plus settings that make a CPU run take seconds."""
    return ["--sonar_checkpoint", str(root / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
            "--train_features", str(root / "features/train"), "--train_manifest", str(root / "manifests/train.tsv"),
            "--val_features", str(root / "features/val"), "--val_manifest", str(root / "manifests/val.tsv"),
            "--t5_model", str(root / "t5-small"), "--output_dir", str(out), "--num_beams", "1",
            "--max_new_tokens", "24", "--batch_size", "16", "--learning_rate", "1e-3", "--warmup_steps", "2",
            "--device", "cpu", *extra]
