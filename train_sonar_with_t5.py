"""Translate sign-language video to English: a frozen SONAR-style sentence encoder, decoded by T5.

Ready-to-paste commands
-----------------------
Demo (offline, ~5 minutes on 2 CPU cores: generated How2Sign-shaped data, a tiny T5):
    python train_sonar_with_t5.py --demo

The guide's Colab Cell 5 (quick test) on your data, one GPU:
    python train_sonar_with_t5.py \
        --sonar_checkpoint checkpoints/sonar_encoder_finetuned/best_encoder.pt \
        --train_features features/train --train_manifest manifests/train.tsv \
        --val_features features/val --val_manifest manifests/val.tsv \
        --output_dir checkpoints/sonar_t5_attention_test --t5_model t5-small \
        --freeze_encoder --epochs 2 --batch_size 16 --learning_rate 5e-5 --warmup_steps 100 --device cuda

Check every path and clip before training (the guide's Cell 3):   add --check
Resume after a Colab disconnect:                                   add --resume
Several GPUs on one machine:     torchrun --standalone --nproc_per_node=4 train_sonar_with_t5.py <same flags>
Translate new clips:             python train_sonar_with_t5.py --predict --checkpoint OUT/best_model.pt \
                                     --features features/test [--manifest manifests/test.tsv]

Pipeline: clip features (T, D) -> mean over valid frames -> frozen encoder (projection, LayerNorm,
L2) -> sentence embedding (1024) -> bridge (`expander` queries attend, through `attention_bridge`,
to memory tokens projected from the standardised embedding) -> T5 via `inputs_embeds`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate
from tqdm.auto import tqdm

logger = logging.getLogger("train_sonar_with_t5")

# ----------------------------------------------------------------------------------------------
# Defaults (shared by the CLI and the Python API, so a default-built model matches a default run)

DEFAULT_T5 = "t5-small"
BRIDGE_KINDS = ("memory", "guide", "prefix")
MODEL_DEFAULTS = dict(
    bridge="memory",        # memory tokens + residual cross-attention; "guide" = the guide's bridge
    num_queries=32,         # the guide's `expander` length
    num_heads=8,
    bridge_layers=1,
    memory_tokens=8,
    bridge_ff_dim=0,        # 0: 4 * d_model
    bridge_dropout=0.1,
    bridge_layernorm=True,  # LayerNorm on the bridge output (the guide's troubleshooting step 3)
    standardize=True,       # per-dimension standardisation of the frozen embedding
    frame_attention=False,  # queries also attend to the clip's frames
)
# Flags that change the model's shape or meaning: a resumed run must match them.
ARCHITECTURE_FLAGS = ("t5_model", "freeze_encoder", *MODEL_DEFAULTS)
FEATURE_SUFFIXES = (".npy", ".pt")
CHECKPOINT_FORMAT = 1


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file): printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------
# Safe file I/O: weights-only loading, atomic writes


def safe_torch_load(path, what="checkpoint"):
    """torch.load with weights_only=True: a file from the internet cannot run code here."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise UserError(f"{path}: the {what} is truncated (an interrupted download or copy); "
                        "copy it again or use an earlier one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds; all mean "this file is not usable"
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Weights only load failed" in str(error) or "weights_only" in str(error):
            raise UserError(f"{path}: refused to load the {what}: it holds Python objects beyond "
                            "tensors, which could run code (weights-only loading). Re-save it as a "
                            "plain dict of tensors") from None
        raise UserError(f"{path}: cannot read the {what}: not a PyTorch checkpoint or truncated "
                        f"({text})") from None


def atomic_write(path, write_fn, mode="wb"):
    """Write to a temporary file beside `path`, fsync, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path, text):
    atomic_write(path, lambda handle: handle.write(text), mode="w")


def load_clip_features(path):
    """Read one clip as a float32 (T, D) tensor from .npy (no pickles) or .pt (weights only)."""
    path = Path(path)
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"dtype {array.dtype} is not numeric")
        features = torch.from_numpy(np.asarray(array, dtype=np.float32))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = obj.get("features")
        if not torch.is_tensor(obj):
            raise ValueError("expected a tensor, or a dict holding one under 'features'")
        features = obj.float()
    while features.dim() > 2 and features.shape[0] == 1:
        features = features[0]
    if features.dim() == 1:
        features = features[None]
    if features.dim() != 2:
        raise ValueError(f"shape {tuple(features.shape)} is not (T, D)")
    return features


# ----------------------------------------------------------------------------------------------
# Manifests: TSV (id / duration / text), official How2Sign CSV, JSON, JSON Lines


@dataclass
class ManifestRow:
    id: str
    text: str
    features: str | None  # explicit feature path (JSON manifests); None: <features_dir>/<id>.npy|.pt
    line: int


def read_manifest(path):
    """Rows of a manifest, format chosen by extension and header. Raises UserError on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    if path.suffix in (".json", ".jsonl"):
        return _read_json_manifest(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [name.strip() for name in next(reader, [])]
        if {"SENTENCE_NAME", "SENTENCE"} <= set(header):  # official how2sign_realigned_*.csv
            id_col, text_col = header.index("SENTENCE_NAME"), header.index("SENTENCE")
        elif {"id", "text"} <= set(header):
            id_col, text_col = header.index("id"), header.index("text")
        else:
            raise UserError(f"{path}: unknown manifest header {header[:8]}; expected a tab-separated "
                            "header 'id<TAB>duration<TAB>text' or How2Sign's SENTENCE_NAME/SENTENCE")
        rows = []
        for line, fields in enumerate(reader, start=2):
            if not any(field.strip() for field in fields):
                continue
            fields += [""] * (max(id_col, text_col) + 1 - len(fields))
            rows.append(ManifestRow(fields[id_col].strip(), fields[text_col].strip(), None, line))
    return rows


def _read_json_manifest(path):
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
            if isinstance(records, dict):
                records = records.get("data", records.get("clips"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path}: expected a list of objects with 'id', 'text' and 'features'")
    rows = []
    for line, record in enumerate(records, start=1):
        feature_path = record.get("features")
        if feature_path:
            feature_path = str((path.parent / str(feature_path)))
        rows.append(ManifestRow(str(record.get("id", "") or "").strip(),
                                str(record.get("text", "") or "").strip(), feature_path, line))
    return rows


def rows_from_folder(features_dir):
    """One row per clip file, id = file name without extension (--predict without a manifest)."""
    files = sorted(f for f in Path(features_dir).iterdir() if f.suffix in FEATURE_SUFFIXES)
    return [ManifestRow(f.stem, "", str(f), i) for i, f in enumerate(files, start=1)]


def screen_manifest_rows(rows, require_text=True):
    """Keep usable rows; return (kept, skipped) with skipped = [(id, reason)].

    Real manifests have rows with an empty id, and video-level ids shared by several sentences:
    training on those would pair one clip with many texts, so every row of such an id is skipped.
    """
    skipped, texts_by_id = [], {}
    for row in rows:
        if row.id and row.text:
            texts_by_id.setdefault(row.id, set()).add(row.text)
    kept, seen = [], set()
    for row in rows:
        if not row.id:
            skipped.append((f"<line {row.line}>", "empty id in manifest"))
        elif not row.text and require_text:
            skipped.append((row.id, "empty text in manifest"))
        elif len(texts_by_id.get(row.id, ())) > 1:
            skipped.append((row.id, f"id shared by {len(texts_by_id[row.id])} different texts"))
        elif row.id in seen:
            skipped.append((row.id, "duplicate manifest row"))
        else:
            seen.add(row.id)
            kept.append(row)
    return kept, skipped


def find_feature_file(features_dir, clip_id):
    for suffix in FEATURE_SUFFIXES:
        candidate = Path(features_dir) / f"{clip_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------------------------
# Dataset


def _scan_clip(path, trim_zero_frames):
    """Read a clip once: (mean frame, number of frames, dim) or an error string."""
    if path is None or not Path(path).is_file():
        return f"missing feature file ({path})"
    try:
        features = load_clip_features(path)
    except Exception as error:  # noqa: BLE001 - any read failure is reported, never raised
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"unreadable feature file ({first[:120]})"
    if features.numel() and not torch.isfinite(features).all():
        return "clip has NaN/Inf values"
    if trim_zero_frames:  # features padded to 300 frames in the file: padding must not enter the mean
        nonzero = features.abs().sum(dim=1) > 0
        features = features[: int(nonzero.nonzero().max()) + 1] if nonzero.any() else features[:0]
    if features.shape[0] == 0 or features.shape[1] == 0:
        return "empty clip (no frames)"
    return features.double().mean(dim=0).float(), features.shape[0], features.shape[1]


class How2SignDataset(Dataset):
    """Clips and their sentences, read once and validated.

    How2SignDataset("data/How2Sign_val.json")                   # JSON / JSONL with feature paths
    How2SignDataset("manifests/val.tsv", "features/val")       # TSV or How2Sign CSV + folder

    Every clip file is read once here: each usable clip keeps its mean frame (the encoder's first
    step is a mean over time, so this is all it needs) and its length, never all its frames, so 31k
    clips fit in memory. Problem rows and clips are skipped and listed in `self.skipped`.
    Items are fixed-size, so PyTorch's default collate batches them.
    """

    def __init__(self, manifest, features_dir=None, *, feature_dim=None, split="data", strict=False,
                 return_frames=False, trim_zero_frames=True, require_text=True, io_threads=8,
                 progress=False):
        self.manifest, self.split = str(manifest or features_dir), split
        self.return_frames, self.trim_zero_frames = return_frames, trim_zero_frames
        rows = read_manifest(manifest) if manifest is not None else rows_from_folder(features_dir)
        kept, self.skipped = screen_manifest_rows(rows, require_text)
        paths = []
        for row in kept:
            if row.features:
                paths.append(row.features)
            elif features_dir is None:
                raise UserError(f"{manifest}: rows have no 'features' path; pass the features folder")
            else:
                found = find_feature_file(features_dir, row.id)
                paths.append(str(found) if found else str(Path(features_dir) / f"{row.id}.npy|.pt"))
        with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:  # I/O bound (Google Drive)
            scans = list(tqdm(pool.map(lambda p: _scan_clip(p, trim_zero_frames), paths),
                              total=len(paths), desc=f"reading {split} clips", disable=not progress,
                              leave=False))
        self.dim_counts = Counter(scan[2] for scan in scans if not isinstance(scan, str))
        self.feature_dim = feature_dim or (self.dim_counts.most_common(1)[0][0] if self.dim_counts else None)
        self.ids, self.texts, self.paths, means, lengths = [], [], [], [], []
        for row, path, scan in zip(kept, paths, scans):
            if not isinstance(scan, str) and scan[2] != self.feature_dim:
                scan = f"wrong feature dimension ({scan[2]}, expected {self.feature_dim})"
            if isinstance(scan, str):
                self.skipped.append((row.id, scan))
                continue
            self.ids.append(row.id)
            self.texts.append(row.text)
            self.paths.append(path)
            means.append(scan[0])
            lengths.append(scan[1])
        if strict and self.skipped:
            clip_id, reason = self.skipped[0]
            raise UserError(f"{split}: {len(self.skipped)} unusable rows/clips (--strict), first: "
                            f"{clip_id}: {reason}")
        if not self.ids:
            raise UserError(f"{split}: no usable clips in {manifest} "
                            f"({len(self.skipped)} skipped; run with --check to see why)")
        self.clip_means = torch.stack(means)                      # (N, D)
        self.lengths = torch.tensor(lengths, dtype=torch.long)    # (N,)
        self.max_frames = int(self.lengths.max())
        self.label_ids = None               # filled by tokenize()
        self.sentence_embeddings = None     # filled by the frozen-encoder cache

    def __len__(self):
        return len(self.ids)

    def skip_kinds(self):
        """Skipped rows/clips counted by kind."""
        return Counter(skip_kind(reason) for _, reason in self.skipped)

    def tokenize(self, tokenizer, max_target_length):
        """Tokenise every target once (not at every step)."""
        encoded = tokenizer(self.texts, max_length=max_target_length, truncation=True)
        self.label_lengths = torch.tensor([len(ids) for ids in encoded["input_ids"]])
        self.label_ids = torch.full((len(self), int(self.label_lengths.max())), -100, dtype=torch.long)
        for row, ids in enumerate(encoded["input_ids"]):
            self.label_ids[row, : len(ids)] = torch.tensor(ids)

    def frames(self, index):
        features = load_clip_features(self.paths[index])[: int(self.lengths[index])]
        return features

    def __getitem__(self, index):
        item = {"index": index, "id": self.ids[index], "text": self.texts[index],
                "clip_mean": self.clip_means[index], "length": self.lengths[index]}
        if self.sentence_embeddings is not None:
            item["sentence_embedding"] = self.sentence_embeddings[index]
        # Frames and labels are padded to the dataset's longest so default collate stacks them;
        # collate_clips trims them back to the batch's longest.
        if self.return_frames:
            frames = self.frames(index)
            item["frames"] = F.pad(frames, (0, 0, 0, self.max_frames - frames.shape[0]))
        if self.label_ids is not None:
            item["labels"] = self.label_ids[index]
        return item


def skip_kind(reason):
    """Skip reasons read "kind (detail)": the kind groups them in reports."""
    return reason.split(" (")[0]


def collate_clips(items):
    """Default collate, then frames and -100-padded labels trimmed to the batch's longest (dynamic padding)."""
    batch = default_collate(items)
    if "labels" in batch:
        batch["labels"] = batch["labels"][:, : int((batch["labels"] != -100).sum(dim=1).max())].contiguous()
    if "frames" in batch:
        batch["frames"] = batch["frames"][:, : int(batch["length"].max())].contiguous()
    return batch


def skip_summary(dataset):
    """One console line per split: how many rows/clips were skipped, why, and the first ids."""
    if not dataset.skipped:
        return None
    first = ", ".join(clip_id for clip_id, _ in dataset.skipped[:5])
    kinds = "; ".join(f"{count} {kind}" for kind, count in dataset.skip_kinds().most_common())
    return f"{dataset.split}: skipped {len(dataset.skipped)} rows/clips ({kinds}); first: {first}"


# ----------------------------------------------------------------------------------------------
# The frozen sentence encoder (the users' fine-tuned `best_encoder.pt`)


class SonarEncoder(nn.Module):
    """mean over valid frames -> projection MLP -> LayerNorm -> L2-normalise."""

    def __init__(self, dims=(256, 512, 512, 1024), dropout=0.1):
        super().__init__()
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers += [nn.ReLU(), nn.Dropout(dropout)]
        self.dims = tuple(dims)
        self.projection = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])

    @property
    def input_dim(self):
        return self.dims[0]

    @property
    def output_dim(self):
        return self.dims[-1]

    def forward(self, clip_mean):                               # (B, D) -> (B, E)
        return F.normalize(self.norm(self.projection(clip_mean)), dim=-1)


