"""End to end: the guide's Cell 5 command line and Cell 7 snippet, --check, --predict, outputs, cache."""

import json
import re
import shlex
import shutil

import pytest
import torch

from conftest import CELL5, ROOT, quick_flags, tsw

GUIDE_COPY = ROOT / "tests" / "guide_cells.md"                   # in the repository: a clone needs nothing else
GUIDE = ROOT.parent / "shared" / "seed" / "colab-training-guide-attention-bridge.md"   # beside CI's checkout


def guide_cell(number, text=None):
    """A Colab cell's code, verbatim (from the repository's copy of the guide's cells unless `text` is given)."""
    text = GUIDE_COPY.read_text() if text is None else text
    return re.search(rf"### Cell {number}:[^\n]*\s+```python\n(.*?)```", text, re.S).group(1)


def cell_command(number):
    """The `!python train_sonar_with_t5.py ...` flags of a cell, continuation lines joined."""
    command = [line for line in guide_cell(number).replace("\\\n", " ").splitlines() if line.startswith("!")]
    words = shlex.split(command[0][1:])
    assert words[:2] == ["python", "train_sonar_with_t5.py"]
    return words[2:]


CELL7 = guide_cell(7)


def test_cell_copies_are_the_guides_text():
    if not GUIDE.is_file():
        pytest.skip(f"the user's guide is not beside this clone ({GUIDE}); the tests use {GUIDE_COPY}")
    for number in range(3, 9):
        assert guide_cell(number) == guide_cell(number, GUIDE.read_text()), f"Cell {number} differs from the guide"


def test_cell5_flags_are_the_ones_the_tests_run():
    assert cell_command(5) == CELL5


def rewrite_encoder(root, form):
    path = root / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"
    state = {k[len("encoder."):]: v for k, v in torch.load(path)["encoder_state_dict"].items()}
    torch.save({"bare": state, "encoder_state_dict": {"encoder_state_dict": state},
                "model_state_dict": {"model_state_dict": state, "epoch": 4},
                "prefixed": {f"encoder.{k}": v for k, v in state.items()}}[form], path)


def best_epoch(metrics):
    """The epoch the trainer must have kept: the first with the highest BLEU (a tie is no improvement)."""
    return next(m["epoch"] for m in metrics if m["val_bleu"] == max(r["val_bleu"] for r in metrics))


@pytest.mark.parametrize("form", ["bare", "encoder_state_dict", "model_state_dict", "prefixed"])
def test_cell5_command_line(project, form):
    rewrite_encoder(project, form)
    assert tsw.main(CELL5) == 0
    out = project / "checkpoints/sonar_t5_attention_test"
    log = (out / "train.log").read_text()
    assert "CUDA is not available on this machine: running on CPU instead." in log
    assert "sacreBLEU nrefs:1|case:mixed|eff:no|tok:13a" in log
    assert re.search(r"epoch 2/2: val loss [\d.]+ \| BLEU [\d.]+ \(BLEU-1\.\.4 [\d./ ]+\) \| chrF [\d.]+ \| ROUGE-L [\d.]+", log)
    assert len(re.findall(r"\s\d\. \[demo_val_\d+\] reference: ", log)) == 10   # 5 samples x 2 epochs
    assert "diagnostics: encoder cosine" in log

    checkpoint = torch.load(out / "best_model.pt")             # plain torch.load: weights only
    assert {"model_state_dict", "epoch", "val_bleu", "args"} <= set(checkpoint)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert checkpoint["args"]["epochs"] == 2 and checkpoint["epoch"] == best_epoch(metrics)
    for m in metrics:
        assert {"train_loss", "val_loss", "val_bleu", "val_chrf", "seconds", "distinct_share",
                "encoder_cosine", "bridge_spread_clips", "bridge_spread_positions"} <= set(m)
    rows = (out / "best_predictions.tsv").read_text().splitlines()
    assert rows[0] == "id\treference\tprediction"
    assert sorted(r.split("\t")[0] for r in rows[1:]) == [f"demo_val_{i:05d}" for i in range(48, 60)]
    skipped = (out / "skipped_clips.tsv").read_text()
    assert "demo_missing_clip\ttrain: missing feature file" in skipped
    assert "<line 50>\ttrain: empty id in manifest" in skipped


