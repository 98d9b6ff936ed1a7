"""The guide's Cell 4 script, run as the guide runs it: `python test_attention_fix.py` in the project folder."""

import shutil
import subprocess
import sys

from conftest import ROOT, SUBPROCESS_ENV

SCRIPT = str(ROOT / "test_attention_fix.py")


def run(project, *args):
    return subprocess.run([sys.executable, SCRIPT, "--t5_model", "t5-small", *args], cwd=project,
                          env={**SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)


def test_default_bridge_passes_every_check(project):
    result = run(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Probing with 8 clips from manifests/train.tsv and their frames." in result.stdout
    assert "PASS  gradients reach the frame path" in result.stdout
    assert "PASS  gradients reach the frames' cross-attention memory" in result.stdout
    assert result.stdout.count("PASS") == 9 and "FAIL" not in result.stdout


def test_clips_that_are_all_alike_fail_the_across_clips_check(project):
    rows = (project / "manifests/train.tsv").read_text().splitlines()
    ids = [row.split("\t")[0] for row in rows[1:9]]
    alike = project / "alike"
    alike.mkdir()
    for clip in ids:               # eight clips, each a copy of the first (a broken extractor)
        shutil.copy(project / "features/train" / f"{ids[0]}.npy", alike / f"{clip}.npy")
    result = run(project, "--features", "alike")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  bridge outputs differ across clips" in result.stdout
    assert "PASS  bridge outputs differ across query positions" in result.stdout


def test_missing_checkpoint_is_one_line(project):
    result = run(project, "--sonar_checkpoint", "nowhere.pt")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: encoder checkpoint not found: nowhere.pt"