def masked_mean(frames, lengths):
    """Mean over the valid frames of a padded batch: (B, T, D), (B,) -> (B, D)."""
    mask = torch.arange(frames.shape[1], device=frames.device)[None] < lengths.to(frames.device)[:, None]
    return (frames * mask[..., None]).sum(dim=1) / lengths.clamp(min=1).to(frames)[:, None]


def encoder_state_from_checkpoint(obj, path):
    """The encoder's state dict out of any form users have; its layer sizes inferred from the weights."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not an encoder checkpoint (found a {type(obj).__name__}, "
                        "expected a state dict)")
    for key in ("encoder_state_dict", "model_state_dict", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    anchors = [k for k in tensors if re.search(r"(^|\.)projection\.0\.weight$", k)]
    if len(anchors) != 1:
        raise UserError(f"{path}: no encoder weights found (expected keys like 'projection.0.weight', "
                        f"'norm.weight'; found {sorted(tensors)[:6]})")
    prefix = anchors[0][: -len("projection.0.weight")]
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    linear = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"projection\.(\d+)\.weight", k)))
    if [i for i in linear] != list(range(0, 3 * len(linear), 3)):
        raise UserError(f"{path}: unexpected projection layout (linear layers at {linear}; expected "
                        "Linear, ReLU, Dropout repeated)")
    dims = [state[f"projection.{linear[0]}.weight"].shape[1]]
    dims += [state[f"projection.{i}.weight"].shape[0] for i in linear]
    return state, dims


def load_sonar_encoder(path, dropout=0.1):
    state, dims = encoder_state_from_checkpoint(safe_torch_load(path, "encoder checkpoint"), path)
    encoder = SonarEncoder(dims, dropout)
    expected = set(encoder.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{path}: encoder checkpoint does not match the encoder (missing keys: "
                        f"{missing or 'none'}; unexpected keys: {unexpected or 'none'})")
    try:
        encoder.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"{path}: encoder weights have wrong shapes ({str(error).splitlines()[1:2]})") from None
    return encoder


# ----------------------------------------------------------------------------------------------
# The bridge: learnable queries (`expander`) read the sentence embedding through cross-attention


def sinusoidal_positions(length, dim, device):
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class BridgeBlock(nn.Module):
    """Pre-norm cross-attention (queries -> memory) and feed-forward, both residual.

    The residual path keeps each query position distinct even when attention weights are uniform;
    `guide=True` drops norm, residual and feed-forward: the guide's bare nn.MultiheadAttention.
    """

    def __init__(self, d_model, num_heads, ff_dim, dropout, guide=False):
        super().__init__()
        self.guide = guide
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        if not guide:
            self.query_norm = nn.LayerNorm(d_model)
            self.ff_norm = nn.LayerNorm(d_model)
            self.feed_forward = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout),
                                              nn.Linear(ff_dim, d_model))
            self.dropout = nn.Dropout(dropout)

    def forward(self, queries, memory, memory_padding_mask=None):     # (B, Q, d), (B, M, d)
        if self.guide:
            return self.attention(queries, memory, memory, key_padding_mask=memory_padding_mask,
                                  need_weights=False)[0]
        attended = self.attention(self.query_norm(queries), memory, memory,
                                  key_padding_mask=memory_padding_mask, need_weights=False)[0]
        queries = queries + self.dropout(attended)
        return queries + self.dropout(self.feed_forward(self.ff_norm(queries)))


# ----------------------------------------------------------------------------------------------
# T5 and its tokenizer


def load_t5(name_or_path):
    """T5 and tokenizer from a hub name (t5-small, google/t5-v1_1-base...) or a local folder."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        t5 = T5ForConditionalGeneration.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load T5 '{name_or_path}': {str(error).strip().splitlines()[0]} "
                        "(offline? pass a local folder saved with save_pretrained)") from None
    return t5, tokenizer


def t5_from_config(config_dict):
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config.from_dict(config_dict))


def embedding_scale(t5):
    """RMS of T5's own token embeddings: the scale its pretrained layers expect as input."""
    return float(t5.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())


# ----------------------------------------------------------------------------------------------
# The model


