"""Pose preparation: which keypoints, normalised how, a missing point as what, measured on pose-shaped clips.

    python bench/poses.py                                  # every candidate, seeds 1 and 2 (random decoder)
    python bench/poses.py --rows mask,raw --seeds 1
    python bench/poses.py --rows openpose --seeds 1        # the tool reading How2Sign-shaped JSON folders itself

Data (built once under --out, then reused):
  sentences  bench/quality.py's (the Vim user manual; 2,100 train / 250 validation), one sign per word in English
             order, as there: what is screened here is the reading of poses, not sign language's grammar.
  skeletons  OpenPose's 137 points (BODY_25, 70 face, 21 per hand) in pixels, as How2Sign's keypoint release has
             them. Each word's sign: the dominant hand moves between two places of the signing space with its own
             handshape (five finger curls, a spread and a turning palm), the other hand joins in two signs of five
             (mirrored or holding a place), the mouth opens and the brows rise with some signs; 0.3-0.7 s a sign at
             15 frames/s, blended into its neighbours, the clip beginning and ending at rest. 12 signers: size and
             place in the frame (1280x720 or 1920x1080), speed, their own way of placing and shaping the signs. What
             a detector gives: jitter, confidences, hands lost for a few frames (more often near the face), hips
             half seen and legs out of frame, frames with nobody, and in a tenth of the clips a second, partly seen
             person beside the signer.
  decoders   bench/quality.py's tiny T5 (random, or pretrained on Python's docstrings), built there when missing.

Rows (candidates; each written as .npy clips beside the data, then trained as a user would, frames alone:
--sonar_checkpoint none, 30 epochs, batch 32, LR 1e-3, warm-up 100, as bench/quality.py's random_lr1e-3):
  raw            every point, x / frame width, y / frame height, confidence (the pixels as they come)
  points         the signing points (upper body, 23 face points, hands), shoulder-centred and -scaled, confidence
  confidence     `points` with each hand's points relative to its wrist
  mask           `confidence` with a 0/1 channel (the point was found) in place of the confidence
  no_confidence  `confidence` with no third channel: a missing point is zeros only
  <candidate>_pretrained   the same with the pretrained decoder
  openpose       the tool itself on How2Sign-shaped keypoint folders (one JSON per frame, stray files, missing
                 frame numbers): train_sonar_with_t5.prepare_pose is one of the candidates, so the same scores
Prints a table of validation BLEU (as trained and with the decoding chosen on validation), then one JSON line.
"""

import json
import os
import re
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import quality  # noqa: E402
import train_sonar_with_t5 as tsw  # noqa: E402

FPS = 15
SIGNERS = 12
SCHEDULE = quality.HIGH_LR
CANDIDATES = ("raw", "points", "confidence", "mask", "no_confidence")
ROWS = {**{name: (name, "t5-random") for name in CANDIDATES},
        **{f"{name}_pretrained": (name, "t5-pretrained") for name in CANDIDATES}, "openpose": ("openpose", "t5-random")}
OPENPOSE_POINTS = 137


# ----------------------------------------------------------------------------------------------
# A body in "shoulder widths" (origin between the shoulders, y down), then in pixels


def face_template():
    """70 points of OpenPose's face (68 landmarks and 2 pupils) around the nose tip, in shoulder widths."""
    face = np.zeros((70, 2))
    jaw = np.linspace(np.pi * 0.95, np.pi * 0.05, 17)
    face[0:17] = np.stack([0.22 * np.cos(jaw), 0.28 * np.sin(jaw) - 0.05], 1)
    face[17:22] = np.stack([np.linspace(-0.2, -0.05, 5), -0.2 - 0.03 * np.sin(np.linspace(0, np.pi, 5))], 1)
    face[22:27] = face[17:22][::-1] * [-1, 1]
    face[27:31] = np.stack([np.zeros(4), np.linspace(-0.15, 0.0, 4)], 1)
    face[31:36] = np.stack([np.linspace(-0.05, 0.05, 5), np.full(5, 0.02)], 1)
    eye = np.linspace(0, 2 * np.pi, 7)[:-1]
    face[36:42] = np.stack([-0.11 + 0.05 * np.cos(eye), -0.12 + 0.02 * np.sin(eye)], 1)
    face[42:48] = face[36:42] * [-1, 1]
    lips = np.linspace(0, 2 * np.pi, 13)[:-1]
    face[48:60] = np.stack([0.09 * np.cos(lips + np.pi), 0.12 + 0.03 * np.sin(lips)], 1)
    inner = np.linspace(0, 2 * np.pi, 9)[:-1]
    face[60:68] = np.stack([0.06 * np.cos(inner + np.pi), 0.12 + 0.015 * np.sin(inner)], 1)
    face[68], face[69] = face[36:42].mean(0), face[42:48].mean(0)
    return face


