"""Poses as clips: How2Sign's keypoint folders (one OpenPose JSON per frame) and .pose files train, predict and
check like feature files; their bad inputs are named, never a traceback."""

import importlib.util
import json

import numpy as np
import pytest

from conftest import quick_flags, tsw
from tiny import skeleton_frames, write_openpose_clip, write_pose_file

CSV_HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE\n"


def keypoint_folder(root, split):
    return root / "sentence_level" / split / "rgb_front" / "features" / "openpose_output" / "json"


def pose_clips(project_template, seed=0):
    """{split: [(SENTENCE_NAME, sentence, (T, 137, 3) points)]} of the template's sentences."""
    rng = np.random.default_rng(seed)
    sentences, clips = project_template["sentences"], {}
    for split, indices in (("train", range(0, 48)), ("val", range(48, 60))):
        clips[split] = [(f"vid{i:03d}_{i % 7}-1-rgb_front", sentences[i],
                         skeleton_frames(rng, int(rng.integers(6, 11)), offset=(rng.uniform(400, 900), 300.0)))
                        for i in indices]
    return clips


def write_manifests(root, clips, missing_row=True):
    """How2Sign's realigned CSVs; the training one has a row whose clip folder does not exist (How2Sign's have 118)."""
    for split, rows in clips.items():
        lines = [f"{name[:6]}\t{name[:-10]}\t{name}\t{name}\t0.0\t{len(points) / 24:.2f}\t{text}\n"
                 for name, text, points in rows]
        if missing_row and split == "train":
            lines.append("vid999\tvid999_0-1\tvid999_0-1-rgb_front\tvid999_0-1-rgb_front\t1.0\t2.0\tNo keypoints here.\n")
        (root / f"how2sign_realigned_{split}.csv").write_text(CSV_HEADER + "".join(lines))


@pytest.fixture
def keypoints(project, project_template):
    """How2Sign's keypoint release laid out as unpacked, with what real folders hold: a stray file, a missing frame
    number, a cut JSON file, frames with nobody, a second less confident person, and a validation clip with nobody."""
    clips = pose_clips(project_template)
    rng = np.random.default_rng(1)
    for split, rows in clips.items():
        for k, (name, _, points) in enumerate(rows):
            people = [[frame] for frame in points]
            if split == "train" and k == 1:        # a bystander in every frame, less confident than the signer
                people = [[frame * [1, 1, 0.3], frame] for frame in points]
            if split == "val" and k == 3:          # nobody detected in any frame
                people = [[] for _ in points]
            write_openpose_clip(keypoint_folder(project, split) / name, people)
    first = keypoint_folder(project, "train") / clips["train"][0][0]
    (first / ".DS_Store").write_bytes(b"\0\1")
    frames = sorted(first.glob("*_keypoints.json"))
    frames[2].unlink()                                                    # a frame number missing
    frames[3].write_text(frames[3].read_text()[:40])                     # a file cut short
    frames[4].write_text(json.dumps({"version": 1.3, "people": []}))   # nobody in one frame
    write_manifests(project, clips)
    return clips


def keypoint_flags(root, out, *extra, features=None):
    flags = quick_flags(root, out, "--epochs", "2", *extra)
    flags[flags.index("--sonar_checkpoint") + 1] = "none"
    for split in ("train", "val"):
        flags[flags.index(f"--{split}_features") + 1] = str(features(split) if features else
                                                            root / "sentence_level" / split / "rgb_front" / "features")
        flags[flags.index(f"--{split}_manifest") + 1] = str(root / f"how2sign_realigned_{split}.csv")
    return flags


def tsv_rows(path):
    return [tuple(line.split("\t")) for line in path.read_text().splitlines()[1:]]