class SONARwithT5(nn.Module):
    """Frozen sentence encoder -> bridge -> T5 (through `inputs_embeds`).

    Bridges (--bridge):
      memory  (default) the embedding is standardised with training-set statistics and projected
              into `memory_tokens` distinct key/value tokens; `expander` queries read them through
              `attention_bridge` inside residual pre-norm blocks with a feed-forward.
      guide   the guide's bridge: `expander` queries attend to ONE projected token. With one key,
              softmax gives every query weight 1, so all query positions carry the same vector.
      prefix  no attention: an MLP maps the embedding to num_queries tokens added to `expander`.
    """

    def __init__(self, sonar_checkpoint=None, t5_model_name=DEFAULT_T5, device="cpu", *,
                 freeze_encoder=True, t5=None, tokenizer=None, encoder_dims=None, feature_dim=None,
                 **bridge_options):
        super().__init__()
        unknown = set(bridge_options) - set(MODEL_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown SONARwithT5 options: {sorted(unknown)}")
        options = {**MODEL_DEFAULTS, **bridge_options}
        if options["bridge"] not in BRIDGE_KINDS:
            raise UserError(f"unknown bridge '{options['bridge']}' (choose from {BRIDGE_KINDS})")
        if sonar_checkpoint is not None:
            self.sonar_encoder = load_sonar_encoder(sonar_checkpoint)
        elif encoder_dims is not None:
            self.sonar_encoder = SonarEncoder(encoder_dims)
        else:
            raise UserError("SONARwithT5 needs sonar_checkpoint (or encoder_dims)")
        if t5 is None:
            t5, tokenizer = load_t5(t5_model_name)
        self.t5, self.tokenizer = t5, tokenizer
        self.t5_model_name, self.freeze_encoder, self.options = t5_model_name, freeze_encoder, options
        self.label_smoothing = 0.0   # applied to the training loss only
        self.precision = "fp32"      # autocast precision for evaluation; the trainer sets it
        if freeze_encoder:  # frozen means frozen from the start: no gradient and no dropout
            self.sonar_encoder.requires_grad_(False).eval()

        d_model, embed_dim = t5.config.d_model, self.sonar_encoder.output_dim
        queries, kind = options["num_queries"], options["bridge"]
        ff_dim = options["bridge_ff_dim"] or 4 * d_model
        dropout = options["bridge_dropout"]
        self.register_buffer("embedding_mean", torch.zeros(embed_dim))
        self.register_buffer("embedding_std", torch.ones(embed_dim))
        self.expander = nn.Parameter(torch.randn(queries, d_model))          # the learnable queries
        if kind == "memory":
            memory_tokens = options["memory_tokens"]
            self.memory_projection = nn.Linear(embed_dim, memory_tokens * d_model)
            self.memory_positions = nn.Parameter(torch.randn(memory_tokens, d_model) * 0.02)
            self.memory_norm = nn.LayerNorm(d_model)
        elif kind == "guide":
            self.memory_projection = nn.Linear(embed_dim, d_model)            # one key/value token
        else:
            self.prefix_mlp = nn.Sequential(nn.Linear(embed_dim, ff_dim), nn.GELU(), nn.Dropout(dropout),
                                            nn.Linear(ff_dim, queries * d_model))
        if options["frame_attention"]:
            frame_dim = feature_dim or self.sonar_encoder.input_dim
            self.frame_projection = nn.Linear(frame_dim, d_model)
            self.frame_norm = nn.LayerNorm(d_model)
        if kind != "prefix":
            self.bridge_blocks = nn.ModuleList(
                BridgeBlock(d_model, options["num_heads"], ff_dim, dropout, guide=kind == "guide")
                for _ in range(options["bridge_layers"]))
        self.output_norm = nn.LayerNorm(d_model) if options["bridge_layernorm"] else nn.Identity()
        # Pretrained T5 embeddings are large (std ~ 11.6 for t5-v1_1): LayerNorm-scale inputs would be
        # drowned by its layers' outputs, so the output scale starts at T5's own embedding scale.
        scale = embedding_scale(t5) if options["bridge_layernorm"] else 1.0
        self.output_scale = nn.Parameter(torch.tensor(scale))
        self.to(resolve_device(device) if isinstance(device, str) else device)

    # The guide's name for the cross-attention (the first block's).
    @property
    def attention_bridge(self):
        return self.bridge_blocks[0].attention if hasattr(self, "bridge_blocks") else None

    @property
    def device(self):
        return self.expander.device

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_encoder:  # a frozen encoder also keeps its dropout off
            self.sonar_encoder.eval()
        return self

    # -- encoder and bridge --------------------------------------------------------------------

    def sentence_embedding(self, batch):
        """(B, E) from a batch: the cached embedding when frozen, else the encoder on the clip mean."""
        if self.freeze_encoder and "sentence_embedding" in batch:
            return batch["sentence_embedding"].to(self.device)
        if "clip_mean" in batch:
            clip_mean = batch["clip_mean"].to(self.device)
        else:
            clip_mean = masked_mean(batch["frames"].to(self.device), batch["length"])
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.sonar_encoder(clip_mean.float())

    @torch.no_grad()
    def fit_standardizer(self, embeddings):
        """Per-dimension mean/std of the training set's embeddings, stored as buffers (checkpointed)."""
        embeddings = embeddings.float().to(self.device)
        self.embedding_mean.copy_(embeddings.mean(dim=0))
        self.embedding_std.copy_(embeddings.std(dim=0, unbiased=False).clamp(min=1e-6)
                                 if len(embeddings) > 1 else torch.ones_like(self.embedding_std))

    def bridge(self, sentence_embedding, frames=None, lengths=None):
        """(B, E) [+ frames (B, T, D)] -> T5 input embeddings (B, Q, d_model)."""
        kind, batch_size = self.options["bridge"], sentence_embedding.shape[0]
        embedding = sentence_embedding.to(self.expander.dtype)
        if self.options["standardize"] and kind != "guide":
            # Clips' embeddings share most of their direction (cosine ~0.99); standardising per
            # dimension makes the small per-clip differences the signal.
            embedding = (embedding - self.embedding_mean) / self.embedding_std
        queries = self.expander.unsqueeze(0).expand(batch_size, -1, -1)    # (B, Q, d)
        if kind == "prefix":
            tokens = queries + self.prefix_mlp(embedding).view(batch_size, *self.expander.shape)
            return self.output_norm(tokens) * self.output_scale
        if kind == "memory":
            memory = self.memory_projection(embedding).view(batch_size, -1, self.expander.shape[1])
            memory = self.memory_norm(memory + self.memory_positions)       # (B, M, d)
        else:
            memory = self.memory_projection(embedding).unsqueeze(1)          # (B, 1, d)
        padding = None
        if self.options["frame_attention"] and frames is not None:
            frame_tokens = self.frame_projection(frames.to(self.device, self.expander.dtype))
            frame_tokens = self.frame_norm(frame_tokens + sinusoidal_positions(
                frames.shape[1], frame_tokens.shape[-1], self.device))        # (B, T, d)
            frame_padding = (torch.arange(frames.shape[1], device=self.device)[None]
                             >= lengths.to(self.device)[:, None])
            memory = torch.cat([memory, frame_tokens], dim=1)                 # (B, M + T, d)
            padding = torch.cat([torch.zeros(batch_size, memory.shape[1] - frames.shape[1],
                                             dtype=torch.bool, device=self.device), frame_padding], 1)
        tokens = queries
        for block in self.bridge_blocks:
            tokens = block(tokens, memory, padding)
        return self.output_norm(tokens) * self.output_scale

    def bridge_batch(self, batch):
        frames = batch.get("frames") if self.options["frame_attention"] else None
        if self.options["frame_attention"] and frames is None:
            raise UserError("this model attends to frames (--frame_attention): its dataset must be "
                            "built with return_frames=True")
        return self.bridge(self.sentence_embedding(batch), frames, batch.get("length"))

    # -- T5 --------------------------------------------------------------------------------------

    def forward(self, batch):
        """Token-level cross-entropy on batch['labels'] (padded with -100); returns (loss, tokens).

        T5 is called stack by stack so its vocabulary head (a quarter of t5-small's training FLOPs)
        runs only where there is a target token, not on the -100 padding.
        """
        inputs_embeds = self.bridge_batch(batch)                             # (B, Q, d)
        labels = batch["labels"].to(self.device)                             # (B, L)
        config = self.t5.config
        decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], config.decoder_start_token_id),
                                       labels[:, :-1]], dim=1)
        decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == -100, config.pad_token_id)
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=self.device)
        memory = self.t5.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask)[0]   # (B, Q, d)
        hidden = self.t5.decoder(input_ids=decoder_input_ids, encoder_hidden_states=memory,
                                 encoder_attention_mask=attention_mask, use_cache=False)[0]  # (B, L, d)
        targets = labels != -100
        hidden = hidden[targets]                                             # (N, d)
        # T5 scales decoder outputs before a tied head (4.x: tie_word_embeddings; 5.x: its own flag).
        if getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)):
            hidden = hidden * config.d_model ** -0.5
        logits = self.t5.lm_head(hidden)                                     # (N, V)
        smoothing = self.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits.float(), labels[targets], label_smoothing=smoothing)
        return loss, targets.sum()

    @torch.no_grad()
    def generate(self, batch, **gen_kwargs):
        """Sentences for a batch; gen_kwargs go to T5's generate (max_new_tokens always set)."""
        inputs_embeds = self.bridge_batch(batch)
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=self.device)
        gen_kwargs.setdefault("max_new_tokens", 64)
        ids = self.t5.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **gen_kwargs)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def config_dict(self):
        """What it takes to rebuild this model without the training flags (saved in checkpoints)."""
        return {"t5_model": self.t5_model_name, "freeze_encoder": self.freeze_encoder,
                "encoder_dims": list(self.sonar_encoder.dims), **self.options,
                "feature_dim": self.frame_projection.in_features if hasattr(self, "frame_projection")
                else None}

    @classmethod
    def from_checkpoint(cls, path, device="cpu", checkpoint=None):
        """Rebuild a trained model from best_model.pt alone (+ its t5_export/ folder, if present).
        `checkpoint`: the file's contents when the caller has already loaded them."""
        checkpoint = checkpoint if checkpoint is not None else safe_torch_load(path, "model checkpoint")
        if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
            raise UserError(f"{path}: not a model checkpoint of this tool (no 'model_state_dict')")
        config = checkpoint.get("model_config")
        if config is None or "t5_config" not in checkpoint:
            raise UserError(f"{path}: this checkpoint lacks its model settings; rebuild with "
                            "SONARwithT5(...) and load_state_dict")
        export = Path(path).parent / "t5_export"
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(export if export.is_dir() else config["t5_model"])
        except (OSError, ValueError) as error:
            raise UserError(f"{path}: no tokenizer in {export} nor at '{config['t5_model']}' "
                            f"({str(error).splitlines()[0]})") from None
        options = {k: config[k] for k in MODEL_DEFAULTS}
        model = cls(None, config["t5_model"], device, freeze_encoder=config["freeze_encoder"],
                    t5=t5_from_config(checkpoint["t5_config"]), tokenizer=tokenizer,
                    encoder_dims=config["encoder_dims"], feature_dim=config.get("feature_dim"),
                    **options)
        load_model_state(model, checkpoint["model_state_dict"], path)
        return model