FACE = face_template()
LOWER_LIP = [i for i in range(48, 68) if FACE[i, 1] > 0.121]


def hand_points(wrist, curls, spread, angle, size):
    """21 OpenPose hand points: the wrist, then thumb, index, middle, ring and little finger (4 joints each)."""
    points = [wrist]
    for finger in range(5):
        direction = angle + (finger - 2) * spread * (1.6 if finger == 0 else 1.0)
        base = wrist + size * 0.45 * np.array([np.cos(direction), np.sin(direction)])
        points.append(base)
        for joint in range(3):
            direction += curls[finger] * 1.1
            base = base + size * (0.22 - 0.04 * joint) * np.array([np.cos(direction), np.sin(direction)])
            points.append(base)
    return np.array(points)


def word_sign(word):
    """A word's sign, the same for every clip: places, handshape, motion of both hands, mouth and brows."""
    rng = np.random.default_rng(zlib.crc32(word.encode()))
    place = lambda: np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 1.1)])   # noqa: E731
    return {"start": place(), "end": place(), "curls": rng.uniform(0, 1.2, 5), "spread": rng.uniform(0.1, 0.35),
            "angle": rng.uniform(-2.6, -0.5), "turn": rng.uniform(-0.8, 0.8), "two_hands": rng.random() < 0.4,
            "mirror": rng.random() < 0.5, "other": place(), "other_curls": rng.uniform(0, 1.2, 5),
            "mouth": rng.uniform(0, 1) * (rng.random() < 0.5), "brows": float(rng.random() < 0.25)}


def signer_style(signer):
    rng = np.random.default_rng(1000 + signer)
    width, height = (1920, 1080) if signer % 4 == 3 else (1280, 720)
    return {"size": (width, height), "scale": rng.uniform(170, 260) * width / 1280,
            "origin": np.array([width / 2 + rng.uniform(-90, 90), height * rng.uniform(0.36, 0.46)]),
            "speed": rng.uniform(0.8, 1.25), "shift": rng.normal(0, 0.08, 2), "curl_bias": rng.normal(0, 0.12, 5),
            "hand": rng.uniform(0.36, 0.46)}


