"""Tiny decoders of every family and the users' video-level layout, built offline: what the tests, the
benchmarks and .ci/cross_version.sh train on (not part of the tool: --demo needs only a tiny T5)."""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_sonar_with_t5 as tsw  # noqa: E402

FAMILIES = {   # family -> (model_type, language codes added to the tokenizer, scaled token embeddings)
    "t5": ("t5", (), False), "mt5": ("mt5", (), False), "bart": ("bart", (), False),
    "mbart": ("mbart", ("en_XX", "fr_XX", "de_DE"), True), "nllb": ("m2m_100", ("eng_Latn", "fra_Latn", "deu_Latn"), True)}


def build_untied_t5(tokenizer, folder, d_model=128, layers=2, heads=4, seed=0):
    """A randomly initialised T5 v1.1-shaped model (gated-GELU feed-forward, an output head of its own that
    differs from the embedding, as a trained v1.1 model's does) and its tokenizer, saved in `folder`."""
    from transformers import T5Config

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=4 * d_model, d_kv=d_model // heads,
                      num_heads=heads, num_layers=layers, num_decoder_layers=layers, dropout_rate=0.1,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False)
    model = tsw.decoder_from_config(json.loads(config.to_json_string()), untied=True)
    nn.init.normal_(model.lm_head.weight, std=d_model ** -0.5)
    tsw.save_export(model, tokenizer, folder, weights=True)
    return folder


def build_tiny_seq2seq(tokenizer, folder, family="t5", d_model=128, layers=2, heads=4, seed=0):
    """A randomly initialised model of a family (FAMILIES) and its tokenizer, saved in `folder`, loadable
    offline like the hub's: mt5 is T5 v1.1-shaped; nllb is M2M100 (NLLB-200's architecture) and mbart
    mBART-50, each with language-code tokens; they start decoding from </s>, as theirs do."""
    from transformers import AutoConfig

    if family == "t5":
        return tsw.build_tiny_t5(tokenizer, folder, d_model, layers, heads, seed)
    model_type, codes, scaled = FAMILIES[family]
    tokenizer = copy.deepcopy(tokenizer)
    if codes:
        tokenizer.add_special_tokens({"additional_special_tokens": list(codes)})
    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if model_type == "mt5":
        config = AutoConfig.for_model("mt5", d_model=d_model, d_ff=4 * d_model, d_kv=d_model // heads, num_heads=heads,
                                      num_layers=layers, num_decoder_layers=layers, feed_forward_proj="gated-gelu",
                                      tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id, **ids)
    else:
        config = AutoConfig.for_model(model_type, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                                      encoder_attention_heads=heads, decoder_attention_heads=heads,
                                      encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
                                      max_position_embeddings=512, scale_embedding=scaled, bos_token_id=tokenizer.eos_token_id,
                                      encoder_layerdrop=0.0, decoder_layerdrop=0.0, forced_eos_token_id=tokenizer.eos_token_id,
                                      decoder_start_token_id=tokenizer.eos_token_id, **ids)
    model = tsw.decoder_from_config(json.loads(config.to_json_string()), untied=model_type == "mt5")
    if model_type == "mt5":   # an output head that differs from the embedding, as a trained mT5 has
        nn.init.normal_(model.lm_head.weight, std=d_model ** -0.5)
    tsw.save_export(model, tokenizer, folder, weights=True)
    return folder


def write_video_layout(root, split, clips, sentences, rng, rest_frame, per_video=15):
    """The users' video-level layout: one file per VIDEO (its sentences' clips in a row, with 0-3 rest
    frames between them), a TSV in their format (id = video, duration = start second, rows in
    sentence-name order) and How2Sign's official CSV with exact START/END_REALIGNED spans."""
    folder = root / "features" / split
    folder.mkdir(parents=True, exist_ok=True)
    tsv, official = ["id\tduration\ttext"], []
    for video_number, first in enumerate(range(0, len(clips), per_video)):
        video, parts, offset = f"demo_{split}_video{video_number:03d}", [], 0
        for k, i in enumerate(range(first, min(first + per_video, len(clips)))):
            gap = int(rng.integers(0, 4))
            parts += [np.repeat(rest_frame[None], gap, axis=0), clips[i]]
            start, end = (offset + gap) / tsw.DEMO_FPS, (offset + gap + len(clips[i])) / tsw.DEMO_FPS
            offset += gap + len(clips[i])
            official.append((video, f"{video}_{k}-rgb_front", start, end, sentences[i]))
        np.save(folder / f"{video}.npy", np.concatenate(parts).astype(np.float32))
    official.sort(key=lambda row: row[1])                             # sentence-name order: _0, _1, _10, _11, _2
    tsv += [f"{video}\t{start:.4f}\t{text}" for video, _, start, _, text in official]
    (root / "manifests").mkdir(exist_ok=True)
    (root / "manifests" / f"{split}.tsv").write_text("\n".join(tsv) + "\n")
    (root / "manifests" / f"how2sign_realigned_{split}.csv").write_text(
        "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE\n" + "".join(
            f"{video[:-8]}\t{video}\t{name}\t{name}\t{start:.4f}\t{end:.4f}\t{text}\n"
            for video, name, start, end, text in official))