def load_model_state(model, state_dict, path):
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise UserError(f"{path}: checkpoint is from another model "
                        f"({str(error).splitlines()[1].strip() if chr(10) in str(error) else error})") from None
    # T5 ties lm_head to the shared embedding in some configs; a missing tied copy is not a problem.
    missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")
               and not k.endswith("embed_tokens.weight")]
    if missing or result.unexpected_keys:
        raise UserError(f"{path}: checkpoint is from another model (missing keys: "
                        f"{missing[:5] or 'none'}; unexpected keys: {result.unexpected_keys[:5] or 'none'})")


def resolve_device(name):
    if name.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available on this machine: running on CPU instead.")
        return torch.device("cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------
# Evaluation: decoding, metrics, collapse diagnostics


def generation_kwargs(args):
    """One dict for generate. Deterministic beam search unless sampling is asked for."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
    if args.num_beams > 1:
        kwargs["early_stopping"] = True
    if args.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = args.repetition_penalty
    if args.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    if args.do_sample:  # passed only when sampling: set otherwise they only raise warnings
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    return kwargs


def run_evaluation(model, loader, device, gen_kwargs=None, progress=False):
    """Loss and predictions over a loader: (rows [(index, id, reference, prediction)], loss_sum, tokens)."""
    model.eval()
    gen_kwargs = dict(gen_kwargs or {"max_new_tokens": 64, "num_beams": 4, "early_stopping": True})
    rows, loss_sum, token_count = [], 0.0, 0
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluating", leave=False, disable=not progress):
            if "labels" not in batch:  # e.g. a default-collated How2SignDataset (Cell 7)
                encoded = model.tokenizer(list(batch["text"]), padding=True, return_tensors="pt")
                batch["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
            with autocast_for(device, model.precision):
                loss, tokens = model(batch)
                predictions = model.generate(batch, **gen_kwargs)
            loss_sum += float(loss) * int(tokens)   # .item(): syncs the GPU, once per batch
            token_count += int(tokens)
            indices = batch["index"].tolist() if "index" in batch else [None] * len(predictions)
            rows += list(zip(indices, batch["id"], batch["text"], predictions))
    return rows, loss_sum, token_count


def corpus_scores(predictions, references):
    """BLEU-4, chrF (sacreBLEU) and BLEU-1..4, with the BLEU signature."""
    from sacrebleu.metrics import BLEU, CHRF

    if not predictions:
        return {"bleu": 0.0, "chrf": 0.0, "bleu_n": [0.0] * 4, "signature": ""}
    bleu = BLEU()
    score = bleu.corpus_score(predictions, [references])
    bleu_n = [BLEU(max_ngram_order=n, effective_order=n < 4).corpus_score(predictions, [references]).score
              for n in range(1, 5)]
    return {"bleu": score.score, "chrf": CHRF().corpus_score(predictions, [references]).score,
            "bleu_n": bleu_n, "signature": str(bleu.get_signature())}


def evaluate_model(model, loader, device, gen_kwargs=None):
    """The guide's Cell 7 API: (BLEU, loss, [(ground_truth, prediction), ...])."""
    model = getattr(model, "module", model)
    rows, loss_sum, token_count = run_evaluation(model, loader, device, gen_kwargs)
    scores = corpus_scores([r[3] for r in rows], [r[2] for r in rows])
    return scores["bleu"], loss_sum / max(token_count, 1), [(r[2], r[3]) for r in rows]


def mean_pairwise_cosine(vectors):
    """Mean cosine over distinct pairs of rows: (N, E) -> float."""
    if len(vectors) < 2:
        return float("nan")
    unit = F.normalize(vectors.double(), dim=-1)
    gram = unit @ unit.T
    n = len(unit)
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def collapse_diagnostics(model, dataset, predictions, references, max_clips=256):
    """Numbers that locate collapse: encoder -> bridge -> decoder."""
    model.eval()
    indices = list(range(min(len(dataset), max_clips)))
    batch = collate_clips([{k: v for k, v in dataset[i].items() if k != "labels"} for i in indices])
    embeddings = model.sentence_embedding(batch).float()                      # (N, E)
    tokens = model.bridge_batch(batch).float()                                 # (N, Q, d)
    rms = tokens.pow(2).mean().sqrt().clamp(min=1e-12)
    spread = embeddings.std(dim=0).mean() / embeddings.pow(2).mean().sqrt().clamp(min=1e-12)
    return {
        "encoder_cosine": mean_pairwise_cosine(embeddings),
        "encoder_spread": float(spread),                                   # relative per-dim std
        "bridge_spread_clips": float(tokens.std(dim=0).mean() / rms),     # do clips differ?
        "bridge_spread_positions": float(tokens.std(dim=1).mean() / rms), # do query slots differ?
        "distinct_share": len(set(predictions)) / max(len(predictions), 1),
        "reference_distinct_share": len(set(references)) / max(len(references), 1),
    }


COLLAPSE_SHARE = 0.5     # distinct predictions below half the references' distinct share
FLAT_SPREAD = 1e-3       # relative spread below which a stage passes on no difference


def diagnose_collapse(diagnostics):
    """One plain sentence naming where collapse starts and what to try, or None when healthy."""
    d = diagnostics
    if d["distinct_share"] >= COLLAPSE_SHARE * d["reference_distinct_share"]:
        return None
    share = f"only {d['distinct_share']:.0%} of predictions are distinct"
    if d["encoder_spread"] < FLAT_SPREAD:
        return (f"Mode collapse ({share}) starts in the ENCODER: its embeddings of different clips are "
                f"identical (spread {d['encoder_spread']:.1e}); retrain or unfreeze it "
                "(--no-freeze_encoder), or add --frame_attention so the bridge sees the frames.")
    if d["bridge_spread_positions"] < FLAT_SPREAD:
        return (f"Mode collapse ({share}) starts in the BRIDGE: all query positions carry the same "
                "vector (attention over one key); use --bridge memory (the default).")
    if d["bridge_spread_clips"] < FLAT_SPREAD:
        return (f"Mode collapse ({share}) starts in the BRIDGE: its outputs barely differ between clips "
                f"(spread {d['bridge_spread_clips']:.1e}); keep --standardize on (the default) and train longer.")
    return (f"Mode collapse ({share}) is in the DECODER: the bridge passes on per-clip differences "
            f"(spread {d['bridge_spread_clips']:.2f}) but T5 ignores them; train longer, try "
            "--learning_rate x3 or --bridge prefix, and check that references are correct.")


# ----------------------------------------------------------------------------------------------
# Training: distributed setup, precision, one epoch, checkpoints


@dataclass
class Distributed:
    """torchrun's environment; a plain `python` run is rank 0 of 1."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self):
        return self.rank == 0

    def gather(self, obj):
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()


def setup_distributed(device_name):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") and torch.cuda.is_available()
    if device_name.startswith("cuda") and not use_cuda and rank == 0:
        logger.warning("CUDA is not available on this machine: running on CPU instead.")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return Distributed(rank, local_rank, world_size, device)


def resolve_precision(precision, device):
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            logger.warning(f"--precision {precision} needs a GPU: training in fp32 on CPU.")
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast_for(device, precision):
    """One autocast context: bf16/fp16 on GPU, nothing on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def epoch_batches(num_items, batch_size, epoch, seed, dist_info):
    """This process's batches for an epoch: a fresh shuffle per epoch, sharded across processes
    like DistributedSampler (padded to a multiple of the world size); reproducible for resume."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    if dist_info.world_size > 1:
        order += order[: (-len(order)) % dist_info.world_size]
        order = order[dist_info.rank:: dist_info.world_size]
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def length_sorted_batches(dataset, indices, batch_size):
    """Batches of clips of similar length (a proxy for sentence length), so generation and frame
    padding waste little."""
    order = sorted(indices, key=lambda i: int(dataset.lengths[i]))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def encode_dataset(model, dataset, batch_size=4096):
    """Sentence embeddings of every clip, computed once (the frozen encoder's cache)."""
    model.sonar_encoder.eval()
    chunks = [model.sonar_encoder(dataset.clip_means[i: i + batch_size].to(model.device)).float().cpu()
              for i in range(0, len(dataset), batch_size)]
    return torch.cat(chunks)                                                  # (N, E)


def cpu_state_dict(module):
    """State dict on CPU; tensors that share storage (tied embeddings) stay shared."""
    copies, state = {}, {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().cpu().clone()
        state[name] = copies[key]
    return state


def plain_args(args):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def model_checkpoint(model, args, **extra):
    return {"format": CHECKPOINT_FORMAT, "model_state_dict": cpu_state_dict(model),
            "model_config": model.config_dict(), "t5_config": json.loads(model.t5.config.to_json_string()),
            "args": plain_args(args), **extra}


def check_resume_compatible(saved_args, args, path):
    differences = [f"--{name} {saved_args.get(name)!r} (now {getattr(args, name)!r})"
                   for name in ARCHITECTURE_FLAGS if saved_args.get(name) != getattr(args, name)]
    if differences:
        raise UserError(f"cannot resume from {path}: it was trained with " + ", ".join(differences)
                        + "; rerun with the same flags or use another --output_dir")


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    epoch: int = 0              # completed epochs
    batch_in_epoch: int = 0     # batches of the current epoch already trained (mid-epoch saves)
    global_step: int = 0        # optimizer steps
    loss_sum: float = 0.0       # running train loss of the current epoch (token-weighted)
    token_sum: int = 0
    best: dict | None = None    # {"epoch", "val_bleu", "val_loss"}
    skipped_steps: int = 0      # non-finite steps skipped in all


class Trainer:
    """Holds the model, data and optimizer of one run; `fit` trains and evaluates."""

    def __init__(self, args, dist_info):
        self.args, self.dist = args, dist_info
        self.device = dist_info.device
        self.out = Path(args.output_dir)
        self.precision = resolve_precision(args.precision, self.device)
        self.state = TrainState()
        self.metrics = []
        self.tensorboard = None
        self.best_eval = None       # (rows, loss, scores) of the best epoch, when it covered every clip

    # -- set-up ----------------------------------------------------------------------------------

    def setup(self):
        args = self.args
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.model = SONARwithT5(args.sonar_checkpoint, args.t5_model, self.device,
                                 freeze_encoder=args.freeze_encoder,
                                 **{k: getattr(args, k) for k in MODEL_DEFAULTS})
        self.model.label_smoothing = args.label_smoothing
        self.model.precision = self.precision
        self.train_set, self.val_set = self.load_datasets()
        train_embeddings = encode_dataset(self.model, self.train_set)
        if args.freeze_encoder:  # computed once, reused every epoch and for evaluation
            self.train_set.sentence_embeddings = train_embeddings
            self.val_set.sentence_embeddings = encode_dataset(self.model, self.val_set)
        self.model.fit_standardizer(train_embeddings)
        self.build_optimizer()
        if args.resume:
            self.restore(self.out / "last.pt")
        self.ddp_model = self.model
        if self.dist.world_size > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if args.compile:
            self.ddp_model = torch.compile(self.ddp_model)
        if self.dist.is_main:
            self.export_t5(weights=False)
            self.start_tensorboard()

    def load_datasets(self):
        args, encoder_dim = self.args, self.model.sonar_encoder.input_dim
        datasets, skipped = [], []
        for split, manifest, features in data_splits(args):
            dataset = How2SignDataset(manifest, features, feature_dim=encoder_dim, split=split,
                                      strict=args.strict, return_frames=args.frame_attention,
                                      trim_zero_frames=args.trim_zero_frames,
                                      progress=self.dist.is_main)
            dataset.tokenize(self.model.tokenizer, args.max_target_length)
            summary = skip_summary(dataset)
            if summary:
                logger.warning(summary)
            logger.info(f"{split}: {len(dataset)} clips ({dataset.feature_dim}-d features, "
                        f"up to {dataset.max_frames} frames) from {manifest}")
            skipped += [(clip_id, f"{split}: {reason}") for clip_id, reason in dataset.skipped]
            datasets.append(dataset)
        if self.dist.is_main:
            atomic_write_text(self.out / "skipped_clips.tsv", "id\treason\n" + "".join(
                f"{clean(clip_id)}\t{clean(reason)}\n" for clip_id, reason in skipped))
        return datasets

    def build_optimizer(self):
        from transformers import get_linear_schedule_with_warmup

        args, model = self.args, self.model
        groups = {"t5": [], "bridge": [], "encoder": []}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                groups["t5" if name.startswith("t5.") else
                       "encoder" if name.startswith("sonar_encoder.") else "bridge"].append(parameter)
        scales = {"t5": 1.0, "bridge": args.bridge_lr_scale, "encoder": args.encoder_lr_scale}
        self.optimizer = torch.optim.AdamW(
            [{"params": p, "lr": args.learning_rate * scales[g]} for g, p in groups.items() if p],
            weight_decay=args.weight_decay, **fused_adamw(self.device))
        batches = math.ceil(math.ceil(len(self.train_set) / self.dist.world_size) / args.batch_size)
        self.steps_per_epoch = math.ceil(batches / args.grad_accum_steps)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, args.warmup_steps, max(self.steps_per_epoch * args.epochs, 1))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def restore(self, path):
        if not path.is_file():
            logger.info(f"--resume: no {path} yet, starting from scratch.")
            return
        checkpoint = safe_torch_load(path, "resume checkpoint")
        if not isinstance(checkpoint, dict) or "optimizer_state_dict" not in checkpoint:
            raise UserError(f"{path}: not a resume checkpoint of this tool (no optimizer state)")
        check_resume_compatible(checkpoint.get("args", {}), self.args, path)
        load_model_state(self.model, checkpoint["model_state_dict"], path)
        self.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        self.scaler.load_state_dict(checkpoint["scaler_state_dict"])
        set_rng_state(checkpoint["rng"])
        self.state = TrainState(**checkpoint["train_state"])
        self.metrics = [m for m in read_metrics(self.out / "metrics.jsonl") if m["epoch"] <= self.state.epoch]
        if self.dist.is_main:  # each epoch exactly once, even if one was logged after the last save
            atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
        logger.info(f"Resumed from {path}: {self.state.epoch} epochs done"
                    + (f", {self.state.batch_in_epoch} batches into epoch {self.state.epoch + 1}"
                       if self.state.batch_in_epoch else "") + ".")

    # -- the loop --------------------------------------------------------------------------------

    def fit(self):
        args = self.args
        global_batch = args.batch_size * self.dist.world_size * args.grad_accum_steps
        logger.info(f"Training {args.epochs} epochs of {self.steps_per_epoch} steps on {self.device} "
                    f"({self.precision}, {self.dist.world_size} process(es), global batch {global_batch}, "
                    f"bridge '{args.bridge}', {count_trainable(self.model):,} trainable parameters)")
        for epoch in range(self.state.epoch, args.epochs):
            started = time.time()
            train_loss = self.train_epoch(epoch)
            record = {"epoch": epoch + 1, "train_loss": train_loss}
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                record.update(self.evaluate_epoch(epoch))
            record["seconds"] = round(time.time() - started, 2)
            self.state = TrainState(epoch=epoch + 1, global_step=self.state.global_step,
                                    best=self.state.best, skipped_steps=self.state.skipped_steps)
            if self.dist.is_main:
                self.record_metrics(record)
                self.save_last()
        self.dist.barrier()
        return self.finish()

    def train_epoch(self, epoch):
        args, state, model = self.args, self.state, self.ddp_model
        batches = epoch_batches(len(self.train_set), args.batch_size, epoch, args.seed, self.dist)
        loader = DataLoader(self.train_set, batch_sampler=batches[state.batch_in_epoch:],
                            collate_fn=collate_clips, num_workers=args.num_workers,
                            pin_memory=self.device.type == "cuda")
        model.train()
        accum, bad_in_row = args.grad_accum_steps, 0
        loss_sum = torch.tensor(state.loss_sum, device=self.device)
        token_sum = torch.tensor(state.token_sum, device=self.device)
        step_loss = step_tokens = 0   # this optimizer step's micro-batches, counted once it is kept
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", initial=state.batch_in_epoch,
                   total=len(batches), disable=not self.dist.is_main, dynamic_ncols=True)
        for i, batch in enumerate(bar, start=state.batch_in_epoch):
            boundary = (i + 1) % accum == 0 or i + 1 == len(batches)
            no_sync = model.no_sync if self.dist.world_size > 1 and not boundary else contextlib.nullcontext
            try:
                with no_sync(), autocast_for(self.device, self.precision):
                    loss, tokens = model(batch)
                    self.scaler.scale(loss / accum).backward()
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"GPU out of memory at --batch_size {args.batch_size}: lower "
                                "--batch_size (and raise --grad_accum_steps to keep the global batch), "
                                "--max_target_length or --num_queries") from None
            step_loss = step_loss + loss.detach().float() * tokens
            step_tokens = step_tokens + tokens
            if not boundary:
                continue
            self.scaler.unscale_(self.optimizer)
            grad_norm = clip_gradients(self.model.parameters(), args.max_grad_norm)
            if not math.isfinite(grad_norm):  # a skipped step leaves the weights and the loss log alone
                step_loss = step_tokens = 0
                bad_in_row += 1
                state.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.update()
                self.stop_if_diverged(bad_in_row)
                continue
            bad_in_row = 0
            loss_sum += step_loss
            token_sum += step_tokens
            step_loss = step_tokens = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            if state.global_step % 10 == 0:  # .item(): syncs the GPU, so only every few steps
                bar.set_postfix(loss=f"{float(loss_sum / token_sum.clamp(min=1)):.3f}")
            if (args.save_every_steps and state.global_step % args.save_every_steps == 0
                    and self.dist.is_main):
                state.batch_in_epoch, state.loss_sum, state.token_sum = i + 1, float(loss_sum), int(token_sum)
                self.save_last()
        bar.close()
        if self.dist.world_size > 1:
            totals = torch.stack([loss_sum.float(), token_sum.float()])
            torch.distributed.all_reduce(totals)
            loss_sum, token_sum = totals[0], totals[1]
        return float(loss_sum / token_sum.clamp(min=1))

    def stop_if_diverged(self, bad_in_row):
        limit = self.args.max_bad_steps * (10 if self.precision == "fp16" else 1)
        if bad_in_row == 1 and self.precision != "fp16":
            logger.warning(f"Non-finite loss or gradient at step {self.state.global_step + 1}: step skipped.")
        if bad_in_row >= limit:
            hint = ("T5 is known to overflow in fp16: use --precision bf16 (recent GPUs) or fp32."
                    if self.precision == "fp16" else
                    "lower --learning_rate, check the features for extreme values, or resume from last.pt.")
            raise UserError(f"Training diverged: {bad_in_row} steps in a row had a non-finite loss or "
                            f"gradient ({self.state.skipped_steps} skipped in all); {hint} "
                            f"The last good checkpoint is {self.out / 'last.pt'}.")

    # -- evaluation ------------------------------------------------------------------------------

    def eval_indices(self, full):
        indices = list(range(len(self.val_set)))
        cap = self.args.max_eval_clips
        if not full and cap and cap < len(indices):  # a fixed subset, the same every epoch
            order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.args.seed))
            indices = sorted(order[:cap].tolist())
        return indices

    def evaluate(self, full):
        """Predictions over (a fixed subset of) the validation set, split across processes."""
        indices = self.eval_indices(full)
        batches = length_sorted_batches(self.val_set, indices[self.dist.rank:: self.dist.world_size],
                                        self.args.eval_batch_size)
        loader = DataLoader(self.val_set, batch_sampler=batches, collate_fn=collate_clips,
                            num_workers=self.args.num_workers)
        rows, loss_sum, tokens = run_evaluation(self.model, loader, self.device, generation_kwargs(self.args),
                                                progress=self.dist.is_main)
        gathered = self.dist.gather((rows, loss_sum, tokens))
        by_index = {row[0]: row for part in gathered for row in part[0]}
        rows = [by_index[i] for i in sorted(by_index)]
        loss = sum(p[1] for p in gathered) / max(sum(p[2] for p in gathered), 1)
        scores = corpus_scores([r[3] for r in rows], [r[2] for r in rows])
        return rows, loss, scores, len(indices) == len(self.val_set)

    def evaluate_epoch(self, epoch):
        rows, loss, scores, full = self.evaluate(full=False)
        predictions, references = [r[3] for r in rows], [r[2] for r in rows]
        diagnostics = collapse_diagnostics(self.model, self.val_set, predictions, references)
        record = {"val_loss": loss, "val_bleu": scores["bleu"], "val_chrf": scores["chrf"],
                  "eval_clips": len(rows), **diagnostics}
        best = self.state.best
        improved = best is None or (scores["bleu"], -loss) > (best["val_bleu"], -best["val_loss"])
        if improved:  # every process tracks the best; only the main one writes it
            self.state.best = {"epoch": epoch + 1, "val_bleu": scores["bleu"], "val_loss": loss}
            self.best_eval = (rows, loss, scores) if full else None
        if self.dist.is_main:
            self.report(epoch, record, scores, rows, diagnostics)
            if improved:
                atomic_torch_save(model_checkpoint(self.model, self.args, epoch=epoch + 1,
                                                   metric="val_bleu", val_bleu=scores["bleu"],
                                                   val_loss=loss), self.out / "best_model.pt")
                if full:
                    write_predictions(self.out / "best_predictions.tsv", rows)
                logger.info(f"  new best (BLEU {scores['bleu']:.2f}): saved {self.out / 'best_model.pt'}")
        return record

    def report(self, epoch, record, scores, rows, diagnostics):
        logger.info(f"epoch {epoch + 1}/{self.args.epochs}: val loss {record['val_loss']:.4f} | "
                    f"BLEU {scores['bleu']:.2f} | chrF {scores['chrf']:.2f} | "
                    f"distinct predictions {diagnostics['distinct_share']:.0%} "
                    f"({record['eval_clips']} clips)")
        logger.info(f"  sacreBLEU {scores['signature']}")
        logger.info(f"  diagnostics: encoder cosine {diagnostics['encoder_cosine']:.4f} (spread "
                    f"{diagnostics['encoder_spread']:.2e}) | bridge spread across clips "
                    f"{diagnostics['bridge_spread_clips']:.3f}, across positions "
                    f"{diagnostics['bridge_spread_positions']:.3f}")
        verdict = diagnose_collapse(diagnostics)
        if verdict:
            logger.warning("  " + verdict)
        for n, (_, clip_id, reference, prediction) in enumerate(rows[:5], start=1):
            logger.info(f"  {n}. [{clip_id}] reference:  {reference}\n     prediction: {prediction}")

    def finish(self):
        """Score the best model on the full validation set; write results and the export."""
        if self.state.best is None:
            raise UserError("no evaluation ran; nothing to report")
        best_path = self.out / "best_model.pt"
        self.dist.barrier()
        load_model_state(self.model, safe_torch_load(best_path, "best model")["model_state_dict"], best_path)
        # Scores always cover every validation clip: re-evaluate unless the best epoch already did.
        rows, loss, scores = self.best_eval or self.evaluate(full=True)[:3]
        predictions = [r[3] for r in rows]
        results = {"best_epoch": self.state.best["epoch"], "val_bleu": scores["bleu"],
                   **{f"bleu_{n}": value for n, value in enumerate(scores["bleu_n"], start=1)},
                   "val_chrf": scores["chrf"], "val_loss": loss, "signature": scores["signature"],
                   "distinct_share": len(set(predictions)) / max(len(predictions), 1),
                   "val_clips": len(rows), "skipped_steps": self.state.skipped_steps}
        if self.dist.is_main:
            write_predictions(self.out / "best_predictions.tsv", rows)
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2) + "\n")
            self.export_t5(weights=True)
            logger.info(f"Best epoch {results['best_epoch']}: BLEU {results['val_bleu']:.2f} "
                        f"(BLEU-1..4 {' / '.join(f'{b:.1f}' for b in scores['bleu_n'])}) | chrF "
                        f"{results['val_chrf']:.2f} | distinct {results['distinct_share']:.0%} | "
                        f"{scores['signature']}")
            logger.info(f"Wrote {best_path}, best_predictions.tsv, results.json, metrics.jsonl and "
                        f"t5_export/ in {self.out}")
            if self.tensorboard:
                self.tensorboard.close()
        return results

    # -- outputs ---------------------------------------------------------------------------------

    def record_metrics(self, record):
        self.metrics.append(record)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        plot_training_curves(self.metrics, self.out / "training_curves.png")
        if self.tensorboard:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, record["epoch"])
            self.tensorboard.flush()

    def save_last(self):
        atomic_torch_save(model_checkpoint(
            self.model, self.args, optimizer_state_dict=self.optimizer.state_dict(),
            scheduler_state_dict=self.scheduler.state_dict(), scaler_state_dict=self.scaler.state_dict(),
            train_state=vars(self.state).copy(), rng=rng_state()), self.out / "last.pt")

    def export_t5(self, weights):
        """Tokenizer + config (+ weights at the end) in t5_export/, loadable with from_pretrained."""
        export = self.out / "t5_export"
        self.model.tokenizer.save_pretrained(export)
        if weights:
            self.model.t5.save_pretrained(export)
        else:
            self.model.t5.config.save_pretrained(export)

    def start_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("TensorBoard not installed: no event files (pip install tensorboard).")
            return
        self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))


