"""torchrun: two CPU processes (gloo) train, evaluate split across processes, and score once."""

import json

import pytest
from torch.utils.data import DataLoader

from conftest import quick_flags, torchrun, tsw


def test_torchrun_two_processes_matches_single_process_evaluation(project):
    out = project / "ddp"
    result = torchrun(quick_flags(project, out, "--epochs", "2"))
    assert "2 process(es), global batch 32" in result.stdout
    assert result.stdout.count("Best epoch") == 1                      # only rank 0 prints
    assert sorted(p.name for p in out.glob("*.pt")) == ["best_model.pt", "last.pt"]
    rows = (out / "best_predictions.tsv").read_text().splitlines()[1:]
    ids = [row.split("\t")[0] for row in rows]
    assert sorted(ids) == [f"demo_val_{i:05d}" for i in range(48, 60)]   # one row per clip, no duplicates
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # The checkpoint loads in a single process (no 'module.' prefix) and scores the same BLEU.
    model = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt")
    dataset = tsw.How2SignDataset(project / "manifests/val.tsv", project / "features/val")
    bleu, _, predictions = tsw.evaluate_model(model, DataLoader(dataset, batch_size=5), "cpu",
                                              {"num_beams": 1, "max_new_tokens": 24})
    results = json.loads((out / "results.json").read_text())
    assert bleu == pytest.approx(results["val_bleu"], abs=1e-6)
    assert [p for _, p in predictions] == [row.split("\t")[2] for row in rows]

    # --resume under torchrun continues the same run.
    result = torchrun(quick_flags(project, out, "--epochs", "3", "--resume"))
    assert "Resumed from" in result.stdout
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
