"""The users' habits: the original module's calls and files, early stopping, paper metrics, MLflow."""

import json
import re

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import quick_flags, tsw


def encoder_path(root):
    return str(root / "checkpoints/sonar_encoder_finetuned/best_encoder.pt")


@pytest.mark.parametrize("freeze", [True, False])
def test_the_users_unfrozen_training_script(project, freeze):
    """Their script: build with freeze_encoder True/False, model(features, texts), gradients reach
    sonar_encoder (when unfrozen) and projection, parameter groups by name, train_epoch and evaluate."""
    model = tsw.SONARwithT5(encoder_path(project), str(project / "t5-small"), freeze_encoder=freeze, device="cpu")
    train = tsw.How2SignDataset(str(project / "features/train"), str(project / "manifests/train.tsv"), max_samples=16)
    val = tsw.How2SignDataset(str(project / "features/val"), str(project / "manifests/val.tsv"), max_samples=6)
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=tsw.collate_fn)
    batch = next(iter(loader))
    assert batch["features"].shape[1] == 300                          # the original collate
    model.train()
    loss = model(batch["features"], batch["texts"])
    loss.backward()
    assert model.projection.weight.grad is not None and model.projection.weight.grad.abs().sum() > 0
    encoder_grads = [p.grad for p in model.sonar_encoder.parameters()]
    if freeze:
        assert all(g is None for g in encoder_grads)
    else:
        assert all(g is not None for g in encoder_grads) and any(g.abs().sum() > 0 for g in encoder_grads)
    model.zero_grad()
    groups = {"encoder": [], "bridge": [], "t5": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "sonar_encoder" in name:
            groups["encoder"].append(parameter)
        elif "projection" in name or "expander" in name or "attention_bridge" in name:
            groups["bridge"].append(parameter)
        elif "t5" in name:
            groups["t5"].append(parameter)
    assert any(p is model.projection.weight for p in groups["bridge"])
    assert any(p is model.expander for p in groups["bridge"])
    assert groups["t5"] and all(any(p is q for q in groups["t5"]) for p in model.t5.parameters())  # all of T5
    assert bool(groups["encoder"]) != freeze
    optimizer = torch.optim.AdamW([{"params": groups["encoder"], "lr": 1e-5}, {"params": groups["bridge"], "lr": 1e-3},
                                   {"params": groups["t5"], "lr": 1e-4}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = model.projection.weight.detach().clone()
    mean_loss = tsw.train_epoch(model, loader, optimizer, scheduler, 1, "cpu")
    assert isinstance(mean_loss, float) and 0 < mean_loss < 20
    assert not torch.equal(before, model.projection.weight)            # the optimizer moved it
    bleu, predictions, references = tsw.evaluate(model, DataLoader(val, batch_size=4, collate_fn=tsw.collate_fn), "cpu")
    assert isinstance(bleu, float) and len(predictions) == len(references) == 6
    assert references == val.texts and all(isinstance(p, str) for p in predictions)


def test_original_outputs_max_samples_and_paper_metrics(project, tmp_path):
    out = tmp_path / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "2", "--max_samples", "10")) == 0
    log = (out / "train.log").read_text()
    assert "train: 10 clips" in log and "val: 10 clips" in log
    training_log = json.loads((out / "training_log.json").read_text())
    metrics = tsw.read_jsonl(out / "metrics.jsonl")
    assert training_log == [{"epoch": m["epoch"], "train_loss": m["train_loss"], "val_bleu": m["val_bleu"]}
                            for m in metrics] and len(training_log) == 2
    rows = [line.split("\t") for line in (out / "best_predictions.tsv").read_text().splitlines()[1:]]
    text = (out / "best_predictions.txt").read_text()
    assert text == "".join(f"GT: {reference}\nPred: {prediction}\n\n" for _, reference, prediction in rows)
    results = json.loads((out / "results.json").read_text())
    assert all(isinstance(results[f"val_bleu_{n}"], float) for n in range(1, 5))
    assert results["val_bleu_1"] >= results["val_bleu_2"] >= results["val_bleu_3"]
    assert 0 <= results["val_rouge_l"] <= 100 and results["val_chrf"] >= 0
    assert "rougeL" in results["rouge_signature"]
    assert all(f"val_bleu_{n}" in metrics[-1] for n in range(1, 5)) and "val_rouge_l" in metrics[-1]
    assert re.search(r"BLEU [\d.]+ \(BLEU-1\.\.4 [\d.]+ / [\d.]+ / [\d.]+ / [\d.]+\) \| chrF [\d.]+ \| ROUGE-L", log)


def test_rouge_l_is_the_libraries_lcs_f1():
    assert tsw.rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    # LCS "the cat the mat"... of 4 words in 6 and 5: P = 4/6, R = 4/5, F = 2PR/(P+R)
    score = tsw.rouge_l(["the cat sat on the mat"], ["the cat lay the mat"])
    assert score == pytest.approx(100 * 2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))


