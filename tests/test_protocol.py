"""Results that can be compared: a test split, data fingerprints, --compare, --sweep, repetition and length,
and the early-stopping and tracking habits that must hold."""

import csv
import json
import shutil
import warnings

import pytest
import torch

from conftest import quick_flags, tsw


def read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_manifest(path, rows):
    path.write_text("id\tduration\ttext\n" + "".join(f"{r['id']}\t1.0\t{r['text']}\n" for r in rows))


@pytest.fixture(scope="module")
def with_test_split(project_template, tmp_path_factory):
    """One run whose test split is its validation manifest (the case to warn about), kept for the tests below."""
    root = tmp_path_factory.mktemp("protocol") / "project"
    shutil.copytree(project_template["root"], root)
    out = root / "run"
    import io
    import contextlib
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert tsw.main(quick_flags(root, out, "--epochs", "2", "--test_manifest", str(root / "manifests/val.tsv"),
                                    "--test_features", str(root / "features/val"))) == 0
    return root, out, printed.getvalue()


def test_a_test_split_is_scored_once_and_never_picks_the_model(with_test_split):
    root, out, printed = with_test_split
    results = json.loads((out / "results.json").read_text())
    for split in ("val", "test"):
        assert {f"{split}_{k}" for k in ("bleu", "bleu_1", "bleu_4", "chrf", "rouge_l", "repeat_4gram_share",
                                         "length_ratio")} <= set(results)
    assert results["test_clips"] == 12 and results["test_bleu"] == pytest.approx(results["val_bleu"])  # same clips
    rows = read_tsv(out / "test_predictions.tsv")
    assert len(rows) == 12 and rows == read_tsv(out / "best_predictions.tsv")
    metrics = (out / "metrics.jsonl").read_text()
    assert "test" not in metrics and len(metrics.splitlines()) == 2               # no per-epoch record of it
    assert "test: 12 of its 12 clips are validation clips too (the same manifest)" in printed
    fingerprints = results["data_fingerprints"]
    assert fingerprints["val"] == fingerprints["test"] != fingerprints["train"] and len(fingerprints["val"]) == 64
    assert f"val {fingerprints['val'][:12]}" in printed


def test_a_held_out_test_split_gets_no_warning_and_its_own_fingerprint(project, tmp_path, capsys):
    rows = read_tsv(project / "manifests/train.tsv")[:6]
    write_manifest(tmp_path / "test.tsv", rows)
    out = tmp_path / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--test_manifest", str(tmp_path / "test.tsv"),
                                "--test_features", str(project / "features/train"))) == 0
    assert "validation clips too" not in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["test_clips"] == 6 and len(read_tsv(out / "test_predictions.tsv")) == 6
    assert len({results["data_fingerprints"][split] for split in ("train", "val", "test")}) == 3


def test_fingerprints_follow_the_split_as_used(project):
    full = tsw.How2SignDataset(project / "manifests/val.tsv", project / "features/val")
    again = tsw.How2SignDataset(project / "manifests/val.tsv", project / "features/val")
    fewer = tsw.How2SignDataset(project / "manifests/val.tsv", project / "features/val", max_samples=11)
    assert full.fingerprint() == again.fingerprint() != fewer.fingerprint()
    full.texts[0] = full.texts[0] + " (edited)"
    assert full.fingerprint() != again.fingerprint()