def test_how2sign_keypoint_folders_train_predict_and_name_what_they_lack(project, keypoints, tmp_path, capsys):
    out = tmp_path / "run"
    flags = keypoint_flags(project, out)
    assert tsw.main(flags + ["--check"]) == 0
    printed = capsys.readouterr().out
    assert "clips: 48 How2Sign keypoint folders, prepared into 77 points x (x, y)" in printed
    assert f"1 stray files in 1 clips, first {keypoints['train'][0][0]}: .DS_Store: ignored" in printed
    assert "1 missing frame numbers in 1 clips" in printed and "frame 2" in printed
    assert "1 unreadable frame files in 1 clips" in printed and "1 frames with no person in 1 clips" in printed
    assert f"1 no person in any frame: {keypoints['val'][3][0]}" in printed
    assert "1 missing feature file: vid999_0-1-rgb_front" in printed

    assert tsw.main(flags) == 0
    assert "Traceback" not in capsys.readouterr().out
    log = (out / "train.log").read_text()
    assert "train: clips: 48 How2Sign keypoint folders" in log and "frames with no person" in log
    skipped = dict(tsv_rows(out / "skipped_clips.tsv"))
    assert skipped[keypoints["val"][3][0]].startswith("val: no person in any frame")
    best = tsv_rows(out / "best_predictions.tsv")
    assert [clip_id for clip_id, _, _ in best] == [name for k, (name, _, _) in enumerate(keypoints["val"]) if k != 3]

    # --predict from best_model.pt, on the same folder and manifest: the run's predictions exactly
    val_features = project / "sentence_level" / "val" / "rgb_front" / "features"
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features", str(val_features),
                     "--manifest", str(project / "how2sign_realigned_val.csv"), "--device", "cpu"]) == 0
    assert [(i, p) for i, p in tsv_rows(out / "predictions.tsv")] == [(i, p) for i, _, p in best]
    # and on the folder of keypoint clips alone, given directly (openpose_output/json), no manifest
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features",
                     str(keypoint_folder(project, "val")), "--predictions_file", str(tmp_path / "alone.tsv"),
                     "--device", "cpu"]) == 0
    assert dict(tsv_rows(tmp_path / "alone.tsv")) == {i: p for i, _, p in best}


def test_pose_files_train_and_predict_like_feature_files(project, project_template, tmp_path, capsys):
    clips = pose_clips(project_template, seed=2)
    for split, rows in clips.items():
        for k, (name, _, points) in enumerate(rows):
            people = points[:, None] if not (split == "val" and k == 5) else points[:, None][:, :0]   # nobody
            write_pose_file(project / "poses" / split / f"{name}.pose", people)
    cut = project / "poses" / "train" / f"{clips['train'][2][0]}.pose"
    cut.write_bytes(cut.read_bytes()[:300])                               # a file cut short
    (project / "poses" / "train" / "notes.txt").write_text("stray")
    write_manifests(project, clips, missing_row=False)
    out = tmp_path / "run"
    flags = keypoint_flags(project, out, features=lambda split: project / "poses" / split)
    assert tsw.main(flags) == 0
    log = (out / "train.log").read_text()
    assert "train: clips: 47 .pose files, prepared into 77 points x (x, y)" in log
    skipped = dict(tsv_rows(out / "skipped_clips.tsv"))
    assert skipped[clips["val"][5][0]].startswith("val: no person in any frame")
    assert skipped[clips["train"][2][0]].startswith("train: unreadable pose clip")
    best = tsv_rows(out / "best_predictions.tsv")
    assert len(best) == 11
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features", str(project / "poses/val"),
                     "--manifest", str(project / "how2sign_realigned_val.csv"), "--device", "cpu"]) == 0
    assert [(i, p) for i, p in tsv_rows(out / "predictions.tsv")] == [(i, p) for i, _, p in best]
    assert "Traceback" not in capsys.readouterr().out


def test_the_preparation_ignores_where_and_how_large_the_signer_is(project_template):
    """Shoulder-centred and -scaled: the same pose moved and enlarged in the frame gives the same frames; the legs
    are left out; a hand moved as a whole changes only its wrist's values; a point not found is zeros."""
    points = skeleton_frames(np.random.default_rng(3), 5)
    parts = dict(zip([key for key, _ in tsw.OPENPOSE_PARTS], np.split(points, [25, 95, 116], axis=1)))
    frames = tsw.prepare_pose(parts)
    assert frames.shape == (5, 77 * 2)
    moved = {key: value * [1.5, 1.5, 1] + [300, -80, 0] for key, value in parts.items()}
    assert np.allclose(tsw.prepare_pose(moved), frames, atol=1e-4)
    legs = {key: value.copy() for key, value in parts.items()}
    legs["pose_keypoints_2d"][:, 9:15] += 50                               # hips, knees and ankles carry no signing
    assert np.array_equal(tsw.prepare_pose(legs), frames)
    hand = {key: value.copy() for key, value in parts.items()}
    hand["hand_right_keypoints_2d"][:, :, :2] += [40, 25]
    changed = np.abs(tsw.prepare_pose(hand) - frames).reshape(5, 77, 2).max(axis=(0, 2)) > 1e-4
    assert changed.nonzero()[0].tolist() == [77 - 21]                      # the right hand's wrist point only
    lost = {key: value.copy() for key, value in parts.items()}
    lost["hand_left_keypoints_2d"][2, 7] = 0
    prepared = tsw.prepare_pose(lost).reshape(5, 77, 2)
    assert prepared[2, 77 - 42 + 7].tolist() == [0, 0] and prepared[1, 77 - 42 + 7].any()


