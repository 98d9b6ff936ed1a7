"""Colab disconnects, interrupted saves, bad files and malicious pickles."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SUBPROCESS_ENV, Payload, quick_flags, tsw

SCRIPT = str(ROOT / "train_sonar_with_t5.py")


def read_epochs(path):
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.exists() else []


def test_resume_after_sigkill_trains_each_epoch_once(project):
    out = project / "run"
    command = [sys.executable, SCRIPT, *quick_flags(project, out, "--epochs", "4", "--batch_size", "2")]
    process = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(read_epochs(out / "metrics.jsonl")) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)                                    # into epoch 3
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert read_epochs(out / "metrics.jsonl")[:2] == [1, 2]
    resumed = subprocess.run(command + ["--resume"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout
    assert read_epochs(out / "metrics.jsonl") == [1, 2, 3, 4]
    best = torch.load(out / "best_model.pt")
    assert best["epoch"] in (1, 2, 3, 4) and "model_state_dict" in best
    assert torch.load(out / "last.pt")["train_state"]["epoch"] == 4


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from train_sonar_with_t5 import atomic_torch_save
version = 1
while True:
    atomic_torch_save({{"version": version, "weights": torch.full((4_000_000,), float(version))}}, {path!r})
    version += 1
"""


@pytest.mark.parametrize("delay", [0.4, 0.9, 1.7])
def test_a_kill_during_a_save_leaves_the_previous_file_intact(tmp_path, delay):
    path = tmp_path / "best_model.pt"
    torch.save({"version": 0, "weights": torch.zeros(4_000_000)}, path)
    process = subprocess.Popen([sys.executable, "-c", SAVER.format(root=str(ROOT), path=str(path))],
                               env=SUBPROCESS_ENV)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint = torch.load(path)                      # never a truncated file
    assert torch.equal(checkpoint["weights"], torch.full((4_000_000,), float(checkpoint["version"])))


def test_truncated_and_foreign_files_get_one_line_errors(project, tmp_path, capsys):
    good = project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"
    data = good.read_bytes()
    cases = {
        "truncated.pt": (data[: len(data) // 2], "is truncated"),
        "notes.pt": (b"these are my notes, not a checkpoint", "not a PyTorch checkpoint or truncated"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"model_state_dict": {"classifier.weight": torch.zeros(3, 3)}}, tmp_path / "other_model.pt")
    cases["other_model.pt"] = (None, "no encoder weights found")
    for name, (_, expected) in cases.items():
        flags = quick_flags(project, project / "run", "--epochs", "1")
        flags[flags.index("--sonar_checkpoint") + 1] = str(tmp_path / name)
        assert tsw.main(flags) == 2
        printed = capsys.readouterr().out.strip().splitlines()
        assert len(printed) == 1 and printed[0].startswith(f"error: {tmp_path / name}") and expected in printed[0]


def test_malicious_pickles_never_run(project, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"encoder_state_dict": Payload(marker)}, evil)
    # 1. as the encoder checkpoint
    flags = quick_flags(project, project / "run", "--epochs", "1")
    flags[flags.index("--sonar_checkpoint") + 1] = str(evil)
    assert tsw.main(flags) == 2
    assert "refused to load the encoder checkpoint" in capsys.readouterr().out
    # 2. as a feature file: skipped and listed, training goes on
    torch.save({"features": Payload(marker)}, project / "features/train/demo_train_00003.pt")
    (project / "features/train/demo_train_00003.npy").unlink()
    assert tsw.main(quick_flags(project, project / "run", "--epochs", "1")) == 0
    assert "demo_train_00003\ttrain: unreadable feature file" in (project / "run/skipped_clips.tsv").read_text()
    # 3. as the resume checkpoint
    torch.save({"optimizer_state_dict": Payload(marker)}, project / "run/last.pt")
    assert tsw.main(quick_flags(project, project / "run", "--epochs", "2", "--resume")) == 2
    assert "refused to load the resume checkpoint" in capsys.readouterr().out
    assert not marker.exists(), "a pickled payload ran"


def test_bad_file_in_a_subprocess_prints_no_traceback(project):
    (project / "broken.pt").write_bytes(b"\x80\x04garbage")
    flags = quick_flags(project, project / "run", "--epochs", "1")
    flags[flags.index("--sonar_checkpoint") + 1] = str(project / "broken.pt")
    result = subprocess.run([sys.executable, SCRIPT, *flags], env=SUBPROCESS_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "error: " in result.stdout and "broken.pt" in result.stdout


def test_non_finite_steps_are_skipped_then_stop_the_run(project, monkeypatch, capsys):
    forward = tsw.SONARwithT5.forward

    calls = []

    def nan_forward(self, batch):  # every third training batch is non-finite
        loss, tokens = forward(self, batch)
        calls.append(1)
        return (loss * float("nan") if self.training and len(calls) % 3 == 0 else loss), tokens

    monkeypatch.setattr(tsw.SONARwithT5, "forward", nan_forward)
    assert tsw.main(quick_flags(project, project / "some", "--epochs", "1", "--batch_size", "4")) == 0
    metrics = tsw.read_metrics(project / "some" / "metrics.jsonl")
    assert math.isfinite(metrics[0]["train_loss"])            # skipped steps stay out of the loss log
    assert json.loads((project / "some" / "results.json").read_text())["skipped_steps"] == 4
    capsys.readouterr()

    def always_nan(self, batch):
        loss, tokens = forward(self, batch)
        return loss * float("nan"), tokens

    monkeypatch.setattr(tsw.SONARwithT5, "forward", always_nan)
    code = tsw.main(quick_flags(project, project / "run", "--epochs", "3", "--batch_size", "4",
                                "--max_bad_steps", "3"))
    printed = capsys.readouterr().out
    assert code == 2
    assert "Non-finite loss or gradient at step 1: step skipped." in printed
    assert "Training diverged: 3 steps in a row had a non-finite loss or gradient" in printed
    assert "Traceback" not in printed


def test_resume_mid_epoch_from_a_step_checkpoint(project):
    out = project / "run"
    command = [sys.executable, SCRIPT, *quick_flags(project, out, "--epochs", "2", "--batch_size", "2",
                                                    "--save_every_steps", "3")]
    process = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    state = torch.load(out / "last.pt")["train_state"]
    assert state["epoch"] == 0 and state["batch_in_epoch"] >= 3      # saved inside epoch 1
    resumed = subprocess.run(command + ["--resume"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"{state['batch_in_epoch']} batches into epoch 1" in resumed.stdout
    assert read_epochs(out / "metrics.jsonl") == [1, 2]