def test_cell6_then_cell7_snippet_reproduces_the_predictions(project, capsys):
    """Cell 6's command line (made to learn in seconds), then Cell 7 verbatim: the same predictions."""
    cell6 = cell_command(6)
    assert tsw.main(cell6 + ["--epochs", "12", "--learning_rate", "2e-3", "--warmup_steps", "5",
                             "--batch_size", "8"]) == 0
    out = project / "checkpoints/sonar_t5_attention_final"
    metrics = tsw.read_jsonl(out / "metrics.jsonl")
    assert metrics[-1]["val_loss"] < 0.8 * metrics[0]["val_loss"]               # it has learned something
    rows = [line.split("\t") for line in (out / "best_predictions.tsv").read_text().splitlines()[1:]]
    assert len({prediction for _, _, prediction in rows}) >= 3
    capsys.readouterr()
    namespace = {}
    exec(compile(CELL7, "cell7", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.count("Ground Truth:") == 5 and printed.count("Prediction:") == 5
    assert namespace["predictions"] == [(reference, prediction) for _, reference, prediction in rows]
    results = json.loads((out / "results.json").read_text())
    assert namespace["bleu"] == pytest.approx(results["val_bleu"], abs=1e-9)
    assert float(re.search(r"BLEU: ([\d.]+)%", printed).group(1)) == pytest.approx(results["val_bleu"], abs=0.01)


def test_check_reports_each_problem_and_exits(project, capsys):
    with open(project / "manifests/train.tsv", "a") as handle:
        handle.write("demo_train_00001\t1.0\tA different sentence for the same id.\n")
    (project / "features/val/demo_val_00050.npy").write_bytes(b"broken")
    assert tsw.main(["--check", "--t5_model", "t5-small"]) == 0      # the guide's default paths
    report = capsys.readouterr().out
    assert "ok  encoder checkpoint" in report and "(layers 64 -> 512 -> 512 -> 1024)" in report
    assert "train: 51 manifest rows -> 47 usable clips (feature dims: 64-d x47" in report
    assert "1 empty id in manifest" in report and "1 missing feature file: demo_missing_clip" in report
    assert "2 id shared by 2 different texts: demo_train_00001\n" in report
    assert "1 unreadable feature file: demo_val_00050" in report
    assert "All checks passed" in report
    shutil.rmtree(project / "features/val")
    assert tsw.main(["--check"]) == 1
    assert "ERR val: features folder not found: features/val" in capsys.readouterr().out


def test_bad_flags_are_reported_together_before_any_work(project, capsys):
    code = tsw.main(["--batch_size", "0", "--num_queries", "0", "--num_heads", "0", "--train_features", "nowhere",
                     "--label_smoothing", "1.5", "--output_dir", "out"])
    assert code == 2
    printed = capsys.readouterr().out
    for text in ("--batch_size must be at least 1", "--num_queries must be at least 1", "--num_heads must be at least 1",
                 "--train_features folder not found: nowhere", "--label_smoothing must be in [0, 1)"):
        assert text in printed
    assert "Traceback" not in printed and not (project / "out" / "best_model.pt").exists()


@pytest.fixture(scope="module")
def trained(project_template, tmp_path_factory):
    """One short run shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("trained") / "project"
    shutil.copytree(project_template["root"], root)
    out = root / "run"
    assert tsw.main(quick_flags(root, out, "--epochs", "2", "--label_smoothing", "0")) == 0
    return root, out


def test_outputs_results_plot_and_export(trained):
    from transformers import AutoTokenizer, T5ForConditionalGeneration
    root, out = trained
    results = json.loads((out / "results.json").read_text())
    assert {"best_epoch", "val_bleu_1", "val_bleu_2", "val_bleu_3", "val_bleu_4", "val_chrf", "signature",
            "distinct_share", "val_bleu"} <= set(results)
    assert results["val_bleu_1"] >= results["val_bleu_4"] == pytest.approx(results["val_bleu"])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    exported = T5ForConditionalGeneration.from_pretrained(out / "t5_export")
    AutoTokenizer.from_pretrained(out / "t5_export")
    state = torch.load(out / "best_model.pt")["model_state_dict"]
    assert torch.equal(exported.state_dict()["shared.weight"], state["decoder.t5.shared.weight"])


def test_predict_needs_only_the_checkpoint_and_reproduces_evaluation(trained, tmp_path):
    root, out = trained
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)                 # a laptop: no training flags, no original T5 folder
    hidden = root / "t5-small-hidden"
    (root / "t5-small").rename(hidden)
    try:
        code = tsw.main(["--predict", "--checkpoint", str(moved / "best_model.pt"), "--features",
                         str(root / "features/val"), "--manifest", str(root / "manifests/val.tsv"),
                         "--device", "cpu"])
    finally:
        hidden.rename(root / "t5-small")
    assert code == 0
    predicted = dict(line.split("\t") for line in (moved / "predictions.tsv").read_text().splitlines()[1:])
    evaluated = {r.split("\t")[0]: r.split("\t")[2] for r in (out / "best_predictions.tsv").read_text().splitlines()[1:]}
    assert predicted == evaluated


def test_resume_with_other_architecture_flags_is_refused(trained, capsys):
    root, out = trained
    code = tsw.main(quick_flags(root, out, "--epochs", "3", "--resume", "--memory_tokens", "4"))
    assert code == 2
    assert "cannot resume from" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_frozen_encoder_runs_once_per_clip_across_epochs(project, monkeypatch):
    rows = []
    forward = tsw.SentenceEncoder.forward
    monkeypatch.setattr(tsw.SentenceEncoder, "forward", lambda self, x: rows.append(len(x)) or forward(self, x))
    assert tsw.main(quick_flags(project, project / "run", "--epochs", "2")) == 0
    assert sum(rows) == 48 + 12           # every train and val clip once, not once per step or epoch


def test_cached_and_uncached_batches_give_the_same_loss(project_template):
    from transformers import AutoTokenizer, T5ForConditionalGeneration
    dataset = tsw.How2SignDataset(project_template["root"] / "manifests/train.tsv",
                                  project_template["root"] / "features/train")
    for frozen in (True, False):
        torch.manual_seed(0)
        model = tsw.SONARwithT5(project_template["encoder"], freeze_encoder=frozen,
                                decoder=T5ForConditionalGeneration.from_pretrained(project_template["t5"]),
                                tokenizer=AutoTokenizer.from_pretrained(project_template["t5"])).eval()
        dataset.tokenize(model.tokenizer, 32)
        dataset.sentence_embeddings = None
        uncached = model(tsw.collate_clips([dataset[i] for i in range(8)]))[0]
        dataset.sentence_embeddings = tsw.encode_dataset(model, dataset)
        cached = model(tsw.collate_clips([dataset[i] for i in range(8)]))[0]
        assert torch.allclose(cached, uncached, atol=1e-5)


def test_default_model_trains_and_predicts_from_frames(project):
    out = project / "frames"
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--eval_batch_size", "5")) == 0
    model = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt")
    encoder = model.bridge.frame_encoder
    assert encoder.stride == tsw.ModelConfig.frame_stride > 1
    assert encoder.frame_projection.in_features == 64 * tsw.ModelConfig.frame_kernel   # a window of frames
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features",
                     str(project / "features/val"), "--device", "cpu"]) == 0
    predicted = dict(line.split("\t") for line in (out / "predictions.tsv").read_text().splitlines()[1:])
    evaluated = {r.split("\t")[0]: r.split("\t")[2] for r in (out / "best_predictions.tsv").read_text().splitlines()[1:]}
    assert predicted == evaluated                       # same frames, same decoding, no manifest needed


def test_unfrozen_encoder_trains_at_a_lower_rate(project):
    out = project / "unfrozen"
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--no-freeze_encoder")) == 0
    state = torch.load(out / "best_model.pt")["model_state_dict"]
    original = torch.load(project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt")["encoder_state_dict"]
    changed = state["sonar_encoder.projection.0.weight"] - original["encoder.projection.0.weight"]
    assert changed.abs().max() > 0                                  # the encoder learned
    last = torch.load(out / "last.pt")["optimizer_state_dict"]["param_groups"]
    # encoder at learning_rate x 0.1, T5 at learning_rate, the bridge at its own default rate
    assert sorted(group["initial_lr"] for group in last) == pytest.approx([1e-4, 1e-3, tsw.DEFAULT_BRIDGE_LR])
