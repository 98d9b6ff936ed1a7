"""--init_from: a second stage (pretrain on one set, fine-tune on another) starts from a trained model."""

import csv
import json

import torch

from conftest import quick_flags, tsw


def half_manifests(project, tmp_path):
    """The training manifest's usable rows cut in two halves (the first for stage 1, the second for stage 2)."""
    with open(project / "manifests/train.tsv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle, delimiter="\t") if r["id"] and r["id"] != "demo_missing_clip"]
    paths = []
    for name, part in (("first", rows[:24]), ("second", rows[24:])):
        path = tmp_path / f"{name}.tsv"
        path.write_text("id\tduration\ttext\n" + "".join(f"{r['id']}\t{r['duration']}\t{r['text']}\n" for r in part))
        paths.append(path)
    return paths


def with_manifest(flags, manifest):
    flags = list(flags)
    flags[flags.index("--train_manifest") + 1] = str(manifest)
    return flags


def test_a_second_stage_starts_where_the_first_ended(project, tmp_path, capsys):
    first, second = half_manifests(project, tmp_path)
    assert tsw.main(with_manifest(quick_flags(project, tmp_path / "stage1", "--epochs", "6", "--num_heads", "4"),
                                  first)) == 0
    stage1 = tmp_path / "stage1" / "best_model.pt"
    fresh = tmp_path / "fresh"
    assert tsw.main(with_manifest(quick_flags(project, fresh, "--epochs", "1"), second)) == 0
    tuned = tmp_path / "tuned"
    assert tsw.main(with_manifest(quick_flags(project, tuned, "--epochs", "1", "--init_from", str(stage1)), second)) == 0
    assert "--init_from" in (tuned / "train.log").read_text() and "epoch 1 of a new run" in (tuned / "train.log").read_text()
    first_fresh, first_tuned = (tsw.read_jsonl(run / "metrics.jsonl")[0] for run in (fresh, tuned))
    assert first_tuned["epoch"] == 1 and first_tuned["val_loss"] < first_fresh["val_loss"]
    model = tsw.SONARwithT5.from_checkpoint(tuned / "best_model.pt")
    assert model.config.num_heads == 4                                  # the model's shape came from stage 1
    assert json.loads((tuned / "results.json").read_text())["args"]["init_from"] == str(stage1)
    capsys.readouterr()
    # a typed flag that contradicts the checkpoint, a file that is no checkpoint, and --resume with it: one line each
    for extra, text in ((["--init_from", str(stage1), "--num_heads", "8"], "it was trained with --num_heads 4 (now 8)"),
                        (["--init_from", str(project / "manifests/val.tsv")], "the --init_from checkpoint is not a PyTorch checkpoint"),
                        (["--init_from", str(stage1), "--resume"], "--resume and --init_from")):
        assert tsw.main(with_manifest(quick_flags(project, tmp_path / "bad", "--epochs", "1", *extra), second)) == 2
        printed = capsys.readouterr().out
        errors = [line for line in printed.splitlines() if line.startswith("error:") or line.startswith("  --")]
        assert any(text in line for line in errors) and "Traceback" not in printed, printed[-800:]
    assert not (tmp_path / "bad" / "best_model.pt").exists()
    state = torch.load(stage1)
    assert state["model_state_dict"]["_extra_state"]["config"]["num_heads"] == 4
