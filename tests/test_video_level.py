"""The users' real manifests list videos: diagnosis, the stop before training, and --feature_fps spans."""

import csv

import numpy as np
import pytest
import torch

import tiny
from conftest import quick_flags, tsw

FPS = tsw.DEMO_FPS


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same 61 training / 15 validation sentences twice: one file per sentence, and one file per
    video of 15 sentences (the last training video holds one) with the users' TSV and How2Sign's CSV."""
    root = tmp_path_factory.mktemp("layouts")
    clips = tsw.make_demo_data(root / "clips", num_train=61, num_val=15, feature_dim=32, t5_folder="t5-small",
                               messy=False)
    videos = tiny.make_video_project(root / "videos", num_train=61, num_val=15, feature_dim=32, t5_folder="t5-small")
    return clips["root"], videos["root"]


def official_rows(root, split):
    with open(root / "manifests" / f"how2sign_realigned_{split}.csv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_official_csv_spans_cut_exactly_the_sentences_frames(layouts):
    clips_root, videos_root = layouts
    per_sentence = tsw.How2SignDataset(clips_root / "manifests/train.tsv", clips_root / "features/train")
    spans = tsw.How2SignDataset(videos_root / "manifests/how2sign_realigned_train.csv",
                                videos_root / "features/train", feature_fps=FPS)
    rows = official_rows(videos_root, "train")
    assert len(spans) == len(rows) == 61 and not spans.skipped          # every sentence used
    assert sorted(spans.ids) == sorted(r["SENTENCE_NAME"] for r in rows)  # How2Sign's own ids, unique
    by_text = {text: i for i, text in enumerate(per_sentence.texts)}
    for i, text in enumerate(spans.texts):
        j = by_text[text]
        assert int(spans.lengths[i]) == int(per_sentence.lengths[j])
        assert torch.allclose(spans.clip_means[i], per_sentence.clip_means[j], atol=1e-5)
    assert "START_REALIGNED" not in spans.span_reading and "start/end" in spans.span_reading


def test_users_tsv_spans_end_where_the_next_sentence_starts(layouts):
    _, videos_root = layouts
    dataset = tsw.How2SignDataset(videos_root / "manifests/train.tsv", videos_root / "features/train",
                                  feature_fps=FPS)
    rows = official_rows(videos_root, "train")
    assert len(dataset) == 61 and not dataset.skipped and len(set(dataset.ids)) == 61
    assert "'duration' is each sentence's start second" in dataset.span_reading
    files = {r["VIDEO_NAME"]: np.load(videos_root / "features/train" / f"{r['VIDEO_NAME']}.npy") for r in rows}
    for video, frames in files.items():
        starts = sorted(round(float(r["START_REALIGNED"]) * FPS) for r in rows if r["VIDEO_NAME"] == video)
        ends = starts[1:] + [len(frames)]                            # the last one runs to the end of the file
        for start, end in zip(starts, ends):
            i = dataset.ids.index(f"{video}@{start / FPS:.2f}s")
            assert (dataset.first_frames[i], int(dataset.lengths[i])) == (start, end - start)
            assert torch.allclose(dataset.clip_means[i], torch.from_numpy(frames[start:end].mean(0)), atol=1e-5)
    # every file read once, not once per sentence; and with the frame store built above, not at all
    reads = []
    original = tsw.load_clip_features
    try:
        tsw.load_clip_features = lambda path: reads.append(path) or original(path)
        tsw.How2SignDataset(videos_root / "manifests/train.tsv", videos_root / "features/train", feature_fps=FPS,
                            cache_dir=videos_root / "another_store")
        assert len(reads) == len(files) == 5
        again = tsw.How2SignDataset(videos_root / "manifests/train.tsv", videos_root / "features/train",
                                    feature_fps=FPS, cache_dir=videos_root / "another_store")
        assert len(reads) == 5 and again.ids == dataset.ids
    finally:
        tsw.load_clip_features = original


def test_without_feature_fps_check_names_the_cause(layouts, capsys, monkeypatch):
    _, videos_root = layouts
    monkeypatch.chdir(videos_root)
    assert tsw.main(["--check", "--t5_model", "t5-small"]) == 1
    report = capsys.readouterr().out
    assert "ERR train: 61 manifest rows -> 1 usable clips" in report
    assert "lists VIDEOS, not sentences: 60 of 61 rows share their id" in report
    assert "looks like start times" in report and "--feature_fps FPS" in report and "SENTENCE_NAME" in report
    assert "ERR val: no usable clips" in report and "Fix the problems above" in report
    assert tsw.main(["--check", "--t5_model", "t5-small", "--feature_fps", str(FPS)]) == 0
    report = capsys.readouterr().out
    assert "ok  train: 61 manifest rows -> 61 usable clips" in report and "All checks passed" in report


def test_training_on_a_video_level_manifest_stops_before_the_first_step(layouts, tmp_path, capsys):
    _, root = layouts
    flags = quick_flags(root, tmp_path / "run", "--epochs", "1")
    assert tsw.main(flags) == 2
    printed = capsys.readouterr().out
    assert "error: train: 61 manifest rows -> only 1 usable clips (98% lost, more than --max_skip_share 0.5)" in printed
    assert "lists VIDEOS" in printed and "--feature_fps FPS" in printed and "--max_skip_share 1" in printed
    assert not (tmp_path / "run" / "last.pt").exists() and "Training 1 epochs" not in printed
    # a user who means it trains on the one usable clip of train (val has none, so it still stops)
    assert tsw.main(flags + ["--max_skip_share", "1"]) == 2
    assert "val: no usable clips" in capsys.readouterr().out


def test_training_predicting_and_frames_on_spans(layouts, tmp_path, capsys):
    _, root = layouts
    out = tmp_path / "spans"
    flags = quick_flags(root, out, "--epochs", "2", "--feature_fps", str(FPS))
    assert tsw.main(flags) == 0
    predictions = (out / "best_predictions.tsv").read_text().splitlines()[1:]
    assert len(predictions) == 15 and all("@" in row.split("\t")[0] for row in predictions)
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features",
                     str(root / "features/val"), "--manifest", str(root / "manifests/val.tsv"),
                     "--feature_fps", str(FPS), "--device", "cpu"]) == 0
    predicted = dict(line.split("\t") for line in (out / "predictions.tsv").read_text().splitlines()[1:])
    assert predicted == {row.split("\t")[0]: row.split("\t")[2] for row in predictions}
    # --resume keeps reading spans the same way, and refuses another --feature_fps
    assert tsw.main(flags[:flags.index("--epochs")] + ["--epochs", "3"] + flags[flags.index("--epochs") + 2:]
                    + ["--resume"]) == 0
    assert [m["epoch"] for m in tsw.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert tsw.main(flags + ["--resume", "--feature_fps", "25"]) == 2
    printed = capsys.readouterr().out
    assert "cannot resume from" in printed and "--feature_fps 8.0 (now 25.0)" in printed


def test_bad_spans_are_skipped_with_their_reasons(layouts, tmp_path):
    _, root = layouts
    video = "demo_val_video000"
    seconds = len(np.load(root / "features/val" / f"{video}.npy")) / FPS
    (tmp_path / "spans.tsv").write_text(
        "id\tvideo\tstart\tend\ttext\n"
        f"good\t{video}\t0.0\t2.0\tA good span.\n"
        f"reversed\t{video}\t3.0\t1.0\tEnds before it starts.\n"
        f"empty\t{video}\t2.0\t2.0\tLasts no time.\n"
        f"late\t{video}\t{seconds + 5:.2f}\t{seconds + 9:.2f}\tAfter the end of the video.\n"
        f"nostart\t{video}\t\t2.0\tNo start.\n"
        f"missing\tno_such_video\t0.0\t1.0\tNo file.\n")
    dataset = tsw.How2SignDataset(tmp_path / "spans.tsv", root / "features/val", feature_fps=FPS)
    assert dataset.ids == ["good"] and int(dataset.lengths[0]) == 2 * FPS
    reasons = dict(dataset.skipped)
    assert reasons["reversed"] == "reversed span (start 3.00 s, end 1.00 s)"
    assert reasons["empty"].startswith("empty span (2.00-2.00 s")
    assert reasons["late"].startswith(f"span past the end of the file (starts at {seconds + 5:.2f} s")
    assert reasons["nostart"] == "no start time in manifest"
    assert reasons["missing"].startswith("missing feature file")