def test_a_keypoint_folder_is_read_in_frame_order_with_the_most_confident_person(tmp_path):
    rng = np.random.default_rng(4)
    signer, other = skeleton_frames(rng, 12), skeleton_frames(rng, 12)
    other[..., 2] *= 0.2
    folder = tmp_path / "clip_0-1-rgb_front"
    order = [11, 0, 5, 3, 9, 1, 2, 10, 4, 6, 8]                         # written out of order; 7 missing
    write_openpose_clip(folder, [[other[n], signer[n]] for n in order], numbers=order)
    parts, notes = tsw.read_openpose_folder(folder)
    body = parts["pose_keypoints_2d"]
    assert body.shape == (12, 25, 3)
    kept = [n for n in range(12) if n != 7]
    assert np.allclose(body[kept], signer[kept, :25])
    assert not body[7].any() and notes == {"missing frame numbers": [1, "frame 7"]}


def test_bad_pose_inputs_are_one_line(project, project_template, keypoints, tmp_path, capsys, monkeypatch):
    # a sentence encoder trained on other features does not fit poses
    flags = keypoint_flags(project, tmp_path / "run")
    flags[flags.index("--sonar_checkpoint") + 1] = str(project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt")
    assert tsw.main(flags) == 2
    error = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "a sentence encoder trained on other features does not fit poses" in error[0]
    assert "--sonar_checkpoint none" in error[0]
    # .pose files without the pose-format package
    write_pose_file(project / "poses" / "a.pose", keypoints["val"][0][2][:, None])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pose_format" else real(name, *a))
    with pytest.raises(tsw.UserError, match="pip install pose-format"):
        tsw.How2SignDataset(None, project / "poses", require_text=False)


def test_a_killed_build_resumes_and_a_built_store_reads_no_json(project, keypoints, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    folder = keypoint_folder(project, "val")
    paths = sorted(str(path) for path in folder.iterdir())
    done = list(tsw.read_pose_clips(paths[4:9], cache / "poses", workers=1))   # a build killed after 5 clips
    assert len(list((cache / "poses").iterdir())) == 5 and all(error is None for _, _, error in done)
    read = tsw.read_openpose_folder
    opened = []
    monkeypatch.setattr(tsw, "read_openpose_folder", lambda path: opened.append(path) or read(path))
    dataset = tsw.How2SignDataset(None, folder, require_text=False, cache_dir=cache)
    assert sorted(opened) == paths[:4] + paths[9:]                        # the 5 prepared clips were not read again
    assert not (cache / "poses").exists()                                 # every clip is in the store now
    monkeypatch.setattr(tsw, "read_openpose_folder", lambda path: pytest.fail(f"{path} read again"))
    again = tsw.How2SignDataset(None, folder, require_text=False, cache_dir=cache)
    assert again.ids == dataset.ids and np.array_equal(again.frames(0).numpy(), dataset.frames(0).numpy())
    assert again.reading() == dataset.reading()                           # the notes come from the store too


def test_many_clips_are_read_in_processes_as_in_one(tmp_path):
    rng = np.random.default_rng(5)
    paths = []
    for k in range(70):
        folder = tmp_path / "json" / f"clip{k:03d}"
        write_openpose_clip(folder, [[frame] for frame in skeleton_frames(rng, 3)])
        paths.append(str(folder))
    parallel = list(tsw.read_pose_clips(paths, tmp_path / "parts", workers=2))
    single = [tsw.prepared_pose(path) for path in paths]
    assert len(parallel) == 70 and all(np.array_equal(a[0], b[0]) for a, b in zip(parallel, single))
