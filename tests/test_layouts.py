"""The public releases' layouts, read as they are: Tarrés et al. 2023 (fairseq TSV, one .npy per sentence),
SSVP-SLT's extracted features (a tree of .pt files, a headerless manifest), pickles refused, and How2Sign's
realigned times that run past a video's end."""

import csv
import shutil

import numpy as np
import torch

from conftest import Payload, quick_flags, tsw

TARRES_HEADER = ("id\tsigns_file\tsigns_offset\tsigns_length\tsigns_type\tsigns_lang\ttranslation\ttranslation_lang\t"
                 "glosses\ttopic\tsigner_id")


def read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def clips_of(project, split):
    """(id, frames, text) of the project's clips of a split, in manifest order."""
    rows = [r for r in read_tsv(project / f"manifests/{split}.tsv") if r["id"] and r["id"] != "demo_missing_clip"]
    return [(r["id"], np.load(project / f"features/{split}/{r['id']}.npy"), r["text"]) for r in rows]


def tarres_layout(project, root):
    """<split>/<SENTENCE_NAME>.npy and cvpr23.fairseq.i3d.<split>.how2sign.tsv, signs_file the authors' paths."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        lines = [TARRES_HEADER]
        for n, (clip_id, frames, text) in enumerate(clips_of(project, split)):
            name = f"{clip_id}-{n}-rgb_front"
            np.save(root / split / f"{name}.npy", frames)
            lines.append(f"{name}\t/mnt/gpid08/users/authors/i3d/{split}/{name}.npy\t0\t{len(frames)}\ti3d\tasl\t"
                         f"{text}\ten\t\tcooking\t1")
        (root / f"cvpr23.fairseq.i3d.{split}.how2sign.tsv").write_text("\n".join(lines) + "\n")


def ssvp_layout(project, root):
    """features/<epoch>/<video_name[:5]>/<name>.pt (bare tensors) for every split, and <split>_features.tsv."""
    for split in ("train", "val"):
        lines = []
        for clip_id, frames, text in clips_of(project, split):
            folder = root / "features" / "epoch_10" / clip_id[:5]
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(frames), folder / f"{clip_id}.pt")
            lines.append(f"{clip_id}.mp4\t{len(frames)}\t{text}")
        (root / "manifests").mkdir(exist_ok=True)
        (root / "manifests" / f"{split}_features.tsv").write_text("\n".join(lines) + "\n")


def layout_flags(project, out, train_features, train_manifest, val_features, val_manifest, *extra):
    flags = quick_flags(project, out, "--epochs", "2", *extra)
    for name, value in (("--train_features", train_features), ("--train_manifest", train_manifest),
                        ("--val_features", val_features), ("--val_manifest", val_manifest)):
        flags[flags.index(name) + 1] = str(value)
    return flags


def test_tarres_layout_trains_on_frames_alone_checks_and_predicts_as_trained(project, tmp_path, capsys):
    root = tmp_path / "tarres"
    tarres_layout(project, root)
    flags = layout_flags(project, tmp_path / "run", root / "train", root / "cvpr23.fairseq.i3d.train.how2sign.tsv",
                         root / "val", root / "cvpr23.fairseq.i3d.val.how2sign.tsv", "--sonar_checkpoint", "none")
    assert tsw.main(flags + ["--check"]) == 0
    printed = capsys.readouterr().out
    assert "read as Tarrés et al. 2023's fairseq TSV" in printed and "signs_file (the authors' cluster paths) is not read" in printed
    assert "train: 48 manifest rows -> 48 usable clips" in printed and "val: 12 manifest rows -> 12 usable clips" in printed
    assert tsw.main(flags) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "val: read as Tarrés et al. 2023's fairseq TSV" in log and "No sentence encoder" in log
    best = read_tsv(tmp_path / "run" / "best_predictions.tsv")
    assert len(best) == 12 and all(r["id"].endswith("-rgb_front") for r in best)
    assert tsw.main(["--predict", "--checkpoint", str(tmp_path / "run" / "best_model.pt"), "--features", str(root / "val"),
                     "--manifest", str(root / "cvpr23.fairseq.i3d.val.how2sign.tsv"), "--device", "cpu"]) == 0
    assert [(r["id"], r["prediction"]) for r in read_tsv(tmp_path / "run" / "predictions.tsv")] == \
           [(r["id"], r["prediction"]) for r in best]


def test_ssvp_layout_is_found_in_its_tree_and_trains(project, tmp_path, capsys):
    root = tmp_path / "ssvp"
    ssvp_layout(project, root)
    features = root / "features" / "epoch_10"
    flags = layout_flags(project, tmp_path / "run", features, root / "manifests/train_features.tsv", features,
                         root / "manifests/val_features.tsv")
    assert tsw.main(flags + ["--check"]) == 0
    printed = capsys.readouterr().out
    assert "read as SSVP-SLT's features manifest (headerless: video_name, length, label)" in printed
    assert "train: 48 manifest rows -> 48 usable clips" in printed
    assert tsw.main(flags) == 0
    best = read_tsv(tmp_path / "run" / "best_predictions.tsv")
    assert sorted(r["id"] for r in best) == sorted(clip_id for clip_id, _, _ in clips_of(project, "val"))
    assert tsw.main(["--predict", "--checkpoint", str(tmp_path / "run" / "best_model.pt"), "--features", str(features),
                     "--device", "cpu"]) == 0                      # no manifest: every clip of the tree (train and val)
    assert len(read_tsv(tmp_path / "run" / "predictions.tsv")) == 60
    shutil.copytree(features, root / "features" / "epoch_20")     # two extractions below the folder given
    assert tsw.main(layout_flags(project, tmp_path / "run2", root / "features", root / "manifests/train_features.tsv",
                                 root / "features", root / "manifests/val_features.tsv")) == 2
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "is in two folders" in line[0] and "<root>/<epoch>" in line[0]


def test_pickle_clips_and_manifests_are_refused_without_running_them(project, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "pose"
    folder.mkdir()
    import pickle
    for clip_id, _, _ in clips_of(project, "val"):
        (folder / f"{clip_id}.pkl").write_bytes(pickle.dumps(Payload(marker)))
    def error_with(flag, path):        # the one error line of a run given this file or folder, no traceback
        flags = quick_flags(project, tmp_path / "run", "--epochs", "1")
        flags[flags.index(flag) + 1] = str(path)
        assert tsw.main(flags) == 2
        printed = capsys.readouterr().out
        errors = [line for line in printed.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in printed and not marker.exists(), printed[-800:]
        return errors[0]

    line = error_with("--val_features", folder)
    assert ".pkl: this clip is a Python pickle, which can run code" in line and "np.save" in line
    spamo = tmp_path / "train_info_ml.npy"
    np.save(spamo, np.array([{"fileid": "x", "text": "y", "payload": Payload(marker)}], dtype=object), allow_pickle=True)
    assert "train_info_ml.npy: this manifest is a Python pickle" in error_with("--train_manifest", spamo)

def test_realigned_times_past_a_videos_end_are_cut_and_counted(project, tmp_path, capsys):
    """How2Sign's own data issue: a realigned END past the video's last feature frame is clamped to the file's
    end (counted in the log); a span that starts past it holds nothing and is named in skipped_clips.tsv."""
    import tiny
    root = tmp_path / "videos"
    tiny.make_video_project(root, num_train=30, num_val=15, feature_dim=64, t5_folder=None)
    csv_path = root / "manifests/how2sign_realigned_val.csv"
    rows = list(csv.DictReader(csv_path.open(), delimiter="\t"))
    frames = len(np.load(root / "features/val" / f"{rows[0]['VIDEO_NAME']}.npy"))
    last = max(rows, key=lambda r: float(r["END_REALIGNED"]))
    last["END_REALIGNED"] = f"{frames / tsw.DEMO_FPS + 4.77:.2f}"                   # past the end
    rows.append({**last, "SENTENCE_NAME": "beyond-rgb_front", "START_REALIGNED": f"{frames / tsw.DEMO_FPS + 1:.2f}",
                 "END_REALIGNED": f"{frames / tsw.DEMO_FPS + 3:.2f}"})             # wholly past the end
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    dataset = tsw.How2SignDataset(csv_path, root / "features/val", feature_fps=tsw.DEMO_FPS)
    assert dataset.clamped == 1 and len(dataset) == 15
    assert any("1 spans end past their video's features" in line for line in dataset.reading())
    assert [clip_id for clip_id, _ in dataset.skipped] == ["beyond-rgb_front"]
    assert dataset.skipped[0][1].startswith("span past the end of the file")
    i = dataset.ids.index(last["SENTENCE_NAME"])
    assert dataset.first_frames[i] + int(dataset.lengths[i]) == frames                 # cut at the file's end