def clip_gradients(parameters, max_norm):
    """Clip the total gradient norm to max_norm; returns the norm as a float.

    The .item() syncs the GPU once per optimizer step, which the non-finite check needs anyway;
    in exchange the second pass over every gradient happens only when clipping is needed.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
    if math.isfinite(norm) and norm > max_norm:
        torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
    return norm


def fused_adamw(device):
    """AdamW's fused kernel (one pass over all parameters) where this torch has it for the device."""
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1, device=device))], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {}


def data_splits(args):
    """(split, manifest, features folder) of the training and validation data."""
    return (("train", args.train_manifest, args.train_features), ("val", args.val_manifest, args.val_features))


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def clean(text):
    return re.sub(r"[\t\r\n]+", " ", str(text))


def write_predictions(path, rows):
    atomic_write_text(path, "id\treference\tprediction\n" + "".join(
        f"{clean(clip_id)}\t{clean(reference)}\t{clean(prediction)}\n" for _, clip_id, reference, prediction in rows))


def read_metrics(path):
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_curves(metrics, path):
    """Loss, BLEU and distinct-prediction share per epoch (skipped when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not getattr(plot_training_curves, "warned", False):
            logger.info("matplotlib not installed: no training_curves.png (pip install matplotlib).")
            plot_training_curves.warned = True
        return
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    evaluated = [m for m in metrics if "val_bleu" in m]
    axes[0].plot([m["epoch"] for m in metrics], [m["train_loss"] for m in metrics], "o-", label="train")
    axes[0].plot([m["epoch"] for m in evaluated], [m["val_loss"] for m in evaluated], "o-", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot([m["epoch"] for m in evaluated], [m["val_bleu"] for m in evaluated], "o-")
    axes[1].set_title("validation BLEU")
    axes[2].plot([m["epoch"] for m in evaluated], [100 * m["distinct_share"] for m in evaluated], "o-")
    axes[2].set_title("distinct predictions (%)")
    axes[2].set_ylim(0, 105)
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=90))
    plt.close(figure)


# ----------------------------------------------------------------------------------------------
# --check (the guide's Cell 3) and --predict


def run_check(args):
    """Verify every path and clip; report per split; exit code 0 only when training can start."""
    ok, encoder_dim = True, None
    print("Checking the files a training run needs:")
    try:
        encoder = load_sonar_encoder(args.sonar_checkpoint)
        encoder_dim = encoder.input_dim
        print(f"  ok  encoder checkpoint {args.sonar_checkpoint} (layers {' -> '.join(map(str, encoder.dims))})")
    except UserError as error:
        ok = False
        print(f"  ERR {error}")
    t5 = Path(args.t5_model)
    print(f"  ok  T5 '{args.t5_model}': " + ("local folder" if t5.is_dir() else
                                            "hub name (downloaded on first use, cached afterwards)"))
    for split, manifest, features in data_splits(args):
        if features and not Path(features).is_dir():
            ok = False
            print(f"  ERR {split}: features folder not found: {features}")
            continue
        try:
            dataset = How2SignDataset(manifest, features, feature_dim=encoder_dim, split=split,
                                      trim_zero_frames=args.trim_zero_frames, progress=True)
        except UserError as error:
            ok = False
            print(f"  ERR {error}")
            continue
        rows = len(dataset) + len(dataset.skipped)
        dims = ", ".join(f"{d}-d x{n}" for d, n in sorted(dataset.dim_counts.items()))
        print(f"  ok  {split}: {rows} manifest rows -> {len(dataset)} usable clips "
              f"(feature dims: {dims}; {int(dataset.lengths.min())}-{dataset.max_frames} frames)")
        for reason, count in dataset.skip_kinds().most_common():
            examples = list(dict.fromkeys(clip_id for clip_id, r in dataset.skipped if skip_kind(r) == reason))[:3]
            print(f"      {count} {reason}: {', '.join(examples)}")
    print("All checks passed: ready to train." if ok else "Fix the problems above before training.")
    return 0 if ok else 1


def run_predict(args):
    """Translate clips with a trained best_model.pt; BLEU/chrF when the manifest has references."""
    checkpoint = Path(args.checkpoint or Path(args.output_dir) / "best_model.pt")
    device = resolve_device(args.device)
    contents = safe_torch_load(checkpoint, "model checkpoint")
    model = SONARwithT5.from_checkpoint(checkpoint, device, checkpoint=contents)
    model.precision = resolve_precision(args.precision, device)
    saved = contents.get("args", {})
    parser_defaults = vars(build_parser().parse_args([]))
    for name in DECODING_FLAGS:  # decode as in training unless this command says otherwise
        if getattr(args, name) == parser_defaults[name] and name in saved:
            setattr(args, name, saved[name])
    dataset = How2SignDataset(args.manifest, args.features, feature_dim=model.sonar_encoder.input_dim,
                              split="predict", require_text=args.manifest is not None,
                              return_frames=model.options["frame_attention"],
                              trim_zero_frames=args.trim_zero_frames, progress=True)
    summary = skip_summary(dataset)
    if summary:
        logger.warning(summary)
    batches = length_sorted_batches(dataset, range(len(dataset)), args.eval_batch_size)
    model.eval()
    gen_kwargs, predictions = generation_kwargs(args), {}
    for batch_indices in tqdm(batches, desc="translating"):
        batch = collate_clips([dataset[i] for i in batch_indices])
        with autocast_for(device, model.precision):
            predictions.update(zip(batch_indices, model.generate(batch, **gen_kwargs)))
    out = Path(args.predictions_file or checkpoint.parent / "predictions.tsv")
    atomic_write_text(out, "id\tprediction\n" + "".join(
        f"{clean(dataset.ids[i])}\t{clean(predictions[i])}\n" for i in range(len(dataset))))
    logger.info(f"Wrote {len(dataset)} translations to {out}")
    if args.manifest is not None:
        scores = corpus_scores([predictions[i] for i in range(len(dataset))], dataset.texts)
        logger.info(f"BLEU {scores['bleu']:.2f} | chrF {scores['chrf']:.2f} | {scores['signature']}")
    return 0


# ----------------------------------------------------------------------------------------------
# The embedded demo: How2Sign-shaped data, generated offline


DEMO_TEMPLATES = (
    "Now I'm going to show you how to {verb} the {noun}.",
    "You want to {verb} the {adj} {noun} {prep} the {place}.",
    "Make sure you {verb} the {noun} {adverb}.",
    "Next we are going to {verb} a {adj} {noun} with the {tool}.",
    "The {noun} should be {adj} before you {verb} it.",
    "First take your {tool} and {verb} the {noun}.",
    "This is a {adj} way to {verb} your {noun}.",
    "Hi, my name is {name} and today we will {verb} the {noun}.",
    "You can {verb} the {noun} {prep} the {place} {adverb}.",
    "Let's {verb} the {adj} {noun} one more time.",
)
DEMO_WORDS = {
    "verb": "cut clean fold paint hold check move open fill turn wash stretch tie mix pour lift "
            "measure press roll shape place wrap brush tighten polish".split(),
    "noun": "onion paper brush guitar ball wheel shirt bread sauce rope board leaf bottle lid pan "
            "string glove bowl knife dough fabric chain tire flower pencil candle spoon screw hose mat".split(),
    "adj": "small large clean dry warm soft heavy simple quick round smooth thin long sharp fresh "
           "bright loose flat gentle strong".split(),
    "prep": "on into under next to behind over".split(),
    "place": "table floor counter wall shelf sink garden car stage box tray chair bench oven door".split(),
    "adverb": "slowly carefully gently quickly firmly evenly again twice tightly lightly".split(),
    "tool": "scissors hammer towel needle knife ruler sponge pliers whisk wrench brush tape".split(),
    "name": "Anna Mark Lisa David Maria James Sarah Tom Emily Carlos Nina Paul".split(),
}


def demo_sentences(count, rng):
    sentences, seen = [], set()
    while len(sentences) < count:
        template = DEMO_TEMPLATES[rng.integers(len(DEMO_TEMPLATES))]
        slots = {k: v[rng.integers(len(v))] for k, v in DEMO_WORDS.items()}
        sentence = template.format(**slots)
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def build_tokenizer(sentences, vocab_size=600):
    """A T5-style unigram tokenizer trained locally (pad 0, eos 1, unk 2); same in transformers 4 and 5."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Metaspace()])
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(sentences, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def build_tiny_t5(tokenizer, folder, d_model=128, layers=2, heads=4, seed=0, vocab_size=None):
    """A randomly initialised T5 (+ tokenizer) saved in `folder`; vocab_size defaults to the tokenizer's."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size or len(tokenizer), d_model=d_model, d_ff=4 * d_model, d_kv=d_model // heads,
                      num_heads=heads, num_layers=layers, num_decoder_layers=layers, dropout_rate=0.1,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_demo_data(root, num_train=2200, num_val=200, feature_dim=256, seed=0,
                   t5_folder="t5-tiny", target_cosine=0.99, messy=True):
    """Write a How2Sign-shaped project: features/{train,val}/<id>.npy, manifests/{train,val}.tsv,
    data/How2Sign_val.json, an encoder checkpoint in the users' format, and a tiny T5 + tokenizer.

    Each word has a "sign" (a random vector shown over 2-4 noisy frames); every frame also carries a
    large component shared by all clips, scaled until the frozen encoder's embeddings of different
    clips reach a mean pairwise cosine >= target_cosine, as the users' real encoder does.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    sentences = demo_sentences(num_train + num_val, rng)
    vocabulary = sorted({w for s in sentences for w in re.findall(r"[\w']+", s.lower())})
    signs = {w: rng.normal(size=feature_dim).astype(np.float32) for w in vocabulary}
    shared = rng.normal(size=feature_dim).astype(np.float32)
    clips = []
    for sentence in sentences:
        frames = [signs[w] + 0.3 * rng.normal(size=(rng.integers(2, 5), feature_dim))
                  for w in re.findall(r"[\w']+", sentence.lower())]
        clips.append(np.concatenate(frames).astype(np.float32))
    torch.manual_seed(seed)
    encoder = SonarEncoder((feature_dim, 512, 512, 1024))
    encoder.eval()
    probe = torch.stack([torch.from_numpy(c.mean(0)) for c in clips[:200]])
    scale = 1.0
    with torch.no_grad():  # grow the shared component until the encoder barely tells clips apart
        while mean_pairwise_cosine(encoder(probe + scale * torch.from_numpy(shared))) < target_cosine:
            scale *= 1.25
    (root / "checkpoints" / "sonar_encoder_finetuned").mkdir(parents=True, exist_ok=True)
    encoder_path = root / "checkpoints" / "sonar_encoder_finetuned" / "best_encoder.pt"
    torch.save({"encoder_state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                "epoch": 10}, encoder_path)
    splits = {"train": range(num_train), "val": range(num_train, num_train + num_val)}
    json_rows = []
    for split, indices in splits.items():
        folder = root / "features" / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["id\tduration\ttext"]
        for i in indices:
            clip_id = f"demo_{split}_{i:05d}"
            np.save(folder / f"{clip_id}.npy", clips[i] + scale * shared)
            lines.append(f"{clip_id}\t{len(clips[i]) / 24:.2f}\t{sentences[i]}")
            if split == "val":
                json_rows.append({"id": clip_id, "text": sentences[i],
                                  "features": f"../features/val/{clip_id}.npy"})
        if messy and split == "train":  # what real manifests contain: both are skipped and listed
            lines += ["\t1.00\tA row whose id is empty.", "demo_missing_clip\t2.00\tA clip that is not there."]
        (root / "manifests").mkdir(exist_ok=True)
        (root / "manifests" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "How2Sign_val.json").write_text(json.dumps(json_rows, indent=1))
    tokenizer = build_tokenizer(sentences)
    build_tiny_t5(tokenizer, root / t5_folder, seed=seed)
    with torch.no_grad():
        cosine = mean_pairwise_cosine(encoder(probe + scale * torch.from_numpy(shared)))
    (root / "READY").write_text(json.dumps({"encoder_cosine": cosine}))   # written last: data complete
    return {"root": root, "encoder": encoder_path, "t5": root / t5_folder, "encoder_cosine": cosine,
            "vocabulary": len(vocabulary)}


# ----------------------------------------------------------------------------------------------
# Command line


DECODING_FLAGS = ("num_beams", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size",
                  "do_sample", "temperature", "top_p")
DEMO_SETTINGS = dict(epochs=30, batch_size=32, learning_rate=1e-3, warmup_steps=100, eval_every=5)


def build_parser():
    p = argparse.ArgumentParser(
        description="Train T5 to translate sign-language clips through a frozen SONAR-style encoder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model paths (the guide's flags)")
    g.add_argument("--sonar_checkpoint", default="checkpoints/sonar_encoder_finetuned/best_encoder.pt",
                   help="fine-tuned encoder checkpoint (state dict; encoder_/model_state_dict; 'encoder.' prefix ok)")
    g.add_argument("--train_features", default="features/train", help="folder of <id>.npy / <id>.pt clips")
    g.add_argument("--train_manifest", default="manifests/train.tsv",
                   help="TSV (id, duration, text), How2Sign CSV, JSON or JSONL")
    g.add_argument("--val_features", default="features/val", help="folder of validation clips")
    g.add_argument("--val_manifest", default="manifests/val.tsv", help="validation manifest")
    g.add_argument("--output_dir", default=None,
                   help="where checkpoints, predictions, metrics and logs go (default checkpoints/sonar_t5, "
                        "demo_output with --demo)")
    g.add_argument("--t5_model", default=DEFAULT_T5, help="hub name (t5-small, t5-base, google/t5-v1_1-base...) "
                                                         "or local folder")
    g.add_argument("--log_file", default=None, help="log file (default <output_dir>/train.log)")

    g = p.add_argument_group("bridge (see --help of each; the guide's troubleshooting knobs)")
    g.add_argument("--bridge", choices=BRIDGE_KINDS, default=MODEL_DEFAULTS["bridge"],
                   help="memory: memory tokens + residual attention; guide: the guide's single-key "
                        "attention (collapses); prefix: MLP prefix, no attention")
    g.add_argument("--num_queries", type=int, default=MODEL_DEFAULTS["num_queries"],
                   help="learnable query tokens (expander length) fed to T5")
    g.add_argument("--num_heads", type=int, default=MODEL_DEFAULTS["num_heads"], help="attention heads")
    g.add_argument("--bridge_layers", type=int, default=MODEL_DEFAULTS["bridge_layers"], help="bridge depth")
    g.add_argument("--memory_tokens", type=int, default=MODEL_DEFAULTS["memory_tokens"],
                   help="key/value tokens projected from the embedding (memory bridge)")
    g.add_argument("--bridge_ff_dim", type=int, default=MODEL_DEFAULTS["bridge_ff_dim"],
                   help="bridge feed-forward width (0: 4 x d_model)")
    g.add_argument("--bridge_dropout", type=float, default=MODEL_DEFAULTS["bridge_dropout"], help="bridge dropout")
    g.add_argument("--bridge_layernorm", action=argparse.BooleanOptionalAction,
                   default=MODEL_DEFAULTS["bridge_layernorm"],
                   help="LayerNorm on the bridge output, scaled to T5's embedding scale")
    g.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=MODEL_DEFAULTS["standardize"],
                   help="standardise the frozen embedding with training-set mean/std")
    g.add_argument("--frame_attention", action=argparse.BooleanOptionalAction,
                   default=MODEL_DEFAULTS["frame_attention"],
                   help="queries also attend to the clip's frames (reads clips every step)")
    g.add_argument("--freeze_encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the sentence encoder frozen (--no-freeze_encoder trains it at a lower rate)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20, help="training epochs")
    g.add_argument("--batch_size", type=int, default=16, help="clips per step and process")
    g.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=5e-5, help="peak learning rate of T5")
    g.add_argument("--bridge_lr_scale", type=float, default=1.0,
                   help="bridge learning rate = learning_rate x this (x1 beat x3 and x10 in bench/collapse.py)")
    g.add_argument("--encoder_lr_scale", type=float, default=0.1,
                   help="encoder learning rate = learning_rate x this (with --no-freeze_encoder)")
    g.add_argument("--warmup_steps", type=int, default=500, help="linear warm-up steps")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--label_smoothing", type=float, default=0.1, help="label smoothing of the training loss")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--max_target_length", type=int, default=128, help="target tokens kept per sentence")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (cuda falls back to CPU with a warning)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 on GPUs that support it, else fp32; fp16 uses a GradScaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (help with --frame_attention)")
    g.add_argument("--trim_zero_frames", action=argparse.BooleanOptionalAction, default=True,
                   help="drop all-zero frames padded at the end of clip files before the mean")

    g = p.add_argument_group("evaluation and decoding")
    g.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--max_eval_clips", type=int, default=0,
                   help="per-epoch evaluation on a fixed subset of N clips (0: all); final scores use all")
    g.add_argument("--eval_batch_size", type=int, default=64, help="clips per generation batch")
    g.add_argument("--num_beams", type=int, default=4, help="beam search width (1: greedy)")
    g.add_argument("--max_new_tokens", type=int, default=64, help="longest generated sentence")
    g.add_argument("--repetition_penalty", type=float, default=1.0, help="the guide used 1.5")
    g.add_argument("--no_repeat_ngram_size", type=int, default=0, help="the guide used 2")
    g.add_argument("--do_sample", action="store_true", help="sample instead of beam search (hides collapse)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (with --do_sample)")
    g.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling (with --do_sample)")

    g = p.add_argument_group("reliability")
    g.add_argument("--resume", action="store_true", help="continue from <output_dir>/last.pt")
    g.add_argument("--save_every_steps", type=int, default=0, help="also save last.pt every N steps")
    g.add_argument("--strict", action="store_true", help="stop on any unusable clip instead of skipping it")
    g.add_argument("--max_bad_steps", type=int, default=5,
                   help="stop after this many non-finite steps in a row")

    g = p.add_argument_group("modes")
    g.add_argument("--demo", action="store_true", help="generate a small How2Sign-shaped dataset and train on it")
    g.add_argument("--check", action="store_true", help="verify paths and clips, report, and exit")
    g.add_argument("--predict", action="store_true", help="translate clips with a trained model")
    g.add_argument("--checkpoint", default=None, help="--predict: model (default <output_dir>/best_model.pt)")
    g.add_argument("--features", default=None, help="--predict: folder of clips")
    g.add_argument("--manifest", default=None, help="--predict: manifest (optional; enables BLEU)")
    g.add_argument("--predictions_file", default=None, help="--predict: output TSV (default beside the checkpoint)")
    return p