def test_compare_finds_a_worse_copy_and_refuses_other_data(with_test_split, tmp_path, capsys):
    """A copy of a run whose predictions are one constant sentence: lower BLEU, p < 0.05, every CI holds
    its BLEU; a run on other data is refused unless --compare_any_data; runs that differ only in --seed
    are summarised as a group."""
    _, trained, _ = with_test_split
    run, copy = tmp_path / "run", tmp_path / "constant"

    def with_predictions(folder, predict):      # the tiny test model scores ~0: give the run a real BLEU
        shutil.copytree(trained, folder)
        rows = read_tsv(folder / "best_predictions.tsv")
        (folder / "best_predictions.tsv").write_text("id\treference\tprediction\n" + "".join(
            f"{r['id']}\t{r['reference']}\t{predict(r['reference'])}\n" for r in rows))

    with_predictions(run, lambda reference: " ".join(reference.split()[:-1]))     # the last word missing
    with_predictions(copy, lambda reference: "The paper is here.")
    reseeded = tmp_path / "seed7"
    shutil.copytree(run, reseeded)
    results = json.loads((reseeded / "results.json").read_text())
    results["args"]["seed"] = 7
    (reseeded / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    assert tsw.main(["--compare", str(run), str(copy), str(reseeded), "--compare_json", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    records = json.loads((tmp_path / "c.json").read_text())
    assert [r["run"] for r in records] == [str(run), str(copy), str(reseeded)]
    assert {"run", "bleu", "bleu_ci_low", "bleu_ci_high", "chrf", "rouge_l", "p_value"} <= set(records[0])
    assert records[0]["p_value"] is None and records[1]["p_value"] < 0.05 and records[1]["bleu"] < records[0]["bleu"]
    assert records[2]["bleu"] == records[0]["bleu"]                         # the same predictions
    assert all(r["bleu_ci_low"] <= r["bleu"] <= r["bleu_ci_high"] for r in records)
    assert records[0]["bleu"] > 40 and records[0]["bleu"] == pytest.approx(tsw.corpus_scores(
        [r["prediction"] for r in read_tsv(run / "best_predictions.tsv")],
        [r["reference"] for r in read_tsv(run / "best_predictions.tsv")])["bleu"])
    assert "seeds 42, 42, 7 of the same flags" in printed and "BLEU signature: nrefs:1" in printed
    results = json.loads((copy / "results.json").read_text())
    results["data_fingerprints"]["val"] = "0" * 64
    (copy / "results.json").write_text(json.dumps(results))
    assert tsw.main(["--compare", str(run), str(copy)]) == 2
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "other val data" in line[0] and "--compare_any_data" in line[0]
    assert tsw.main(["--compare", str(run), str(copy), "--compare_any_data"]) == 0
    assert "| NO |" in capsys.readouterr().out
    assert tsw.main(["--compare", str(run), str(copy), "--compare_split", "test", "--compare_any_data"]) == 0


def test_sweep_decodes_every_setting_with_one_encoding_per_batch(with_test_split, monkeypatch):
    root, run, _ = with_test_split
    encodings, generations = [], []
    memory, generate = tsw.SONARwithT5.decoder_memory, tsw.DecoderAdapter.generate
    monkeypatch.setattr(tsw.SONARwithT5, "decoder_memory", lambda self, batch: encodings.append(1) or memory(self, batch))
    monkeypatch.setattr(tsw.DecoderAdapter, "generate",
                        lambda self, *a, **k: generations.append(k) or generate(self, *a, **k))
    assert tsw.main(["--predict", "--checkpoint", str(run / "best_model.pt"), "--features", str(root / "features/val"),
                     "--manifest", str(root / "manifests/val.tsv"), "--device", "cpu", "--eval_batch_size", "8",
                     "--sweep", "num_beams=1,2 no_repeat_ngram_size=0,3"]) == 0
    assert len(encodings) == 2 and len(generations) == 8                  # 2 batches, 4 settings each
    rows = json.loads((run / "sweep.json").read_text())
    assert len(rows) == 4 and [r["bleu"] for r in rows] == sorted((r["bleu"] for r in rows), reverse=True)
    trained = next(r for r in rows if r["settings"] == {"num_beams": 1, "no_repeat_ngram_size": 0})
    assert trained["bleu"] == pytest.approx(json.loads((run / "results.json").read_text())["val_bleu"])
    assert {"chrf", "repeat_4gram_share", "length_ratio"} <= set(trained)


def test_a_bad_sweep_is_one_line(with_test_split, capsys):
    root, run, _ = with_test_split
    assert tsw.main(["--predict", "--checkpoint", str(run / "best_model.pt"), "--features", str(root / "features/val"),
                     "--manifest", str(root / "manifests/val.tsv"), "--sweep", "temperature=0.5,1"]) == 2
    assert "--sweep: 'temperature=0.5,1' is not SETTING=V1,V2" in capsys.readouterr().out


def test_repetition_and_length_ratio():
    assert tsw.repeats_a_4gram("cut the paper cut the paper cut the paper")
    assert not tsw.repeats_a_4gram("cut the paper and fold the paper twice")
    scores = tsw.corpus_scores(["a b c d a b c d", "the cat sat"], ["a b c d", "the cat sat on the mat"])
    assert scores["repeat_4gram_share"] == 0.5 and scores["length_ratio"] == pytest.approx(11 / 10)


def scripted_bleu(monkeypatch, values):
    real, calls = tsw.score_predictions, []

    def scripted(predictions):
        calls.append(1)
        return {**real(predictions), "bleu": values[min(len(calls), len(values)) - 1]}

    monkeypatch.setattr(tsw, "score_predictions", scripted)


@pytest.mark.parametrize("values,threshold", [([5.0], "0"), ([5.0, 5.5, 5.9, 6.3], "1")])
def test_ties_and_gains_within_the_threshold_are_no_improvement(project, tmp_path, capsys, monkeypatch, values,
                                                                  threshold):
    """A flat BLEU (or one gaining less than --early_stopping_threshold) stops training, whatever the loss does."""
    scripted_bleu(monkeypatch, values)
    out = tmp_path / "run"
    flags = quick_flags(project, out, "--epochs", "8", "--patience", "2", "--max_samples", "8",
                        "--early_stopping_threshold", threshold)
    assert tsw.main(flags) == 0
    assert [m["epoch"] for m in tsw.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert torch.load(out / "best_model.pt")["epoch"] == 1
    assert "Early stopping after epoch 3" in capsys.readouterr().out
    # resuming the stopped run trains nothing and says so in one line
    assert tsw.main(flags + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "This run stopped early after epoch 3" in printed and "raise --patience above 2".lower() in printed.lower()
    assert [m["epoch"] for m in tsw.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_a_tracking_uri_that_mlflow_refuses_is_one_line_before_training(project, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is in tests/requirements.txt; installed by .ci/run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")   # what MLflow 3 keeps in maintenance
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--report_to", "mlflow")) == 2
    printed = capsys.readouterr().out
    errors = [line for line in printed.splitlines() if "refuses the tracking URI" in line]
    assert len(errors) == 1 and f"file:{tmp_path / 'mlruns'}" in errors[0] and "sqlite:///mlflow.db" in errors[0]
    assert "Traceback" not in printed and not (out / "last.pt").exists()


def test_beam_search_warns_of_no_deprecated_keyword(with_test_split):
    root, run, _ = with_test_split
    model = tsw.SONARwithT5.from_checkpoint(run / "best_model.pt").eval()
    dataset = tsw.How2SignDataset(root / "manifests/val.tsv", root / "features/val")
    batch = tsw.collate_clips([dataset[i] for i in range(3)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(model.generate(batch, num_beams=4, max_new_tokens=8)) == 3
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def predict(checkpoint, root, split, *flags):
    assert tsw.main(["--predict", "--checkpoint", str(checkpoint), "--features", str(root / f"features/{split}"),
                     "--manifest", str(root / f"manifests/{split}.tsv"), "--device", "cpu", *flags]) == 0
    return {row["id"]: row["prediction"] for row in read_tsv(checkpoint.parent / "predictions.tsv")}


def test_decoding_chosen_on_validation_is_what_the_test_split_and_predict_use(project, tmp_path, capsys):
    held_out = read_tsv(project / "manifests/train.tsv")[:8]
    write_manifest(project / "manifests/test.tsv", held_out)
    out = tmp_path / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "2", "--test_manifest", str(project / "manifests/test.tsv"),
                                "--test_features", str(project / "features/train"),
                                "--decoding_grid", "no_repeat_ngram_size=0,1 repetition_penalty=1.0,1.3")) == 0
    results = json.loads((out / "results.json").read_text())
    tuning = results["decoding_tuning"]
    best = max(tuning["settings"], key=lambda row: (row["val_repeat_4gram_share"] <= tsw.LOOP_SHARE, row["val_bleu"]))
    assert len(tuning["settings"]) == 4 and tuning["chosen"] == {k: best[k] for k in ("no_repeat_ngram_size", "repetition_penalty")}
    assert results["val_bleu"] == pytest.approx(best["val_bleu"])
    assert {k: results["decoding"][k] for k in tuning["chosen"]} == tuning["chosen"]
    printed = capsys.readouterr().out
    assert "Decoding chosen on the 12 validation clips" in printed and "the test split and --predict decode with it" in printed
    # --predict decodes as chosen: it reproduces best_predictions.tsv and test_predictions.tsv exactly
    (project / "features/test").symlink_to(project / "features/train")
    best_rows = {row["id"]: row["prediction"] for row in read_tsv(out / "best_predictions.tsv")}
    test_rows = {row["id"]: row["prediction"] for row in read_tsv(out / "test_predictions.tsv")}
    assert predict(out / "best_model.pt", project, "val") == best_rows
    assert predict(out / "best_model.pt", project, "test") == test_rows and len(test_rows) == 8
    # ... and the other setting of the grid decodes otherwise, so the equalities above could fail
    other = 1 - tuning["chosen"]["no_repeat_ngram_size"]
    assert predict(out / "best_model.pt", project, "test", "--no_repeat_ngram_size", str(other),
                   "--repetition_penalty", str(tuning["chosen"]["repetition_penalty"])) != test_rows


@pytest.mark.parametrize("guarded_loops", [False, True])
def test_the_decoding_chosen_on_validation_loops_only_when_every_setting_does(project, tmp_path, monkeypatch, guarded_loops):
    """The setting without the repetition guard scores the higher validation BLEU but loops in half the clips: the
    guarded one is chosen, unless it loops too (then the higher BLEU is)."""
    sweep_rows = tsw.sweep_rows

    def scored(*args, **kwargs):
        rows = sweep_rows(*args, **kwargs)
        for row in rows:
            guarded = row["settings"]["no_repeat_ngram_size"] == 3
            row["scores"] = {**row["scores"], "bleu": 10.0 if guarded else 20.0,
                             "repeat_4gram_share": 0.5 if guarded_loops or not guarded else 0.05}
        return rows

    monkeypatch.setattr(tsw, "sweep_rows", scored)
    out = tmp_path / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--decoding_grid", "no_repeat_ngram_size=0,3")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["decoding_tuning"]["chosen"] == {"no_repeat_ngram_size": 0 if guarded_loops else 3}
    assert results["val_bleu"] == (20.0 if guarded_loops else 10.0)


def test_a_decoding_setting_typed_on_the_command_line_is_not_tuned(project, tmp_path):
    out = tmp_path / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--no_repeat_ngram_size", "2",
                                "--decoding_grid", "no_repeat_ngram_size=0,1")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["decoding_tuning"] is None and results["decoding"]["no_repeat_ngram_size"] == 2
    assert tsw.main(quick_flags(project, tmp_path / "bad", "--decoding_grid", "beams=1,2")) == 2


@pytest.mark.parametrize("loops", [True, False])
def test_the_log_names_decoding_loops(project, tmp_path, monkeypatch, loops):
    """Predictions that repeat a 4-gram in more than a tenth of the clips are named at that evaluation; a run whose
    decoding cannot repeat a 4-gram (--no_repeat_ngram_size 4) is not warned."""
    if loops:   # a decoder stuck in a loop on every clip, as undertrained ones are
        generate = tsw.SONARwithT5.generate
        monkeypatch.setattr(tsw.SONARwithT5, "generate", lambda self, batch, **kwargs: [
            f"{sentence} want to want to want to" for sentence in generate(self, batch, **kwargs)])
    out = tmp_path / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--decoding_grid", "none",
                                *([] if loops else ["--no_repeat_ngram_size", "4"]))) == 0
    log = (out / "train.log").read_text()
    share = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["val_repeat_4gram_share"]
    assert (share == 1.0) if loops else (share == 0.0)
    assert ("100% of the predictions repeat a 4-gram (decoding loops, e.g." in log) == loops
    assert ("repeat a 4-gram (decoding loops" in log) == loops