def make_video_project(root, num_train=2200, num_val=200, feature_dim=256, seed=0, t5_folder="t5-tiny"):
    """The demo project (make_demo_data) in what the users really have: one file per video of ~15
    sentences, a video-level TSV and How2Sign's CSV, instead of one file per sentence."""
    root = Path(root)
    info = tsw.make_demo_data(root, num_train, num_val, feature_dim, seed, t5_folder, messy=False)
    for folder in ("features", "manifests", "data"):
        for path in sorted((root / folder).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    rng = info["rng"]                     # where the clips left it: the same rest frames as ever
    splits = {"train": range(num_train), "val": range(num_train, num_train + num_val)}
    for split, indices in splits.items():
        write_video_layout(root, split, [info["clips"][i] for i in indices], [info["sentences"][i] for i in indices],
                           rng, info["rest_frame"])
    return info


def skeleton_frames(rng, frames, offset=(640.0, 300.0), scale=200.0):
    """(T, 137, 3) OpenPose points of one person in pixels (x, y, confidence): a body with shoulders one `scale`
    apart around `offset`, a face and two hands that move a little every frame."""
    base = np.concatenate([rng.uniform(-1.0, 1.0, (25, 2)), rng.uniform(-0.3, 0.3, (70, 2)) + [0, -0.7],
                           rng.uniform(-0.2, 0.2, (42, 2)) + [0, 0.8]])
    base[5], base[2] = [0.5, 0.0], [-0.5, 0.0]                                  # left and right shoulder
    drift = np.cumsum(rng.normal(0, 0.05, (frames, 137, 2)), axis=0)
    points = np.concatenate([(base + drift) * scale + offset, rng.uniform(0.5, 0.95, (frames, 137, 1))], -1)
    return np.round(points, 3).astype(np.float32)


def write_openpose_clip(folder, people_by_frame, numbers=None):
    """How2Sign's keypoint folder of one clip: `<name>_<12-digit frame>_keypoints.json` per frame, each holding
    its people (a list of (137, 3) arrays; an empty list: nobody found), as OpenPose's --write_json does."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers = range(len(people_by_frame)) if numbers is None else numbers
    bounds = np.cumsum([0] + [count for _, count in tsw.OPENPOSE_PARTS])
    for number, people in zip(numbers, people_by_frame):
        record = {"version": 1.3, "people": [
            {"person_id": [-1], **{key: person[bounds[i]: bounds[i + 1]].reshape(-1).tolist()
                                   for i, (key, _) in enumerate(tsw.OPENPOSE_PARTS)}} for person in people]}
        (folder / f"{folder.name}_{number:012d}_keypoints.json").write_text(json.dumps(record))


def write_pose_file(path, people, components=None):
    """A .pose file (pose-format) of (T, people, 137, 3) points, OpenPose's components unless others are given
    ([(name, points)])."""
    from pose_format import Pose
    from pose_format.numpy import NumPyPoseBody
    from pose_format.pose_header import PoseHeader, PoseHeaderComponent, PoseHeaderDimensions
    from pose_format.utils.openpose import OpenPose_Components

    header_components = OpenPose_Components if components is None else [
        PoseHeaderComponent(name, [f"p{i}" for i in range(count)], [], [(0, 0, 0)], "XYC") for name, count in components]
    header = PoseHeader(0.1, PoseHeaderDimensions(1280, 720, 0), header_components)
    body = NumPyPoseBody(25, people[..., :2].astype(np.float32), people[..., 2].astype(np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        Pose(header, body).write(handle)