def explicit_flags(argv):
    """The flags given on the command line (not defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def validate_args(args):
    """Every problem with the flags at once, before any work starts."""
    problems = []
    for name in ("epochs", "batch_size", "grad_accum_steps", "num_queries", "num_heads", "bridge_layers",
                 "memory_tokens", "eval_every", "eval_batch_size", "num_beams", "max_new_tokens",
                 "max_target_length", "max_bad_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1 (got {getattr(args, name)})")
    for name in ("warmup_steps", "max_eval_clips", "save_every_steps", "num_workers", "bridge_ff_dim",
                 "no_repeat_ngram_size"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be 0 or more (got {getattr(args, name)})")
    for name in ("learning_rate", "bridge_lr_scale", "encoder_lr_scale", "max_grad_norm", "temperature",
                 "repetition_penalty"):
        if not getattr(args, name) > 0:
            problems.append(f"--{name} must be positive (got {getattr(args, name)})")
    if not 0 <= args.label_smoothing < 1:
        problems.append(f"--label_smoothing must be in [0, 1) (got {args.label_smoothing})")
    if not 0 <= args.bridge_dropout < 1:
        problems.append(f"--bridge_dropout must be in [0, 1) (got {args.bridge_dropout})")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p must be in (0, 1] (got {args.top_p})")
    if sum([args.check, args.predict, args.demo]) > 1:
        problems.append("--check, --predict and --demo are separate modes: use one")
    if args.predict:
        if not args.features and not args.manifest:
            problems.append("--predict needs --features (a folder of clips) or --manifest")
        elif args.features and not Path(args.features).is_dir():
            problems.append(f"--features folder not found: {args.features}")
    elif not args.check and not args.demo:
        for flag in ("train_features", "val_features"):
            if not Path(getattr(args, flag)).is_dir():
                problems.append(f"--{flag} folder not found: {getattr(args, flag)}")
        for flag in ("train_manifest", "val_manifest", "sonar_checkpoint"):
            if not Path(getattr(args, flag)).is_file():
                problems.append(f"--{flag} file not found: {getattr(args, flag)}")
    if args.num_heads >= 1 and not args.predict and Path(args.t5_model).is_dir():
        with contextlib.suppress(OSError, ValueError, KeyError):
            d_model = json.loads((Path(args.t5_model) / "config.json").read_text())["d_model"]
            if d_model % args.num_heads:
                problems.append(f"--num_heads {args.num_heads} does not divide T5's d_model {d_model}")
    if problems:
        raise UserError("invalid flags:\n  " + "\n  ".join(problems))


def setup_logging(log_file, is_main):
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_file and is_main:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)


def prepare_demo(args, given):
    """--demo: generate the data once under <output_dir>/demo_data and point the flags at it."""
    root = Path(args.output_dir) / "demo_data"
    ready = root / "READY"
    if not ready.is_file() and int(os.environ.get("RANK", "0")) == 0:
        logger.info(f"Generating the demo dataset in {root} (offline, about a minute)...")
        info = make_demo_data(root)
        logger.info(f"  {info['vocabulary']} words; frozen embeddings' mean pairwise cosine "
                    f"{info['encoder_cosine']:.4f} (like the users' encoder)")
    for _ in range(600):  # other torchrun processes wait for rank 0's data
        if ready.is_file():
            break
        time.sleep(1)
    args.sonar_checkpoint = str(root / "checkpoints" / "sonar_encoder_finetuned" / "best_encoder.pt")
    for split in ("train", "val"):
        setattr(args, f"{split}_features", str(root / "features" / split))
        setattr(args, f"{split}_manifest", str(root / "manifests" / f"{split}.tsv"))
    if "t5_model" not in given:
        args.t5_model = str(root / "t5-tiny")
    for name, value in DEMO_SETTINGS.items():
        if name not in given:
            setattr(args, name, value)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.output_dir = args.output_dir or ("demo_output" if args.demo else "checkpoints/sonar_t5")
    is_main = int(os.environ.get("RANK", "0")) == 0
    log_file = None if (args.check or args.predict) else (args.log_file or Path(args.output_dir) / "train.log")
    setup_logging(log_file, is_main)
    try:
        validate_args(args)
        if args.check:
            return run_check(args)
        if args.predict:
            return run_predict(args)
        if args.demo:
            prepare_demo(args, explicit_flags(argv))
        dist_info = setup_distributed(args.device)
        trainer = Trainer(args, dist_info)
        trainer.setup()
        trainer.fit()
        return 0
    except UserError as error:
        logger.error(f"error: {error}")
        return 2
    except KeyboardInterrupt:
        logger.error("Interrupted: the last completed epoch is in last.pt; rerun with --resume.")
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