def body_track(words, style, rng):
    """Per frame: both wrists, both hands' 21 points, mouth opening and brow raise, in shoulder widths."""
    rest_r, rest_l = np.array([-0.45, 1.35]), np.array([0.45, 1.35])
    keys = [(rest_r, rest_l, np.full(5, 0.6), np.full(5, 0.6), 0.2, -1.6, 0.0, 0.0, 6)]   # at rest
    for word in words:
        sign = word_sign(word)
        frames = max(3, round(rng.uniform(0.3, 0.7) * FPS / style["speed"]))
        curls = np.clip(sign["curls"] + style["curl_bias"], 0, 1.4)
        other = (sign["start"] * [-1, 1] if sign["mirror"] else sign["other"]) if sign["two_hands"] else rest_l
        other_curls = curls if sign["mirror"] else sign["other_curls"]
        for part, place in ((0, sign["start"]), (1, sign["end"])):
            keys.append((place + style["shift"], other + style["shift"] * sign["two_hands"], curls, other_curls,
                         sign["spread"], sign["angle"] + part * sign["turn"], sign["mouth"] * (part == 1),
                         sign["brows"], max(2, frames // 2)))
    keys.append((rest_r, rest_l, np.full(5, 0.6), np.full(5, 0.6), 0.2, -1.6, 0.0, 0.0, 6))
    steps = []
    for (a, b) in zip(keys, keys[1:]):
        for t in np.linspace(0, 1, b[-1], endpoint=False):
            s = t * t * (3 - 2 * t)                                  # eased motion between two key poses
            steps.append([x * (1 - s) + y * s for x, y in zip(a[:-1], b[:-1])])
    track = {name: np.array([step[i] for step in steps]) for i, name in enumerate(
        ("right", "left", "curls", "other_curls", "spread", "angle", "mouth", "brows"))}
    kernel = np.array([0.25, 0.5, 0.25])                             # co-articulation: neighbours blend
    for name in ("right", "left", "mouth", "brows"):
        values = track[name]
        padded = np.concatenate([values[:1], values, values[-1:]])
        track[name] = sum(k * padded[i: i + len(values)] for i, k in enumerate(kernel))
    return track


def skeleton_clip(words, signer, rng):
    """(T, 137, 3) OpenPose points in pixels with confidences, as a detector gives them (0, 0, 0: not found)."""
    style = signer_style(signer)
    track = body_track(words, style, rng)
    frames = len(track["right"])
    body = np.zeros((frames, 25, 2))
    nod = 0.03 * np.sin(np.arange(frames) / 3.0)[:, None]
    head = np.array([0.0, -0.75]) + np.concatenate([np.zeros((frames, 1)), nod], 1)
    body[:, 0] = head
    body[:, 1] = [0, 0]
    body[:, 2], body[:, 5] = [-0.5, 0], [0.5, 0]
    for wrist, shoulder, elbow, side in ((track["right"], 2, 3, -1), (track["left"], 5, 6, 1)):
        body[:, elbow] = (body[:, shoulder] + wrist) / 2 + [side * 0.18, 0.12]
        body[:, elbow + 1] = wrist
    body[:, 8], body[:, 9], body[:, 12] = [0, 1.9], [-0.3, 1.9], [0.3, 1.9]
    body[:, 10], body[:, 13], body[:, 11], body[:, 14] = [-0.3, 2.8], [0.3, 2.8], [-0.3, 3.6], [0.3, 3.6]
    body[:, 15], body[:, 16] = head + [-0.1, -0.1], head + [0.1, -0.1]
    body[:, 17], body[:, 18] = head + [-0.22, -0.05], head + [0.22, -0.05]
    body[:, 19:25] = [[-0.3, 3.7], [-0.2, 3.7], [-0.3, 3.65], [0.3, 3.7], [0.2, 3.7], [0.3, 3.65]]
    face = FACE[None] + head[:, None]
    face[:, LOWER_LIP, 1] += 0.05 * track["mouth"][:, None]
    face[:, 17:27, 1] -= 0.04 * track["brows"][:, None]
    # OpenPose's hand_left is the person's left hand, on the image's right: its palm turns the mirrored way
    hands = [np.stack([hand_points(w, c, s, np.pi - a if mirrored else a, style["hand"]) for w, c, s, a in zip(
        track[wrist], track[curls], track["spread"], track["angle"])]) for wrist, curls, mirrored in
        (("left", "other_curls", True), ("right", "curls", False))]
    units = np.concatenate([body, face, hands[0], hands[1]], axis=1)          # (T, 137, 2)
    units += rng.normal(0, 0.01, units.shape) + np.concatenate(
        [np.zeros((frames, 95, 2)), rng.normal(0, 0.006, (frames, 42, 2))], 1)
    pixels = units * style["scale"] + style["origin"]
    confidence = np.concatenate([rng.uniform(0.65, 0.95, (frames, 25)), rng.uniform(0.55, 0.9, (frames, 70)),
                                 rng.uniform(0.35, 0.9, (frames, 42))], 1)
    width, height = style["size"]
    confidence[:, [10, 11, 13, 14, 19, 20, 21, 22, 23, 24]] = 0                 # legs and feet out of frame
    confidence[:, [8, 9, 12]] *= rng.random((frames, 3)) < 0.5                 # hips half seen
    for hand, start, wrist in ((track["left"], 95, 7), (track["right"], 116, 4)):
        near_face = hand[:, 1] < -0.45
        lost = rng.random(frames) < np.where(near_face, 0.25, 0.05)
        lost |= np.concatenate([[False], lost[:-1]]) & (rng.random(frames) < 0.5)   # losses last a few frames
        confidence[lost, start: start + 21] = 0
        confidence[lost & (rng.random(frames) < 0.3), wrist] = 0
    outside = (pixels[..., 0] < 0) | (pixels[..., 0] >= width) | (pixels[..., 1] < 0) | (pixels[..., 1] >= height)
    confidence[outside] = 0
    confidence[rng.random(frames) < 0.02] = 0                                   # nobody found in the frame
    points = np.concatenate([pixels, confidence[..., None]], -1)
    points[confidence == 0] = 0
    return np.round(points, 3).astype(np.float32), style["size"]        # as OpenPose's JSON writes them


def bystander(frames, size, rng):
    """A second person at the frame's edge, partly seen and less confident than the signer."""
    width, height = size
    points = np.zeros((frames, OPENPOSE_POINTS, 3), np.float32)
    seen = rng.choice(OPENPOSE_POINTS, 40, replace=False)
    points[:, seen, 0] = rng.uniform(0, width * 0.12, 40) + rng.normal(0, 2, (frames, 40))
    points[:, seen, 1] = rng.uniform(0, height, 40) + rng.normal(0, 2, (frames, 40))
    points[:, seen, 2] = rng.uniform(0.05, 0.3, (frames, 40))
    return np.round(points, 3).astype(np.float32)


def openpose_parts(points):
    bounds = np.cumsum([0] + [count for _, count in tsw.OPENPOSE_PARTS])
    return {name: points[:, bounds[i]: bounds[i + 1]] for i, (name, _) in enumerate(tsw.OPENPOSE_PARTS)}


def candidate(points, size, name):
    """The (T, D) frames a candidate preparation makes of one clip's most confident person (CANDIDATES)."""
    if name == "raw":
        scaled = points.copy()
        scaled[..., 0] /= size[0]
        scaled[..., 1] /= size[1]
        return scaled.reshape(len(points), -1)
    body, face = (list(indices) for indices in tsw.SKELETONS[0][1:3])
    kept = np.concatenate([points[:, body], points[:, 25:95][:, face], points[:, 95:]], axis=1)   # (T, 77, 3)
    found = kept[..., 2:] > 0
    xy = tsw.prepare_pose(openpose_parts(points)).reshape(len(points), 77, -1)[..., :2].copy()
    if name == "points":                              # the hands where they are, not from their wrists
        shoulders = points[:, [5, 2]]
        both = (shoulders[..., 2] > 0).all(axis=1)
        centre = np.median(shoulders[both, :, :2].mean(axis=1), axis=0)
        scale = float(np.median(np.linalg.norm(shoulders[both, 0, :2] - shoulders[both, 1, :2], axis=-1)))
        xy[:, -42:] = (kept[:, -42:, :2] - centre) / scale * found[:, -42:]
    channel = {"points": np.clip(kept[..., 2:], 0, 1) * found, "confidence": np.clip(kept[..., 2:], 0, 1) * found,
               "mask": found.astype(np.float32), "no_confidence": None}[name]
    frames = xy if channel is None else np.concatenate([xy, channel], axis=-1)
    return frames.reshape(len(points), -1).astype(np.float32)


def write_openpose_folder(folder, clip_id, people_by_frame, skip, rng):
    """One JSON per frame as OpenPose writes it (frame `skip` left out); now and then a stray file."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, people in enumerate(people_by_frame):
        if number == skip:
            continue
        record = {"version": 1.3, "people": [
            {"person_id": [-1], **{name: [round(float(v), 3) for v in part.reshape(-1)] for name, part in
                                   openpose_parts(person[None]).items()},
             **{name.replace("2d", "3d"): [] for name, _ in tsw.OPENPOSE_PARTS}} for person in people]}
        (folder / f"{clip_id}_{number:012d}_keypoints.json").write_text(json.dumps(record))
    if rng.random() < 0.03:
        (folder / ".DS_Store").write_bytes(b"\0\0")


def prepare(root):
    """The clips of bench/quality.py's sentences as skeletons, every candidate's .npy clips and the JSON folders."""
    quality_root = Path(quality.__file__).resolve().parent / "results" / "quality"
    summary = quality.prepare(quality_root)
    if (root / "READY").is_file():
        return json.loads((root / "READY").read_text()), quality_root
    manifests = quality_root / "data" / "manifests"
    frames_total, nobody, two_people, clips = [], 0, 0, {}
    for split in ("train", "val"):
        rows = tsw.read_manifest(manifests / f"{split}.tsv")
        clips[split] = len(rows)
        rng = np.random.default_rng({"train": 11, "val": 12}[split])
        for i, row in enumerate(rows):
            words = re.findall(r"[\w']+", row.text.lower())
            points, size = skeleton_clip(words, i % SIGNERS, rng)
            people = [[person] for person in points]
            if rng.random() < 0.1:
                two_people += 1
                other = bystander(len(points), size, rng)
                people = [[person, extra] if rng.random() < 0.7 else [person] for person, extra in zip(points, other)]
            people = [[p for p in frame if p[:, 2].any()] for frame in people]
            skip = int(rng.integers(1, len(people) - 1)) if rng.random() < 0.05 else -1   # a frame number missing
            nobody += sum(not frame for frame in people)
            frames_total.append(len(points))
            chosen = np.stack([max(frame, key=lambda p: p[:, 2].sum()) if frame and number != skip
                               else np.zeros_like(points[0]) for number, frame in enumerate(people)])
            for name in CANDIDATES:
                folder = root / "clips" / name / split
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / f"{row.id}.npy", candidate(chosen, size, name))
            write_openpose_folder(root / "openpose" / split / "openpose_output" / "json" / row.id, row.id, people,
                                  skip, rng)
    info = {**clips, "fps": FPS, "signers": SIGNERS,
            "frames_median": int(np.median(frames_total)), "frames_with_nobody": nobody,
            "clips_with_a_second_person": two_people, "quality_data": summary}
    (root / "READY").write_text(json.dumps(info))
    return info, quality_root


def run(root, quality_root, out, row, seed, extra):
    source, decoder = ROWS[row]
    manifests = quality_root / "data" / "manifests"
    features = (lambda split: root / "openpose" / split) if source == "openpose" else \
        (lambda split: root / "clips" / source / split)
    run_dir = out / f"{row}-seed{seed}"
    argv = ["--sonar_checkpoint", "none", "--train_features", str(features("train")),
            "--train_manifest", str(manifests / "train.tsv"), "--val_features", str(features("val")),
            "--val_manifest", str(manifests / "val.tsv"), "--t5_model", str(quality_root / decoder),
            "--output_dir", str(run_dir), "--device", "cpu", "--seed", str(seed), *SCHEDULE, *extra]
    argv += ["--eval_every", argv[argv.index("--epochs") + 1]]
    started = time.time()
    if tsw.main(argv) != 0:
        raise SystemExit(f"{row} seed {seed} failed")
    results = json.loads((run_dir / "results.json").read_text())
    tuning = results.get("decoding_tuning") or {}
    return {"row": row, "seed": seed, "bleu": results["val_bleu"], "chrf": results["val_chrf"],
            "bleu_as_trained": tuning.get("val_bleu_as_trained", results["val_bleu"]),
            "distinct": results["distinct_share"], "repeats": results.get("val_repeat_4gram_share"),
            "seconds": round(time.time() - started), "flags": " ".join(extra)}


def summarise(runs):
    lines = ["| row | seeds | val BLEU as trained, mean (per seed) | with the decoding chosen on validation | chrF | s/run |",
             "|---|---|---|---|---|---|"]
    for row in dict.fromkeys(r["row"] for r in runs):
        rs = [r for r in runs if r["row"] == row]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)   # noqa: E731
        seeds = lambda key: ", ".join(f"{r[key]:.2f}" for r in rs)   # noqa: E731
        lines.append(f"| {row} | {len(rs)} | {mean('bleu_as_trained'):.2f} ({seeds('bleu_as_trained')}) | "
                     f"{mean('bleu'):.2f} ({seeds('bleu')}) | {mean('chrf'):.1f} | {mean('seconds'):.0f} |")
    return "\n".join(lines)


def main():
    parser = quality.bench_parser(__doc__, {name: ROWS[name] for name in CANDIDATES}, "bench/results/poses")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    info, quality_root = prepare(root)
    print(f"data: {json.dumps(info)}")
    quality.run_rows(args, info, lambda out, row, seed, extra: run(root, quality_root, out, row, seed, extra), summarise)

if __name__ == "__main__":
    main()