def test_patience_stops_and_resume_continues_the_count(project, tmp_path, capsys, monkeypatch):
    """BLEU per evaluation scripted 5, 7, 6, 6, 6, ...: the best is epoch 2; --patience 2 stops after
    epoch 4, and --resume with --patience 3 trains one more epoch (the count goes on from 2), then stops."""
    real, calls = tsw.score_predictions, []

    def scripted(predictions):
        calls.append(1)
        return {**real(predictions), "bleu": [5.0, 7.0][len(calls) - 1] if len(calls) <= 2 else 6.0}

    monkeypatch.setattr(tsw, "score_predictions", scripted)
    out = tmp_path / "run"
    flags = quick_flags(project, out, "--epochs", "8", "--patience", "2", "--max_samples", "8")
    assert tsw.main(flags) == 0
    metrics = tsw.read_jsonl(out / "metrics.jsonl")
    assert [m["val_bleu"] for m in metrics] == [5.0, 7.0, 6.0, 6.0]
    printed = capsys.readouterr().out
    assert "Early stopping after epoch 4: validation bleu has not improved for 2 evaluations (--patience 2); " \
           "best epoch 2." in printed
    assert torch.load(out / "best_model.pt")["epoch"] == 2
    assert json.loads((out / "results.json").read_text())["best_epoch"] == 2
    assert torch.load(out / "last.pt")["train_state"]["stale_evals"] == 2
    flags[flags.index("--patience") + 1] = "3"
    assert tsw.main(flags + ["--resume"]) == 0
    assert [m["epoch"] for m in tsw.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert "has not improved for 3 evaluations (--patience 3)" in capsys.readouterr().out


def test_mlflow_run_has_params_metrics_per_epoch_and_artifacts(project, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is in tests/requirements.txt; installed by .ci/run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")   # MLflow 3's default store
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "how2sign-tests")
    out = tmp_path / "tracked"
    assert tsw.main(quick_flags(project, out, "--epochs", "2", "--max_samples", "8", "--report_to", "mlflow")) == 0
    run_id = json.loads((out / "tracking_ids.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "how2sign-tests"
    assert run.data.params["epochs"] == "2" and run.data.params["max_samples"] == "8"
    assert [m.step for m in client.get_metric_history(run_id, "val_bleu")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "val_rouge_l")] == [1, 2]
    results = json.loads((out / "results.json").read_text())
    assert run.data.metrics["best_val_bleu"] == pytest.approx(results["val_bleu"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"results.json", "best_predictions.tsv", "metrics.jsonl"} <= artifacts
    # --resume continues the same MLflow run
    assert tsw.main(quick_flags(project, out, "--epochs", "3", "--max_samples", "8", "--report_to", "mlflow",
                                "--resume")) == 0
    assert [m.step for m in client.get_metric_history(run_id, "val_bleu")] == [1, 2, 3]


def test_a_tracker_that_is_not_installed_is_one_line(project, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tsw, "REPORT_PACKAGES", {**tsw.REPORT_PACKAGES, "mlflow": ("no_such_module_here", "mlflow")})
    code = tsw.main(quick_flags(project, tmp_path / "w", "--epochs", "1", "--report_to", "mlflow"))
    assert code == 2
    assert "--report_to mlflow needs the mlflow package: pip install mlflow" in capsys.readouterr().out
    assert not (tmp_path / "w" / "last.pt").exists()
