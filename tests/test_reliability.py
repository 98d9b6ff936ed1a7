"""Colab disconnects, interrupted saves, bad files and malicious pickles."""

import json
import math
import shutil
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


RUN_FLAGS = ("--epochs", "3", "--batch_size", "2", "--save_every_steps", "5")


def run_command(root, out):
    return [sys.executable, SCRIPT, *quick_flags(root, out, *RUN_FLAGS)]


@pytest.fixture(scope="module")
def uninterrupted(project_template, tmp_path_factory):
    """The reference: the same command as the killed runs below, never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted") / "project"
    shutil.copytree(project_template["root"], root)
    result = subprocess.run(run_command(root, root / "run"), env=SUBPROCESS_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root / "run"


def kill_when(command, ready, timeout=240):
    process = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def assert_same_run(out, reference):
    """A resumed run ends exactly where the uninterrupted one does: metrics and weights."""
    ours, theirs = tsw.read_jsonl(out / "metrics.jsonl"), tsw.read_jsonl(reference / "metrics.jsonl")
    assert [m["epoch"] for m in ours] == [m["epoch"] for m in theirs] == [1, 2, 3]
    for mine, reference_epoch in zip(ours, theirs):
        for key in ("train_loss", "val_loss", "val_bleu"):
            assert mine[key] == pytest.approx(reference_epoch[key], rel=1e-6, abs=1e-9), (key, mine["epoch"])
    best, expected = torch.load(out / "best_model.pt"), torch.load(reference / "best_model.pt")
    assert best["epoch"] == expected["epoch"]
    for name, tensor in expected["model_state_dict"].items():
        if torch.is_tensor(tensor):   # (not the configuration: the decoder's folder differs between the projects)
            assert torch.allclose(best["model_state_dict"][name], tensor, atol=1e-6), name


def test_resume_after_sigkill_matches_an_uninterrupted_run(project, uninterrupted):
    out = project / "run"
    command = run_command(project, out)
    kill_when(command, lambda: len(read_epochs(out / "metrics.jsonl")) >= 2)     # during epoch 3
    assert read_epochs(out / "metrics.jsonl") == [1, 2]
    resumed = subprocess.run(command + ["--resume"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout
    assert_same_run(out, uninterrupted)
    assert torch.load(out / "last.pt")["train_state"]["epoch"] == 3


def test_resume_mid_epoch_matches_an_uninterrupted_run(project, uninterrupted):
    out = project / "run"
    command = run_command(project, out)
    kill_when(command, lambda: (out / "last.pt").exists())                     # the first step checkpoint
    state = torch.load(out / "last.pt")["train_state"]
    assert state["epoch"] == 0 and state["batch_in_epoch"] == 5                 # saved inside epoch 1
    resumed = subprocess.run(command + ["--resume"], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "5 batches into epoch 1" in resumed.stdout
    assert_same_run(out, uninterrupted)


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from train_sonar_with_t5 import atomic_torch_save
version = 1
while True:
    atomic_torch_save({{"version": version, "weights": torch.full((4_000_000,), float(version))}}, {path!r})
    version += 1
"""


def test_a_kill_during_a_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "best_model.pt"
    torch.save({"version": 0, "weights": torch.zeros(4_000_000)}, path)
    in_progress = lambda: list(tmp_path.glob(".best_model.pt.*.tmp"))          # noqa: E731
    for _ in range(20):      # until a kill lands while a save is being written
        kill_when([sys.executable, "-c", SAVER.format(root=str(ROOT), path=str(path))], in_progress, timeout=60)
        if in_progress():
            break
    assert in_progress(), "no kill landed during a save"
    checkpoint = torch.load(path)                      # never a truncated file
    assert torch.equal(checkpoint["weights"], torch.full((4_000_000,), float(checkpoint["version"])))
    tsw.atomic_torch_save({"version": -1}, path)       # the next save clears what the killed one left
    assert not in_progress() and torch.load(path)["version"] == -1


def test_truncated_and_foreign_files_get_one_line_errors(project, tmp_path, capsys):
    good = project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"
    data = good.read_bytes()
    cases = {
        "truncated.pt": (data[: len(data) // 2], "is truncated"),
        "notes.pt": (b"these are my notes, not a checkpoint", "is not a PyTorch checkpoint (saved with torch.save)"),
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
    forward = tsw.SONARwithT5.loss

    calls = []

    def nan_forward(self, batch, *args):  # every third training batch is non-finite
        loss, tokens = forward(self, batch, *args)
        calls.append(1)
        return (loss * float("nan") if self.training and len(calls) % 3 == 0 else loss), tokens

    monkeypatch.setattr(tsw.SONARwithT5, "loss", nan_forward)
    assert tsw.main(quick_flags(project, project / "some", "--epochs", "1", "--batch_size", "4")) == 0
    metrics = tsw.read_jsonl(project / "some" / "metrics.jsonl")
    assert math.isfinite(metrics[0]["train_loss"])            # skipped steps stay out of the loss log
    assert json.loads((project / "some" / "results.json").read_text())["skipped_steps"] == 4
    capsys.readouterr()

    def always_nan(self, batch, *args):
        loss, tokens = forward(self, batch, *args)
        return loss * float("nan"), tokens

    monkeypatch.setattr(tsw.SONARwithT5, "loss", always_nan)
    code = tsw.main(quick_flags(project, project / "run", "--epochs", "3", "--batch_size", "4",
                                "--max_bad_steps", "3"))
    printed = capsys.readouterr().out
    assert code == 2
    assert "Non-finite loss or gradient at step 1: step skipped." in printed
    assert "Training diverged: 3 steps in a row had a non-finite loss or gradient" in printed
    assert "Traceback" not in printed
