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
One feature file per whole VIDEO (manifest ids shared by sentences): add --feature_fps FPS
Resume after a Colab disconnect:                                   add --resume
Several GPUs on one machine:     torchrun --standalone --nproc_per_node=4 train_sonar_with_t5.py <same flags>
Translate new clips:             python train_sonar_with_t5.py --predict --checkpoint OUT/best_model.pt \
                                     --features features/test [--manifest manifests/test.tsv]

Other decoders: --t5_model takes any encoder-decoder model (google/flan-t5-base, facebook/bart-base,
facebook/nllb-200-distilled-600M with --target_lang eng_Latn, ...); --freeze_t5 or --lora_rank R keep it
frozen or adapt it (small checkpoints: the base model is named, not saved).

Pipeline: clip features (T, D) -> mean over valid frames -> frozen encoder (projection, LayerNorm,
L2) -> sentence embedding (1024) -> standardised -> bridge (`expander` queries, given per-clip
content, read memory tokens and the frames through `attention_bridge`) -> T5's encoder (or another
seq2seq model's) via `inputs_embeds`; the clip's frame tokens, through one self-attention layer, go
beside the encoder's output into the decoder's cross-attention.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import errno
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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
BRIDGE_KINDS = ("prefix_memory", "memory", "prefix", "guide")
FRAME_ROUTES = ("encoder", "cross_attention")
FRAME_ROUTE_CHOICES = ("auto", *FRAME_ROUTES)   # auto: default_frame_route(the decoder's config)
# Decoder families measured to learn better with frames beside the encoder output (bench/quality.py, README
# "Quality by decoder"); BART and M2M100 / NLLB-200 learned far worse that way and keep them in the encoder.
CROSS_ROUTE_FAMILIES = ("t5", "mt5")
MODEL_DEFAULTS = dict(
    bridge="prefix_memory",  # per-clip query content, refined by attention over memory tokens
    num_queries=32,          # the guide's `expander` length
    num_heads=8,
    bridge_layers=1,
    memory_tokens=8,
    bridge_ff_dim=0,         # 0: 4 * d_model
    bridge_dropout=0.1,
    bridge_layernorm=True,   # LayerNorm on the bridge output (the guide's troubleshooting step 3)
    standardize=True,        # per-dimension standardisation of the frozen embedding (and frames)
    frame_attention=True,    # the clip's frames go to the decoder beside the bridge's tokens (and into the bridge)
    frame_stride=2,          # one frame token every `frame_stride` frames ...
    frame_kernel=4,          # ... made of this many consecutive frames (windows overlap when kernel > stride)
    frame_route="auto",      # "cross_attention": frame tokens straight into the decoder's cross-attention
                             # (FrameMemory); "encoder": read by its encoder after the bridge's tokens;
                             # "auto": cross_attention for CROSS_ROUTE_FAMILIES, else encoder
    frame_memory_layers=1,   # cross_attention route: self-attention layers over the frame tokens
    frame_memory_ff_dim=0,   # their feed-forward width; 0: the bridge's (4 * d_model) / frame_memory_divisor
    frame_memory_divisor=1,  # the layers run at d_model / this (projected down and back up); 1: at d_model
    prefix_dim=0,            # hidden width of the prefix MLP; 0: the bridge's feed-forward width (4 * d_model)
)
ADAPTER_PREFIX_DIM = 256     # --prefix_dim's default for a frozen or LoRA decoder: small checkpoints
# How the decoder trains, and its target language (SONARwithT5 keywords, flags of the same names).
DECODER_DEFAULTS = dict(target_lang=None, freeze_t5=False, lora_rank=0, lora_alpha=0, gradient_checkpointing=False)
# What a checkpoint saved before a flag existed (or before its default changed) was trained with.
PREVIOUS_DEFAULTS = dict(frame_attention=False, frame_stride=1, frame_kernel=1, frame_route="encoder",
                         frame_memory_layers=0, frame_memory_ff_dim=0, frame_memory_divisor=1, freeze_t5=False, lora_rank=0, lora_alpha=0, target_lang=None)
# Flags that change the model's shape or what its inputs mean: a resumed run must match them.
ARCHITECTURE_FLAGS = ("t5_model", "freeze_encoder", "feature_fps", "freeze_t5", "lora_rank", "lora_alpha", "target_lang",
                      *MODEL_DEFAULTS)
DEFAULT_BRIDGE_LR = 3e-3   # bench/quality.py: a random bridge at T5's fine-tuning rate (5e-5) barely learns
DECODING_DEFAULTS = dict(num_beams=4, max_new_tokens=64, length_penalty=1.5, repetition_penalty=1.0,
                         no_repeat_ngram_size=0, do_sample=False, temperature=0.8, top_p=0.9)
DECODING_FLAGS = tuple(DECODING_DEFAULTS)
FEATURE_SUFFIXES = (".npy", ".pt")
CHECKPOINT_FORMAT = 2        # 1: bridge weights at the top level (before bridges became modules)
ORIGINAL_PAD_FRAMES = 300    # the original collate padded (or cut) every clip to 300 frames


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file): printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------
# Safe file I/O: weights-only loading, atomic writes


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
        if "Weights only load failed" in str(error) or "weights_only" in str(error):
            raise UserError(f"{path}: refused to load the {what}: it holds Python objects beyond "
                            "tensors, which could run code (weights-only loading). Re-save it as a "
                            "plain dict of tensors") from None
        raise UserError(f"{path}: cannot read the {what}: not a PyTorch checkpoint or truncated "
                        f"({first_line(error)})") from None


def atomic_write(path, write_fn, mode="wb"):
    """Write to a temporary file beside `path`, fsync, then rename: a kill never leaves half a file.

    Temporary files of `path` left by a writer that was killed are removed first. A full disk is a
    UserError that names the file; the previous version of the file is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"disk full while writing {path}: free some space (or choose another "
                            "--output_dir) and rerun with --resume; files already written are intact") from None
        raise


def atomic_torch_save(obj, path):
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path, text):
    atomic_write(path, lambda handle: handle.write(text), mode="w")


def read_jsonl(path):
    """Records of a JSON Lines file; a last line cut by a kill (or any broken line) is left out with
    a warning instead of stopping the run."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning(f"{path}: line {number} is not complete JSON (cut by a kill?); left out.")
    return records


def clean(text):
    """One TSV field: tabs and line breaks become spaces."""
    return re.sub(r"[\t\r\n]+", " ", str(text))


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


def valid_length(features):
    """Frames before the all-zero padding at the end of a file (features padded to 300 frames)."""
    nonzero = features.abs().sum(dim=1) > 0
    return int(nonzero.nonzero().max()) + 1 if nonzero.any() else 0


# ----------------------------------------------------------------------------------------------
# Manifests: TSV (id / duration / text), official How2Sign CSV, JSON, JSON Lines


@dataclass
class ManifestRow:
    id: str
    text: str
    line: int
    features: str | None = None   # explicit feature path (JSON manifests); None: <features_dir>/<file>.npy|.pt
    video: str | None = None      # the file's name when it differs from the id (How2Sign's VIDEO_NAME)
    start: float | None = None    # seconds into the file (--feature_fps)
    end: float | None = None
    duration: float | None = None  # the TSV's `duration` column (in the users' files: a start second)

    def file_stem(self, spans):
        """The feature file's name: the sample's id, or with --feature_fps (`spans`) its video's."""
        return (self.video or self.id) if spans else self.id


def float_or_none(value):
    """A float from a manifest field, or None when it is empty or not a number."""
    try:
        result = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def decode_lines(path):
    """The lines of a text file: UTF-8 (a BOM from Excel is dropped, CRLF is fine); a line that is not
    UTF-8 (Latin-1 / Windows-1252 from Excel) is read as Windows-1252 and named in a warning."""
    lines, fallback = [], []
    for line_number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("cp1252", errors="replace"))
            fallback.append(line_number)
    if fallback:
        shown = ", ".join(map(str, fallback[:5])) + (" ..." if len(fallback) > 5 else "")
        logger.warning(f"{path}: {len(fallback)} line(s) are not UTF-8 (line {shown}); read them as "
                       "Windows-1252 (Excel's encoding). Re-save the file as UTF-8 to be sure of their text.")
    return lines


def read_manifest(path):
    """Rows of a manifest, format chosen by extension and header. Raises UserError on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}" + (" (it is a folder: pass the manifest file)"
                                                         if path.is_dir() else ""))
    if path.suffix in (".json", ".jsonl"):
        return _read_json_manifest(path)
    reader = csv.reader(decode_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [name.strip() for name in next(reader, [])]
    columns = {name: i for i, name in enumerate(header)}
    if {"SENTENCE_NAME", "SENTENCE"} <= set(columns):  # official how2sign_realigned_*.csv
        names = dict(id="SENTENCE_NAME", text="SENTENCE", video="VIDEO_NAME",
                     start="START_REALIGNED" if "START_REALIGNED" in columns else "START",
                     end="END_REALIGNED" if "END_REALIGNED" in columns else "END")
    elif {"id", "text"} <= set(columns):
        names = dict(id="id", text="text", video="video", start="start", end="end", duration="duration")
    else:
        raise UserError(f"{path}: unknown manifest header {header[:8]}; expected a tab-separated "
                        "header 'id<TAB>duration<TAB>text' or How2Sign's SENTENCE_NAME/SENTENCE")
    rows = []
    for line, fields in enumerate(reader, start=2):
        if not any(value.strip() for value in fields):
            continue
        row = {key: fields[columns[name]].strip() if columns.get(name, len(fields)) < len(fields) else ""
               for key, name in names.items()}          # a short row lacks its last columns: ""
        rows.append(ManifestRow(row["id"], row["text"], line, video=row["video"] or None,
                                start=float_or_none(row["start"]), end=float_or_none(row["end"]),
                                duration=float_or_none(row.get("duration"))))
    return rows


def _read_json_manifest(path):
    text = "\n".join(decode_lines(path))
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
        rows.append(ManifestRow(
            str(record.get("id", "") or "").strip(), str(record.get("text", "") or "").strip(), line,
            features=str(path.parent / str(feature_path)) if feature_path else None,
            video=str(record["video"]) if record.get("video") else None,
            start=float_or_none(record.get("start")), end=float_or_none(record.get("end")),
            duration=float_or_none(record.get("duration"))))
    return rows


def rows_from_folder(features_dir):
    """One row per clip file, id = file name without extension (--predict without a manifest)."""
    files = sorted(f for f in Path(features_dir).iterdir() if f.suffix in FEATURE_SUFFIXES)
    return [ManifestRow(f.stem, "", i, features=str(f)) for i, f in enumerate(files, start=1)]


def texts_by_id(rows):
    """{id: the different texts of its rows}: more than one means the id names a video, not a sentence."""
    texts = defaultdict(set)
    for row in rows:
        if row.id and row.text:
            texts[row.id].add(row.text)
    return texts


def screen_manifest_rows(rows, require_text=True, spans=False):
    """Keep usable rows; return (kept, skipped) with skipped = [(id, reason)].

    Real manifests have rows with an empty id, and video-level ids shared by several sentences.
    Without --feature_fps such a file would pair one clip with many texts, so every row of a shared
    id is skipped; with it (`spans=True`) each row is a span of its video and stays. Repeated rows
    are left to How2SignDataset._unique, which sees the final sample ids (spans rename them).
    """
    skipped, texts, kept = [], texts_by_id(rows), []
    for row in rows:
        if not row.id:
            skipped.append((f"<line {row.line}>", "empty id in manifest"))
        elif not row.text and require_text:
            skipped.append((row.id, "empty text in manifest"))
        elif not spans and len(texts[row.id]) > 1:
            skipped.append((row.id, f"id shared by {len(texts[row.id])} different texts"))
        else:
            kept.append(row)
    return kept, skipped


def video_level_diagnosis(rows, path):
    """A plain explanation when most rows share their id with other sentences (a manifest of videos,
    as the users' How2Sign TSVs are: VIDEO_NAME renamed to `id`, START to `duration`), else None."""
    texts = texts_by_id(rows)
    shared = {clip_id: sentences for clip_id, sentences in texts.items() if len(sentences) > 1}
    shared_rows = sum(map(len, shared.values()))
    with_id = sum(map(len, texts.values()))
    if not with_id or shared_rows * 2 < with_id:
        return None
    per_video = shared_rows / len(shared)
    text = (f"{path} lists VIDEOS, not sentences: {shared_rows} of {with_id} rows share their id with other "
            f"sentences ({len(shared)} ids, {per_video:.1f} sentences each on average), so each id names a "
            "whole video")
    values = defaultdict(list)
    for row in rows:
        if row.id in shared and row.duration is not None:
            values[row.id].append(row.duration)
    if values:
        distinct = sum(len(set(v)) == len(v) for v in values.values()) / len(values)
        reach = float(np.median([max(v) for v in values.values()]))
        if distinct >= 0.9 and reach > 20:   # sentences last seconds; a video's later ones start much later
            text += (f"; its 'duration' column looks like start times (different for every sentence of a "
                     f"video, reaching {reach:.0f} s in a typical one)")
    return (text + f". One feature file per video cannot teach {per_video:.0f} different sentences: a model "
            "trained on it learns their average. Two ways out: add --feature_fps FPS if the features were "
            "extracted at a fixed rate over each whole video (each sentence is then cut from its video by its "
            "start time), or extract per-sentence features from How2Sign's sentence clips, named by "
            "SENTENCE_NAME from how2sign_realigned_*.csv (the only way when the extractor took a fixed number "
            "of frames per video, e.g. 128 evenly spaced).")


def assign_spans(rows, path):
    """--feature_fps: set each row's video file, time span and a unique sample id, in place.

    Spans come from, in this order: start/end fields (How2Sign's CSV: START_REALIGNED/END_REALIGNED
    or START/END, file VIDEO_NAME, id SENTENCE_NAME; TSV/JSON `start`, `end`, optional `video`);
    else the users' format (`id` = video, `duration` = start second), where a sentence ends where the
    next one of its video starts and the last one at the end of the file. Returns how it read them.
    """
    rows_by_file = defaultdict(list)
    if any(row.start is not None or row.end is not None for row in rows):
        reading = "each row's start/end columns"
        for row in rows:
            rows_by_file[row.file_stem(spans=True)].append(row)
    elif any(row.duration is not None for row in rows):
        reading = ("the users' video-level format: 'id' names the video file, 'duration' is each sentence's "
                   "start second; a sentence ends where the next one of its video starts, the last one at "
                   "the end of the file")
        for row in rows:
            row.video, row.start = row.id, row.duration
            rows_by_file[row.video].append(row)
        for file_rows in rows_by_file.values():  # rows are in sentence-name order (_0, _1, _10, _2...)
            timed = sorted((r for r in file_rows if r.start is not None), key=lambda r: r.start)
            for row, following in zip(timed, timed[1:] + [None]):
                row.end = following.start if following else None
    else:
        raise UserError(f"{path}: --feature_fps needs each sentence's time in its video: 'start'/'end' columns, "
                        "How2Sign's START_REALIGNED/END_REALIGNED, or the start second in 'duration'")
    for stem, file_rows in rows_by_file.items():
        for row in file_rows:
            row.video = stem
            if row.id == stem:      # the id names the video: one id per sentence, from its start
                row.id = f"{stem}@{row.start:.2f}s" if row.start is not None else f"{stem}@line{row.line}"
    return reading


# ----------------------------------------------------------------------------------------------
# Dataset: every feature file read once; each clip (or each sentence's span of a video) keeps its
# mean frame, its length and, within the frame-cache budget, its frames


def feature_files(features_dir):
    """{file name without extension: path} of the clip files in a folder, from one listing (one call on
    Google Drive instead of a lookup per clip); .npy wins over .pt of the same name."""
    found = {}
    if not Path(features_dir).is_dir():
        raise UserError(f"features folder not found: {features_dir}")
    with os.scandir(features_dir) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if suffix in FEATURE_SUFFIXES and (stem not in found or suffix == FEATURE_SUFFIXES[0]):
                found[stem] = Path(entry.path)
    return found


@dataclass
class ClipScan:
    """One clip (or one span of a video file) as read from disk, or why it cannot be used."""
    mean: torch.Tensor | None = None      # (D,) mean over the valid frames
    first: int = 0                        # first frame in the file
    length: int = 0                       # valid frames
    dim: int = 0
    square_mean: torch.Tensor | None = None  # (D,) mean of squares, for the frame statistics
    frames: torch.Tensor | int | None = None  # where its frames are kept: an fp16 (length, D) tensor of
    error: str | None = None                  # frames minus `mean` (FrameCache), a FrameStore row, or None


class FrameCache:
    """Frames kept in memory (fp16, centred on each clip's mean so fp16 keeps their detail) up to a
    budget; clips past it are read from disk again whenever their frames are needed."""

    def __init__(self, budget_gb):
        self.left = int(budget_gb * 2 ** 30)
        self.clips = self.skipped = 0
        self.bytes = 0
        self.lock = threading.Lock()

    def keep(self, frames, mean, first=None, square_mean=None):
        size = frames.numel() * 2
        with self.lock:
            if size > self.left:
                self.skipped += 1
                return None
            self.left -= size
            self.bytes += size
            self.clips += 1
        return (frames - mean).to(torch.float16)


FRAME_STORE_VERSION = 1
CACHE_ENV = "SONAR_T5_CACHE"


def default_cache_dir():
    """Where frame stores live: $SONAR_T5_CACHE, else the user's cache folder ($XDG_CACHE_HOME or
    ~/.cache, as Hugging Face does) / train_sonar_with_t5. On Colab that is the VM's local disk."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "train_sonar_with_t5"


@contextlib.contextmanager
def exclusive_lock(path):
    """An advisory lock on `path` (one builder per store on this machine: torchrun's other processes
    wait for it, then open what it built). Without fcntl (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FrameStore:
    """Every clip's frames, read once from the clip files into one memory-mapped file on local disk.

    A folder: `frames.f16` (each clip's valid frames minus its mean, fp16, one after the other),
    `index.npz` (per stored clip: offset, length, first frame, dim, mean and mean of squares) and
    `meta.json` (per (file, span) of the dataset: its row or why it is unusable). Plain arrays and
    JSON: nothing in it can run code. Its name is a fingerprint of what it was built from (each clip
    file's path, size and modification time, the spans, --feature_fps, trimming), so a changed file,
    manifest or flag builds a new store instead of reading a stale one. Built in a temporary folder
    and renamed into place when complete: a killed build leaves no store that looks complete. Every
    process maps the same file, so the page cache holds one copy per machine, not one per process.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        with np.load(self.folder / "index.npz", allow_pickle=False) as index:
            self.index = {name: index[name] for name in index.files}
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._frames = None

    @staticmethod
    def fingerprint(spans_by_file, trim_zero_frames, fps, io_threads=8):
        """sha256 of what the store's contents follow from; each file's size and mtime (one stat each)."""
        def stat(path):
            try:
                info = os.stat(path)
                return [info.st_size, info.st_mtime_ns]
            except OSError:
                return None
        paths = sorted(spans_by_file)          # any order of the same clips (a manifest, --predict's folder)
        with ThreadPoolExecutor(max_workers=max(4 * io_threads, 1)) as pool:   # stats on Google Drive wait too
            stats = list(pool.map(stat, paths))
        payload = [FRAME_STORE_VERSION, bool(trim_zero_frames), fps,
                   [[os.path.abspath(path), info, spans_by_file[path]] for path, info in zip(paths, stats)]]
        sizes = sum(info[0] for info in stats if info)
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest(), sizes

    @property
    def frames_file(self):
        """The fp16 frames, memory-mapped on first use (in each process: a DataLoader worker maps its own)."""
        if self._frames is None:
            self._frames = np.memmap(self.folder / "frames.f16", dtype=np.float16, mode="r")
        return self._frames

    def __getstate__(self):
        return {**self.__dict__, "_frames": None}

    @property
    def nbytes(self):
        return (self.folder / "frames.f16").stat().st_size

    def residual(self, row):
        """(length, D) fp16 frames minus the clip's mean."""
        offsets = self.index["offsets"]
        flat = self.frames_file[offsets[row]: offsets[row + 1]]
        return torch.from_numpy(np.array(flat)).view(-1, int(self.index["dims"][row]))

    def scans(self, spans_by_file):
        """The ClipScans of these files, as they were read when the store was built (no file opened)."""
        index, grouped = self.index, []
        for path in spans_by_file:
            file_scans = self.meta["scans"][os.path.abspath(path)]
            group = []
            for entry in file_scans:
                if isinstance(entry, str):
                    group.append(ClipScan(error=entry))
                    continue
                d, at = int(index["dims"][entry]), int(index["stat_offsets"][entry])
                group.append(ClipScan(torch.from_numpy(index["means"][at: at + d].copy()), int(index["firsts"][entry]),
                                      int(index["lengths"][entry]), d,
                                      torch.from_numpy(index["square_means"][at: at + d].copy()), entry))
            grouped.append(group)
        for name in ("means", "square_means", "firsts", "stat_offsets"):     # in the dataset now: free them
            self.index.pop(name)
        return grouped


class FrameStoreBuilder:
    """Writes a FrameStore while the clip files are scanned (a FrameCache-like `keep`), then renames it
    into place. A full disk is a UserError naming the folder and the space needed."""

    def __init__(self, folder, needed_bytes):
        self.folder, self.needed = Path(folder), needed_bytes
        for stale in self.folder.parent.glob(f".{self.folder.name}.building-*"):   # killed builds (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.folder.parent / f".{self.folder.name}.building-{os.getpid()}"
        self.tmp.mkdir(parents=True)
        self.handle = open(self.tmp / "frames.f16", "wb")
        self.lock = threading.Lock()
        self.rows, self.written = [], 0      # rows: (offset, length, first, dim, mean, square_mean)

    def disk_full(self):
        return UserError(f"disk full while building the frame store in {self.folder.parent}: it needs about "
                         f"{self.needed / 2 ** 30:.1f} GB; free space there, or put the store elsewhere with "
                         f"--cache_dir DIR (or {CACHE_ENV}=DIR); nothing in --output_dir was changed")

    def keep(self, frames, mean, first, square_mean):
        data = (frames - mean).to(torch.float16).numpy().tobytes()
        with self.lock:
            try:
                self.handle.write(data)
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self.disk_full() from None
                raise
            self.rows.append((self.written // 2, frames.shape[0], first, frames.shape[1], mean, square_mean))
            self.written += len(data)
            return len(self.rows) - 1

    def finish(self, spans_by_file, scanned):
        """Index, meta and rename; returns the opened FrameStore."""
        rows = self.rows
        dims = np.array([r[3] for r in rows], dtype=np.int64)
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            empty = np.zeros(0, dtype=np.float32)
            np.savez(self.tmp / "index.npz",
                     offsets=np.array([r[0] for r in rows] + [self.written // 2], dtype=np.int64),
                     lengths=np.array([r[1] for r in rows], dtype=np.int64),
                     firsts=np.array([r[2] for r in rows], dtype=np.int64), dims=dims,
                     stat_offsets=np.concatenate([[0], np.cumsum(dims)]).astype(np.int64),
                     means=np.concatenate([r[4].numpy() for r in rows]) if rows else empty,
                     square_means=np.concatenate([r[5].numpy() for r in rows]) if rows else empty)
            scans = {os.path.abspath(path): [scan.frames if scan.error is None else scan.error for scan in group]
                     for path, group in zip(spans_by_file, scanned)}
            (self.tmp / "meta.json").write_text(json.dumps({"version": FRAME_STORE_VERSION, "clips": len(rows),
                                                            "scans": scans}))
            os.replace(self.tmp, self.folder)
        except OSError as error:
            self.abandon()
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.disk_full() from None
            raise
        return FrameStore(self.folder)

    def abandon(self):
        with contextlib.suppress(OSError):
            self.handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def scan_files(spans_by_file, trim_zero_frames, fps, keep=None, io_threads=8, progress=False, split="data"):
    """Read every feature file once, in parallel (Google Drive is latency bound): a list of ClipScans per file."""
    def read(item):
        return scan_file(item[0], item[1], trim_zero_frames, fps, keep)

    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        return list(tqdm(pool.map(read, spans_by_file.items()), total=len(spans_by_file),
                         desc=f"reading {split} files", disable=not progress, leave=False))


def scan_into_store(spans_by_file, trim_zero_frames, fps, cache_dir, io_threads=8, progress=False, split="data"):
    """(ClipScans per file, FrameStore): the store built from these files if there is one, else built
    now by reading every file once. One builder per store on a machine (a file lock)."""
    key, sizes = FrameStore.fingerprint(spans_by_file, trim_zero_frames, fps, io_threads)
    root = Path(cache_dir) / "frames"
    folder = root / key[:32]
    with exclusive_lock(root / f".{folder.name}.lock"):
        if (folder / "meta.json").is_file():
            store = FrameStore(folder)
            logger.info(f"{split}: frames from the store {folder} ({store.nbytes / 2 ** 30:.2f} GB); no clip file read")
            return store.scans(spans_by_file), store
        needed = sizes // 2 + 2 ** 20          # fp16 copies of float32 files, at most
        try:
            root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(root).free
        except OSError as error:
            raise UserError(f"cannot create the frame store folder {root} ({first_line(error)}): set --cache_dir DIR "
                            f"(or {CACHE_ENV}=DIR) to a writable local folder") from None
        if free < needed:
            raise UserError(f"not enough disk space for the frame store in {root}: it needs about "
                            f"{needed / 2 ** 30:.1f} GB, {free / 2 ** 30:.1f} GB are free; free space there or set "
                            f"--cache_dir DIR (or {CACHE_ENV}=DIR) to a local disk with room")
        started = time.time()
        builder = FrameStoreBuilder(folder, needed)
        try:
            scanned = scan_files(spans_by_file, trim_zero_frames, fps, builder.keep, io_threads, progress, split)
            store = builder.finish(spans_by_file, scanned)
        except BaseException:
            builder.abandon()
            raise
        logger.info(f"{split}: frame store built in {time.time() - started:.0f} s: {folder} "
                    f"({store.nbytes / 2 ** 30:.2f} GB); later runs, --resume and --predict read it instead of the clip files")
        return store.scans(spans_by_file), store        # as a later run will see them


def scan_file(path, spans, trim_zero_frames, fps=None, keep=None):
    """Read a feature file once: one ClipScan per span ((start, end) seconds; None = the whole file).
    `keep(frames, mean, first, square_mean)` (a FrameCache's or a FrameStoreBuilder's) keeps the frames."""
    def failed(reason):
        return [ClipScan(error=reason) for _ in spans]

    if path is None or not Path(path).is_file():
        return failed(f"missing feature file ({path})")
    try:
        features = load_clip_features(path)
    except Exception as error:  # noqa: BLE001 - any read failure is reported, never raised
        return failed(f"unreadable feature file ({first_line(error)[:120]})")
    if features.numel() and not torch.isfinite(features).all():
        return failed("clip has NaN/Inf values")
    total = valid_length(features) if trim_zero_frames else features.shape[0]
    if total == 0 or features.shape[1] == 0:
        return failed("empty clip (no frames)")
    scans = []
    for span in spans:
        first, stop = 0, total
        if span is not None:
            start, end = span
            if start is None:
                scans.append(ClipScan(error="no start time in manifest"))
                continue
            if end is not None and end < start:
                scans.append(ClipScan(error=f"reversed span (start {start:.2f} s, end {end:.2f} s)"))
                continue
            first = round(start * fps)
            stop = total if end is None else min(round(end * fps), total)
            if first >= total:
                scans.append(ClipScan(error=f"span past the end of the file (starts at {start:.2f} s; the file "
                                            f"holds {total / fps:.2f} s at {fps:g} features/s)"))
                continue
            if stop <= first:
                scans.append(ClipScan(error=f"empty span ({start:.2f}-{end:.2f} s holds no frame at "
                                            f"{fps:g} features/s)"))
                continue
        frames = features[first:stop].double()
        mean, square_mean = frames.mean(dim=0).float(), frames.pow(2).mean(dim=0).float()
        scans.append(ClipScan(mean, first, stop - first, features.shape[1], square_mean,
                              keep(features[first:stop], mean, first, square_mean) if keep else None))
    return scans


class How2SignDataset(Dataset):
    """Clips and their sentences, read once and validated.

    How2SignDataset("data/How2Sign_val.json")                   # JSON / JSONL with feature paths
    How2SignDataset("manifests/val.tsv", "features/val")       # TSV or How2Sign CSV + folder
    How2SignDataset("features/val", "manifests/val.tsv")       # the original module's order
    How2SignDataset("manifests/val.tsv", "videos/val", feature_fps=24)   # one file per whole video

    Every feature file is read once, into a FrameStore on local disk (`cache_dir`, default
    default_cache_dir()): a later dataset of the same files (another run, --resume, --predict, each
    torchrun process) opens the store instead of any clip file. Each usable clip keeps in memory its
    mean frame (the encoder's first step is a mean over time) and its length; its frames are read from
    the memory-mapped store when an item needs them (`return_frames`, the default: the default model
    reads the frames). With `frame_store=False` the files are read as before, frames kept in memory
    as fp16 up to `frame_cache_gb` and read again past it. With `feature_fps`, files hold whole videos and every
    manifest row is its own sample: its span of the video. Problem rows and clips are skipped and
    listed in `self.skipped`. Items are fixed-size, so PyTorch's default collate batches them.
    """

    def __init__(self, manifest, features_dir=None, max_samples=None, *, feature_dim=None, split="data",
                 strict=False, return_frames=None, trim_zero_frames=True, require_text=True,
                 feature_fps=None, frame_store=True, cache_dir=None, frame_cache_gb=4.0, io_threads=8, progress=False):
        if manifest is not None and Path(manifest).is_dir() and (features_dir is None or Path(features_dir).is_file()):
            manifest, features_dir = features_dir, manifest   # the original (features_dir, manifest_path)
        if features_dir is not None and Path(features_dir).is_file():
            raise UserError(f"{features_dir} is a file, not a folder of clips: pass the folder that holds "
                            "<id>.npy / <id>.pt files")
        self.manifest, self.split = str(manifest or features_dir), split
        self.return_frames = True if return_frames is None else bool(return_frames)   # the default model reads frames
        self.trim_zero_frames = trim_zero_frames
        self.feature_fps = feature_fps
        rows = read_manifest(manifest) if manifest is not None else rows_from_folder(features_dir)
        self.diagnosis = None if feature_fps else video_level_diagnosis(rows, manifest)
        kept, self.skipped = screen_manifest_rows(rows, require_text, spans=bool(feature_fps))
        self.span_reading = assign_spans(kept, manifest) if feature_fps else None
        kept = self._unique(kept)
        if max_samples:
            kept = kept[:max_samples]
        files, listing = defaultdict(list), None     # feature file -> its rows, so each file is read once
        for row in kept:
            if row.features:
                path = row.features
            elif features_dir is None:
                raise UserError(f"{manifest}: rows have no 'features' path; pass the features folder")
            else:
                stem = row.file_stem(spans=bool(feature_fps))
                listing = listing if listing is not None else feature_files(features_dir)
                found = listing.get(stem)
                path = str(found) if found else str(Path(features_dir) / f"{stem}.npy|.pt")
            files[path].append(row)
        spans_by_file = {path: [(row.start, row.end) if feature_fps else None for row in file_rows]
                         for path, file_rows in files.items()}
        cache = self.store = None
        if frame_store:
            scanned, self.store = scan_into_store(spans_by_file, trim_zero_frames, feature_fps,
                                                  cache_dir or default_cache_dir(), io_threads, progress, split)
        else:
            cache = FrameCache(frame_cache_gb) if self.return_frames else None
            scanned = scan_files(spans_by_file, trim_zero_frames, feature_fps, cache.keep if cache else None,
                                 io_threads, progress, split)
        results = [(row, path, scan) for (path, file_rows), scans in zip(files.items(), scanned)
                   for row, scan in zip(file_rows, scans)]
        results.sort(key=lambda item: item[0].line)           # manifest order
        self.dim_counts = Counter(scan.dim for _, _, scan in results if not scan.error)
        self.feature_dim = feature_dim or (self.dim_counts.most_common(1)[0][0] if self.dim_counts else None)
        self.ids, self.texts, self.paths, self.first_frames, self.stored = [], [], [], [], []
        means, lengths = [], []
        frame_sum = frame_square_sum = 0
        for row, path, scan in results:
            if not scan.error and scan.dim != self.feature_dim:
                scan.error = f"wrong feature dimension ({scan.dim}, expected {self.feature_dim})"
            if scan.error:
                self.skipped.append((row.id, scan.error))
                continue
            self.ids.append(row.id)
            self.texts.append(row.text)
            self.paths.append(path)
            self.first_frames.append(scan.first)
            self.stored.append(scan.frames)
            means.append(scan.mean)
            lengths.append(scan.length)
            frame_sum = frame_sum + scan.mean.double() * scan.length
            frame_square_sum = frame_square_sum + scan.square_mean.double() * scan.length
        if feature_dim and self.dim_counts and feature_dim not in self.dim_counts:
            dims = "/".join(str(d) for d in sorted(self.dim_counts))
            raise UserError(f"{split}: the clips are {dims}-d but {feature_dim}-d features are expected (the "
                            "encoder's input): use the features the model was trained on")
        if strict and self.skipped:
            clip_id, reason = self.skipped[0]
            raise UserError(f"{split}: {len(self.skipped)} unusable rows/clips (--strict), first: "
                            f"{clip_id}: {reason}")
        if not self.ids:
            raise UserError(f"{split}: no usable clips in {manifest or features_dir} ({len(self.skipped)} skipped"
                            + (f": {self.skip_summary_kinds()}" if self.skipped else "") + "). "
                            + (self.diagnosis or "Run with --check to see why."))
        self.clip_means = torch.stack(means)                      # (N, D)
        self.lengths = torch.tensor(lengths, dtype=torch.long)    # (N,)
        self.max_frames = int(self.lengths.max())
        frames = float(self.lengths.sum())
        self.frame_mean = (frame_sum / frames).float()            # (D,) over every valid frame
        self.frame_std = (frame_square_sum / frames - (frame_sum / frames) ** 2).clamp(min=0).sqrt().float()
        self.cache = cache
        self.label_ids = None               # filled by tokenize()
        self.sentence_embeddings = None     # filled by the frozen-encoder cache

    def _unique(self, rows):
        """Rows whose sample id is new; a repeated id (the same span twice) is skipped and listed."""
        seen, unique = set(), []
        for row in rows:
            if row.id in seen:
                self.skipped.append((row.id, "duplicate manifest row"))
            else:
                seen.add(row.id)
                unique.append(row)
        return unique

    def __len__(self):
        return len(self.ids)

    def manifest_rows(self):
        """Rows read from the manifest: the samples plus every skipped row or clip."""
        return len(self) + len(self.skipped)

    def lost_share(self):
        """Share of the manifest's rows that did not become a sample (compared with --max_skip_share)."""
        return len(self.skipped) / self.manifest_rows()

    def skip_kinds(self):
        """Skipped rows/clips counted by kind."""
        return Counter(skip_kind(reason) for _, reason in self.skipped)

    def skip_summary_kinds(self):
        return "; ".join(f"{count} {kind}" for kind, count in self.skip_kinds().most_common())

    def tokenize(self, tokenizer, max_target_length):
        """Tokenise every target once (not at every step). `tokenizer`: a Hugging Face tokenizer, or the
        model (SONARwithT5.target_ids: a multilingual decoder's targets start with the language code)."""
        rows = (tokenizer.target_ids(self.texts, max_target_length) if hasattr(tokenizer, "target_ids") else
                tokenizer(self.texts, max_length=max_target_length, truncation=True)["input_ids"])
        self.label_lengths = torch.tensor([len(ids) for ids in rows])
        self.label_ids = padded_labels(rows)

    def frames(self, index):
        """(length, D) float32 frames of one sample: from the cache, else read from its file again."""
        stored = self.stored[index]
        if stored is not None:
            residual = self.store.residual(stored) if isinstance(stored, int) else stored
            return residual.float() + self.clip_means[index]
        first, length = self.first_frames[index], int(self.lengths[index])
        try:
            frames = load_clip_features(self.paths[index])[first: first + length]
        except Exception as error:  # noqa: BLE001 - the file was readable at start-up
            raise UserError(f"{self.paths[index]}: could not read this clip again ({first_line(error)[:120]}); "
                            "was the file changed or the Drive disconnected? Rerun with --resume, or give "
                            "--frame_cache_gb enough memory to keep every clip's frames") from None
        if frames.shape[0] != length:
            raise UserError(f"{self.paths[index]}: the file changed during training (now {frames.shape[0]} frames "
                            f"from frame {first}, was {length}); rerun with --resume")
        return frames

    def __getitem__(self, index):
        item = {"index": index, "id": self.ids[index], "text": self.texts[index],
                "clip_mean": self.clip_means[index], "length": self.lengths[index]}
        if self.sentence_embeddings is not None:
            item["sentence_embedding"] = self.sentence_embeddings[index]
        # Frames and labels are padded to the dataset's longest so default collate stacks them;
        # collate_clips trims them back to the batch's longest.
        if self.return_frames:
            frames = self.frames(index)
            item["features"] = F.pad(frames, (0, 0, 0, self.max_frames - frames.shape[0]))
        if self.label_ids is not None:
            item["labels"] = self.label_ids[index]
        return item


def padded_labels(rows):
    """Token id lists as one (N, longest) tensor, padded with -100 (left out of the loss)."""
    labels = torch.full((len(rows), max(len(row) for row in rows)), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)
    return labels


def skip_kind(reason):
    """Skip reasons read "kind (detail)": the kind groups them in reports."""
    return reason.split(" (")[0]


def collate_clips(items):
    """Default collate, then frames and -100-padded labels trimmed to the batch's longest (dynamic padding)."""
    batch = default_collate(items)
    if "labels" in batch:
        batch["labels"] = batch["labels"][:, : int((batch["labels"] != -100).sum(dim=1).max())].contiguous()
    if "features" in batch:
        batch["features"] = batch["features"][:, : int(batch["length"].max())].contiguous()
    return batch


def collate_fn(items):
    """The original module's collate: {"video_ids", "features" (B, 300, D) zero-padded or cut, "texts"}.
    Needs items with frames (How2SignDataset(features_dir, manifest) or return_frames=True)."""
    if "features" not in items[0]:
        raise UserError("collate_fn needs each clip's frames: build the dataset with return_frames=True")
    frames = [item["features"][: int(item["length"])][:ORIGINAL_PAD_FRAMES] for item in items]
    return {"video_ids": [item["id"] for item in items], "texts": [item["text"] for item in items],
            "features": torch.stack([F.pad(f, (0, 0, 0, ORIGINAL_PAD_FRAMES - f.shape[0])) for f in frames])}


def skip_summary(dataset):
    """One console line per split: how many rows/clips were skipped, why, and the first ids."""
    if not dataset.skipped:
        return None
    first = ", ".join(clip_id for clip_id, _ in dataset.skipped[:5])
    return (f"{dataset.split}: skipped {len(dataset.skipped)} rows/clips ({dataset.skip_summary_kinds()}); "
            f"first: {first}")


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
    if linear != list(range(0, 3 * len(linear), 3)):
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
# Bridges: the standardised sentence embedding (and, optionally, the frames) -> T5 input embeddings.
# Every kind keeps the guide's `expander` (the learnable queries); kinds with attention expose the
# guide's `attention_bridge` (their first nn.MultiheadAttention).


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


class FrameEncoder(nn.Module):
    """Frames standardised per dimension with training-set statistics, then temporal striding: a window
    of `kernel` consecutive frames, every `stride` frames, projected into one token (a linear map of the
    stacked frames, i.e. a 1-D convolution: order within the window is kept), with positions.
    stride 1, kernel 1: one token per frame."""

    def __init__(self, frame_dim, d_model, stride=1, kernel=None):
        super().__init__()
        self.stride, self.kernel = stride, kernel or stride
        self.register_buffer("window", torch.tensor([self.stride, self.kernel]))   # saved: a state dict says its shape
        self.register_buffer("frame_mean", torch.zeros(frame_dim))
        self.register_buffer("frame_std", torch.ones(frame_dim))
        self.frame_projection = nn.Linear(self.kernel * frame_dim, d_model)
        self.frame_norm = nn.LayerNorm(d_model)

    def forward(self, frames, lengths):      # (B, T, D), (B,) -> (B, T', d), padding mask (B, T'); T' = ceil(T / stride)
        lengths = lengths.to(self.frame_mean.device)
        frames = (frames.to(self.frame_mean.device, self.frame_projection.weight.dtype) - self.frame_mean) / self.frame_std
        batch, length, dim = frames.shape
        valid = torch.arange(length, device=frames.device)[None] < lengths[:, None]
        frames = frames * valid[..., None]                           # padding is 0 inside the last window too
        steps = -(-length // self.stride)                            # windows start at 0, s, 2s, ... < T
        frames = F.pad(frames, (0, 0, 0, (steps - 1) * self.stride + self.kernel - length))
        windows = frames.unfold(1, self.kernel, self.stride)         # (B, T', D, kernel)
        tokens = self.frame_projection(windows.transpose(2, 3).reshape(batch, steps, self.kernel * dim))
        tokens = self.frame_norm(tokens + sinusoidal_positions(tokens.shape[1], tokens.shape[-1], tokens.device))
        kept = torch.div(lengths + self.stride - 1, self.stride, rounding_mode="floor")
        return tokens, torch.arange(tokens.shape[1], device=tokens.device)[None] >= kept[:, None]


class FrameMemory(nn.Module):
    """--frame_route cross_attention: the frame tokens as memory of their own for the decoder's
    cross-attention, beside what its encoder makes of the bridge's tokens. The decoder's encoder then
    reads 32 tokens, not 32 + T: a frame token costs each decoder layer a key and a value instead of a
    pass through every encoder layer. `layers` pre-norm self-attention layers give the frame tokens
    context first (feed-forward width: --frame_memory_ff_dim, or the bridge's); with
    --frame_memory_divisor N > 1 they run at d_model / N, between a projection down and one back up whose
    output is added to the tokens (N² times less work per token in the layers). `scale` starts at the
    RMS of the decoder encoder's own output."""

    def __init__(self, d_model, options, bridge_ff_dim, scale):
        super().__init__()
        divisor, heads = options["frame_memory_divisor"], options["num_heads"]
        width = d_model // divisor
        if d_model % divisor or width % heads:
            raise UserError(f"--frame_memory_divisor {divisor}: the frame layers' width d_model / {divisor} must be "
                            f"a whole number divisible by --num_heads {heads} (d_model is {d_model})")
        ff_dim = options["frame_memory_ff_dim"] or bridge_ff_dim // divisor
        projected = divisor > 1 and options["frame_memory_layers"] > 0
        self.down, self.up = (nn.Linear(d_model, width), nn.Linear(width, d_model)) if projected else (None, None)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, ff_dim, options["bridge_dropout"],
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(options["frame_memory_layers"]))
        self.norm = nn.LayerNorm(d_model)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, tokens, padding):      # (B, T, d), (B, T) -> (B, T, d), attention mask (B, T)
        context = tokens if self.down is None else self.down(tokens)
        for layer in self.layers:
            context = layer(context, src_key_padding_mask=padding)
        tokens = context if self.up is None else tokens + self.up(context)
        return self.norm(tokens) * self.scale, (~padding).long()


class Bridge(nn.Module):
    """What every bridge shares: input standardisation, the `expander` queries, the output scale."""

    uses_attention = True

    def __init__(self, embed_dim, d_model, options, frame_dim, output_scale):
        super().__init__()
        self.standardize = options["standardize"]
        self.register_buffer("embedding_mean", torch.zeros(embed_dim))
        self.register_buffer("embedding_std", torch.ones(embed_dim))
        self.expander = nn.Parameter(torch.randn(options["num_queries"], d_model))   # the learnable queries
        self.ff_dim = options["bridge_ff_dim"] or 4 * d_model
        self.frame_encoder = (FrameEncoder(frame_dim, d_model, options["frame_stride"], options["frame_kernel"])
                              if options["frame_attention"] else None)
        self.frame_memory = None             # FrameMemory with --frame_route cross_attention (SONARwithT5.make_bridge)
        self.output_norm = nn.LayerNorm(d_model) if options["bridge_layernorm"] else nn.Identity()
        # Pretrained T5 embeddings are large (std ~ 11.6 for t5-v1_1): LayerNorm-scale inputs would be
        # drowned by its layers' outputs, so the output scale starts at T5's own embedding scale.
        self.output_scale = nn.Parameter(torch.tensor(output_scale if options["bridge_layernorm"] else 1.0))

    def make_blocks(self, d_model, options, guide=False):
        return nn.ModuleList(BridgeBlock(d_model, options["num_heads"], self.ff_dim, options["bridge_dropout"],
                                         guide=guide) for _ in range(options["bridge_layers"]))

    def make_prefix_mlp(self, embed_dim, options):
        """embedding (E) -> one token of content per query (Q x d_model)."""
        hidden = options["prefix_dim"] or self.ff_dim
        return nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Dropout(options["bridge_dropout"]),
                             nn.Linear(hidden, self.expander.numel()))

    def prefix_queries(self, embedding):                                           # (B, E) -> (B, Q, d)
        return self.expander + self.prefix_mlp(embedding).view(len(embedding), *self.expander.shape)

    @property
    def attention_bridge(self):
        return self.blocks[0].attention if self.uses_attention else None

    @property
    def projection(self):
        """The original module's `projection`: the layer that first maps the sentence embedding towards
        T5's width (memory tokens, or the prefix MLP's first layer)."""
        return self.memory_projection if hasattr(self, "memory_projection") else self.prefix_mlp[0]

    @torch.no_grad()
    def fit_standardizer(self, embeddings, frame_mean=None, frame_std=None):
        """Per-dimension statistics of the training set, stored as buffers (saved in checkpoints)."""
        embeddings = embeddings.float().to(self.embedding_mean.device)
        self.embedding_mean.copy_(embeddings.mean(dim=0))
        self.embedding_std.copy_(embeddings.std(dim=0, unbiased=False).clamp(min=1e-6)
                                 if len(embeddings) > 1 else torch.ones_like(self.embedding_std))
        if self.frame_encoder is not None and frame_mean is not None:
            self.frame_encoder.frame_mean.copy_(frame_mean)
            self.frame_encoder.frame_std.copy_(frame_std.clamp(min=1e-6))

    def forward(self, sentence_embedding, frame_tokens=None, frame_padding=None):  # (B, E) -> (B, Q, d)
        """`frame_tokens`/`frame_padding`: the frame encoder's output, for bridges with --frame_attention."""
        embedding = sentence_embedding.to(self.expander.dtype)
        if self.standardize:
            # Clips' embeddings share most of their direction (cosine ~0.99); standardising per
            # dimension makes the small per-clip differences the signal.
            embedding = (embedding - self.embedding_mean) / self.embedding_std
        return self.output_norm(self.tokens(embedding, frame_tokens, frame_padding)) * self.output_scale

    def attend(self, queries, memory, frame_tokens, frame_padding):
        """Queries read the memory tokens (and the frames, when given) through the bridge blocks."""
        padding = None
        if frame_tokens is not None:
            memory = torch.cat([memory, frame_tokens], dim=1)                         # (B, M + T, d)
            padding = F.pad(frame_padding, (memory.shape[1] - frame_tokens.shape[1], 0), value=False)
        for block in self.blocks:
            queries = block(queries, memory, padding)
        return queries


class MemoryBridge(Bridge):
    """`expander` queries attend to `memory_tokens` tokens projected from the embedding."""

    def __init__(self, embed_dim, d_model, options, frame_dim, output_scale):
        super().__init__(embed_dim, d_model, options, frame_dim, output_scale)
        memory_tokens = options["memory_tokens"]
        self.memory_projection = nn.Linear(embed_dim, memory_tokens * d_model)
        self.memory_positions = nn.Parameter(torch.randn(memory_tokens, d_model) * 0.02)
        self.memory_norm = nn.LayerNorm(d_model)
        self.blocks = self.make_blocks(d_model, options)

    def memory(self, embedding):                                                    # (B, E) -> (B, M, d)
        memory = self.memory_projection(embedding).view(len(embedding), -1, self.expander.shape[1])
        return self.memory_norm(memory + self.memory_positions)

    def tokens(self, embedding, frame_tokens, frame_padding):
        queries = self.expander.expand(len(embedding), -1, -1)                     # (B, Q, d)
        return self.attend(queries, self.memory(embedding), frame_tokens, frame_padding)


class PrefixMemoryBridge(MemoryBridge):
    """The default. Each query gets its own content from the embedding (a prefix MLP, as --bridge
    prefix), then refines it by attending to the memory tokens (and frames) through the blocks."""

    def __init__(self, embed_dim, d_model, options, frame_dim, output_scale):
        super().__init__(embed_dim, d_model, options, frame_dim, output_scale)
        self.prefix_mlp = self.make_prefix_mlp(embed_dim, options)

    def tokens(self, embedding, frame_tokens, frame_padding):
        return self.attend(self.prefix_queries(embedding), self.memory(embedding), frame_tokens, frame_padding)


class PrefixBridge(Bridge):
    """No attention: an MLP maps the embedding to one token per query, added to `expander`."""

    uses_attention = False

    def __init__(self, embed_dim, d_model, options, frame_dim, output_scale):
        super().__init__(embed_dim, d_model, options, frame_dim, output_scale)
        self.prefix_mlp = self.make_prefix_mlp(embed_dim, options)

    def tokens(self, embedding, frame_tokens, frame_padding):
        return self.prefix_queries(embedding)


class GuideBridge(Bridge):
    """The guide's bridge: `expander` queries attend to ONE projected token. With one key, softmax
    gives every query weight 1, so all query positions carry the same vector. Not standardised."""

    def __init__(self, embed_dim, d_model, options, frame_dim, output_scale):
        super().__init__(embed_dim, d_model, {**options, "standardize": False}, frame_dim, output_scale)
        self.memory_projection = nn.Linear(embed_dim, d_model)                     # one key/value token
        self.blocks = self.make_blocks(d_model, options, guide=True)

    def tokens(self, embedding, frame_tokens, frame_padding):
        queries = self.expander.expand(len(embedding), -1, -1)
        return self.attend(queries, self.memory_projection(embedding).unsqueeze(1), frame_tokens, frame_padding)


BRIDGES = {"prefix_memory": PrefixMemoryBridge, "memory": MemoryBridge, "prefix": PrefixBridge,
           "guide": GuideBridge}


# ----------------------------------------------------------------------------------------------
# The decoder (--t5_model, name kept from the guide): any encoder-decoder AutoModelForSeq2SeqLM loads
# (t5, T5 v1.1, flan-t5, mT5, BART, mBART-50, M2M100, NLLB-200). T5 v1.1 / flan-t5 / mT5 have an
# output head (lm_head) of their own; t5-small ties it to the input embedding and scales the decoder
# output. transformers 5.x always builds the two tied from a config and records the difference in
# `scale_decoder_outputs`; 4.x reads `tie_word_embeddings`. The helpers below keep an untied model
# untied under both. Multilingual models (NLLB, mBART-50, M2M100) start every target sentence with
# a language code (--target_lang).

T5_FAMILY = ("t5", "mt5")    # an output head of their own where the config says untied (T5 v1.1, flan-t5, mT5)
LANGUAGE_CODE = re.compile(r"^(?:[a-z]{3}_[A-Z][a-z]{3}|[a-z]{2}_[A-Z]{2}|__[a-z]{2,3}__)$")  # eng_Latn en_XX __en__
ENGLISH_CODES = ("eng_Latn", "en_XX", "en")
TIED_WEIGHT = re.compile(r"(embed_tokens|lm_head|shared)\.weight$")


def unloadable_decoder(name_or_path, error):
    return UserError(f"cannot load the decoder '{name_or_path}': {first_line(error)} "
                     "(offline? pass a local folder saved with save_pretrained)")


def decoder_config(name_or_path):
    """The decoder's config (no weights read); anything that is not an encoder-decoder is refused in one line."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as error:
        raise unloadable_decoder(name_or_path, error) from None
    if not getattr(config, "is_encoder_decoder", False):
        raise UserError(f"--t5_model '{name_or_path}' is a {config.model_type} model, not an encoder-decoder: "
                        "give a sequence-to-sequence model (t5, flan-t5, mT5, BART, mBART-50, M2M100, NLLB-200)")
    return config


def load_t5(name_or_path):
    """Model and tokenizer from a hub name (t5-small, facebook/nllb-200-distilled-600M, ...) or a local
    folder. Anything that is not an encoder-decoder, or whose files lack weights, is refused in one line."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    decoder_config(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        t5, info = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise unloadable_decoder(name_or_path, error) from None
    missing = sorted(key for key in info.get("missing_keys", ()) if not TIED_WEIGHT.search(key))
    if len(missing) > len(t5.state_dict()) // 2:
        raise UserError(f"decoder '{name_or_path}': {len(missing)} of its weights are not in its files (e.g. "
                        f"{missing[0]}) and would start random: its config and weights do not belong together")
    if missing:
        logger.warning(f"decoder '{name_or_path}': {len(missing)} weights not in its files start random: "
                       + ", ".join(missing[:5]))
    return t5, tokenizer


def uses_t5_loss(config):
    """T5 is run stack by stack, its head only on target tokens. Not mT5: transformers 5.x's MT5 never scales
    the decoder output, 4.x's does when tied, so its own loss (the model's forward) is the safe one."""
    return config.model_type == "t5"


def config_is_untied(config_dict):
    return config_dict.get("tie_word_embeddings") is False or config_dict.get("scale_decoder_outputs") is False


def is_untied(t5):
    t5 = unwrapped(t5)
    return t5.get_output_embeddings().weight is not t5.get_input_embeddings().weight


def scales_decoder_output(config):
    """Whether T5 multiplies the decoder output by d_model ** -0.5 before the head (tied models)."""
    return bool(getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)))


def portable_t5_config(t5):
    """The model's config as a dict that 4.x and 5.x both read the same way (an untied T5 stays untied)."""
    config = json.loads(t5.config.to_json_string())
    if config.get("model_type", "t5") in T5_FAMILY and is_untied(t5):
        config.update(tie_word_embeddings=False, scale_decoder_outputs=False)
    return config


def t5_from_config(config_dict, untied=None):
    """A model built from a saved config (any family; T5 by default), with a separate output head when
    the model had one."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    untied = config_is_untied(config_dict) if untied is None else untied
    model_type = config_dict.get("model_type", "t5")
    config = {k: v for k, v in config_dict.items() if k not in ("scale_decoder_outputs", "model_type")}
    if model_type in T5_FAMILY or untied:
        config["tie_word_embeddings"] = not untied
    t5 = AutoModelForSeq2SeqLM.from_config(type(AutoConfig.for_model(model_type)).from_dict(config))
    if untied and not is_untied(t5):   # 5.x ties whatever the config says
        t5.lm_head.weight = nn.Parameter(t5.get_input_embeddings().weight.detach().clone())
    return t5


def save_t5_export(t5, tokenizer, folder, weights):
    """Tokenizer + config (+ weights) loadable with from_pretrained under 4.x and 5.x. A model with LoRA
    adapters is written merged (plain weights, no PEFT needed to load it)."""
    tokenizer.save_pretrained(folder)
    settings = Path(folder) / "tokenizer_config.json"
    tokenizer_config = json.loads(settings.read_text())
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":  # 5.x's name; 4.x knows the same class as
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # PreTrainedTokenizerFast (tokenizer.json)
    if isinstance(tokenizer_config.get("extra_special_tokens"), list):  # 5.x's list (language codes); 4.x reads
        tokenizer_config["additional_special_tokens"] = tokenizer_config.pop("extra_special_tokens")  # this name
    atomic_write_text(settings, json.dumps(tokenizer_config, indent=2) + "\n")
    if weights and hasattr(t5, "merge_and_unload"):
        t5 = copy.deepcopy(t5).merge_and_unload()
    t5 = unwrapped(t5)
    (t5.save_pretrained if weights else t5.config.save_pretrained)(folder)
    atomic_write_text(Path(folder) / "config.json", json.dumps(portable_t5_config(t5), indent=2) + "\n")


def unwrapped(t5):
    """The transformers model inside a PEFT wrapper (LoRA layers stay in it), or the model itself."""
    return t5.get_base_model() if hasattr(t5, "get_base_model") else t5


def embedding_scale(t5):
    """RMS of what the model's encoder receives for its own tokens: the scale its pretrained layers
    expect. T5: its embedding rows. BART, mBART, M2M100/NLLB: the rows x sqrt(d_model) (a scaled
    embedding in transformers 5.x; an `embed_scale` applied by the encoder in older versions)."""
    encoder = t5.get_encoder()
    embed = getattr(encoder, "embed_tokens", None) or t5.get_input_embeddings()
    if type(embed) is nn.Embedding:
        return float(embed.weight.detach().float().pow(2).mean().sqrt()) * float(getattr(encoder, "embed_scale", 1.0) or 1.0)
    count = embed.weight.shape[0]
    ids = torch.linspace(0, count - 1, min(count, 4096), device=embed.weight.device).long()
    with torch.no_grad():
        return float(embed(ids).float().pow(2).mean().sqrt())


def encoder_output_scale(t5):
    """RMS of the model's encoder output for a sequence of its own tokens (spread over the vocabulary,
    dropout off): the scale its decoder's cross-attention reads."""
    encoder, embedding = t5.get_encoder(), t5.get_input_embeddings().weight
    ids = torch.linspace(0, embedding.shape[0] - 1, 64, device=embedding.device).long()[None]
    training = encoder.training
    with torch.no_grad():
        output = encoder.eval()(input_ids=ids)[0]
    encoder.train(training)
    return float(output.float().pow(2).mean().sqrt())


def default_frame_route(config):
    """--frame_route auto: the route the decoder's family learned better with on bench/quality.py."""
    return "cross_attention" if config.model_type in CROSS_ROUTE_FAMILIES else "encoder"


def frame_route_advice(model):
    """One line of advice when the model's decoder is of a family that learned far worse with its frame
    route on bench/quality.py (README, "Quality by decoder"); else None."""
    family = model.decoder_model.config.model_type
    if model.bridge.frame_memory is not None and default_frame_route(model.decoder_model.config) == "encoder":
        return (f"frames beside a '{family}' decoder's encoder output (--frame_route cross_attention) learned far "
                "worse than --frame_route encoder with BART and M2M100 / NLLB-200 decoders on bench/quality.py "
                "(README 'Quality by decoder'); the default (auto) uses encoder for them")
    return None


@functools.lru_cache(maxsize=None)
def beam_search_cache_class():
    from transformers.cache_utils import EncoderDecoderCache

    class BeamSearchCache(EncoderDecoderCache):
        """Beam search reorders every cached key and value at every step. The cross-attention ones are
        the same for every beam of a clip (its one encoder output, repeated per beam) and beams are only
        ever reordered within a clip, so reordering them copies the whole memory (most of it frames)
        for nothing: this cache leaves them where they are."""

        def reorder_cache(self, beam_idx):
            self.self_attention_cache.reorder_cache(beam_idx)

    return BeamSearchCache


def beam_search_cache():
    from transformers.cache_utils import DynamicCache

    return beam_search_cache_class()(DynamicCache(), DynamicCache())


def encoder_output(memory):
    """`memory` (B, M, d) as the encoder output a transformers seq2seq model takes (`encoder_outputs=`)."""
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=memory)


def language_codes(tokenizer):
    """The target-language codes a multilingual tokenizer knows: {code: token id} (NLLB's eng_Latn,
    mBART-50's en_XX, M2M100's __en__ as en); empty for a monolingual one."""
    tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return {(token[2:-2] if token.startswith("__") else token): tokenizer.convert_tokens_to_ids(token)
            for token in tokens if LANGUAGE_CODE.match(token)}


def target_language(tokenizer, requested, name):
    """(code, token id) of the target language: --target_lang, else English where the model has codes;
    None for models without language codes (T5, BART, mT5)."""
    codes = language_codes(tokenizer)
    if requested is None:
        return next(((code, codes[code]) for code in ENGLISH_CODES if code in codes), None)
    if not codes:
        raise UserError(f"--target_lang {requested}: decoder '{name}' has no language codes (not a multilingual "
                        "model such as NLLB or mBART-50): leave --target_lang out")
    if requested not in codes:
        raise UserError(f"--target_lang {requested} is not a language code of '{name}'; its codes: "
                        + ", ".join(sorted(codes)))
    return requested, codes[requested]


def weights_fingerprint(t5):
    """sha256 over the model's weights (each parameter's shape, dtype and bytes; tied ones once; names left
    out, so transformers 4.x and 5.x agree): tells a frozen base model from another."""
    digests = []
    for parameter in unwrapped(t5).parameters():
        tensor = parameter.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        digests.append(digest.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def enable_checkpointing(t5):
    """Activation (gradient) checkpointing: 5.x's name, else 4.x's; non-reentrant, so gradients reach
    the bridge through a frozen decoder."""
    if hasattr(t5, "activation_checkpointing_enable"):
        t5.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def with_lora(t5, rank, alpha):
    """LoRA adapters on the query and value projections of every attention layer (the usual choice; PEFT's
    own default where the model names them otherwise); the base frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora_rank needs the peft package: pip install peft") from None
    names = {name.rsplit(".", 1)[-1] for name, _ in t5.named_modules()}
    targets = next((pair for pair in (["q_proj", "v_proj"], ["q", "v"]) if set(pair) <= names), None)  # BART/NLLB, T5
    config = LoraConfig(task_type="SEQ_2_SEQ_LM", r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.05,
                        target_modules=targets)
    try:
        return get_peft_model(t5, config)
    except ValueError as error:
        raise UserError(f"--lora_rank: PEFT has no LoRA target modules for a {t5.config.model_type} model "
                        f"({first_line(error)})") from None


def spec_tensor(spec):
    """The decoder spec as the uint8 tensor a state dict carries (JSON bytes), and back (`spec_of`)."""
    return torch.tensor(list(json.dumps(spec, sort_keys=True).encode()), dtype=torch.uint8)


def spec_of(tensor):
    return json.loads(bytes(tensor.tolist()).decode())


def comparable_config(config):
    """A model config without what says how or where it was saved (not what the model is)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in (
        "transformers_version", "architectures", "torch_dtype", "dtype", "use_cache")}


def load_tokenizer(name, origin):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{origin}: cannot load the tokenizer of decoder '{name}' ({first_line(error)}); "
                        "offline? keep its t5_export/ folder beside the checkpoint") from None


def base_decoder(spec, where=None, origin="this checkpoint"):
    """The base model a frozen or LoRA checkpoint was trained on (by name, or from `where`), with its
    tokenizer and fingerprint; refused in one line when its weights are not the ones trained on."""
    where = str(where or spec["name"])
    t5, tokenizer = load_t5(where)
    fingerprint = weights_fingerprint(t5.float())
    if fingerprint != spec["fingerprint"]:
        raise UserError(f"{origin} holds only what was trained on top of decoder '{spec['name']}' (weights "
                        f"{spec['fingerprint'][:12]}), but '{where}' has other weights ({fingerprint[:12]}): "
                        "give that base model (--t5_model)")
    return t5, tokenizer, fingerprint


class SONARwithT5(nn.Module):
    """Frozen sentence encoder -> bridge -> T5 (through `inputs_embeds`).

    SONARwithT5(sonar_checkpoint, t5_model_name="t5-small", freeze_encoder=True, device="cuda") as in
    the original module; bridge options as keywords (MODEL_DEFAULTS). Bridges (--bridge):
      prefix_memory (default) each `expander` query gets per-clip content from the standardised
                    embedding, then reads `memory_tokens` memory tokens through `attention_bridge`
      memory        `expander` queries read the memory tokens (content from attention only)
      prefix        an MLP prefix, no attention
      guide         the guide's bridge: attention over ONE key, so every query gets the same vector

    Calls:  model(batch) -> (loss, target tokens)            the trainer's batch dicts
            model(features, target_texts) -> loss              the original API: (B, T, D) zero-padded
            model(features, max_length=50) -> [sentence, ...]
    """

    def __init__(self, sonar_checkpoint=None, t5_model_name=DEFAULT_T5, freeze_encoder=True, device="cuda", *,
                 t5=None, tokenizer=None, encoder_dims=None, feature_dim=None, decoder_fingerprint=None,
                 **options):
        super().__init__()
        unknown = set(options) - set(MODEL_DEFAULTS) - set(DECODER_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown SONARwithT5 options: {sorted(unknown)}")
        decoder_options = {k: options.pop(k, v) for k, v in DECODER_DEFAULTS.items()}
        options = {**MODEL_DEFAULTS, **options}
        if options["bridge"] not in BRIDGES:
            raise UserError(f"unknown bridge '{options['bridge']}' (choose from {BRIDGE_KINDS})")
        if options["frame_route"] not in FRAME_ROUTE_CHOICES:
            raise UserError(f"unknown frame route '{options['frame_route']}' (choose from {FRAME_ROUTE_CHOICES})")
        if sonar_checkpoint is not None:
            self.sonar_encoder = load_sonar_encoder(sonar_checkpoint)
        elif encoder_dims is not None:
            self.sonar_encoder = SonarEncoder(encoder_dims)
        else:
            raise UserError("SONARwithT5 needs sonar_checkpoint (or encoder_dims)")
        if t5 is None:
            t5, tokenizer = load_t5(t5_model_name)
        self.register_buffer("model_spec", torch.zeros(0, dtype=torch.uint8))   # `options`, carried by the state dict
        self.freeze_encoder, self.options = freeze_encoder, options
        if freeze_encoder:  # frozen means frozen from the start: no gradient and no dropout
            self.sonar_encoder.requires_grad_(False).eval()
        self.register_buffer("decoder_spec", torch.zeros(0, dtype=torch.uint8))
        self.attach_decoder(t5, tokenizer, t5_model_name, fingerprint=decoder_fingerprint, **decoder_options)
        if options["frame_route"] == "auto":
            self.options = {**options, "frame_route": default_frame_route(self.decoder_model.config)}
        self.bridge = self.make_bridge(feature_dim or self.sonar_encoder.input_dim)
        self.to(resolve_device(device) if isinstance(device, str) else device)

    @property
    def options(self):
        """The bridge and frame path's options (MODEL_DEFAULTS keys). The state dict carries them
        (`model_spec`), so that a model built with other flags (Cell 7's default one) rebuilds the bridge
        a checkpoint was trained with, num_heads too, which no weight's shape tells."""
        return self._options

    @options.setter
    def options(self, options):
        self._options = options
        self.model_spec = spec_tensor(options).to(self.model_spec.device)

    def make_bridge(self, frame_dim):
        t5 = self.decoder_model
        bridge = BRIDGES[self.options["bridge"]](self.sonar_encoder.output_dim, t5.config.d_model,
                                                 self.options, frame_dim, embedding_scale(t5))
        if bridge.frame_encoder is not None and self.options["frame_route"] == "cross_attention":
            bridge.frame_memory = FrameMemory(t5.config.d_model, self.options, bridge.ff_dim, encoder_output_scale(t5))
        return bridge

    # -- the decoder (any seq2seq model; trained in full, frozen or through LoRA adapters) ------------

    def attach_decoder(self, t5, tokenizer, name, *, target_lang=None, freeze_t5=False, lora_rank=0, lora_alpha=0,
                       gradient_checkpointing=False, fingerprint=None):
        """Use `t5` (a plain transformers model) as the decoder: its target language, how it trains, and
        the spec recorded in the state dict (`decoder_spec`) that lets a checkpoint rebuild it."""
        t5 = t5.float()   # half-precision hub weights: autocast, not the weights, sets the compute precision
        language = target_language(tokenizer, target_lang, name)
        training = "lora" if lora_rank else "frozen" if freeze_t5 else "full"
        spec = {"name": str(name), "config": comparable_config(portable_t5_config(t5)), "training": training,
                "target_lang": language[0] if language else None,
                "lora": [lora_rank, lora_alpha or 2 * lora_rank] if lora_rank else None,
                # a checkpoint without the base weights names them by their fingerprint
                "fingerprint": (fingerprint or weights_fingerprint(t5)) if training != "full" else None}
        if lora_rank:
            t5 = with_lora(t5, *spec["lora"])
        elif freeze_t5:
            t5.requires_grad_(False)
        if gradient_checkpointing:
            enable_checkpointing(unwrapped(t5))
        self.t5, self.tokenizer, self.t5_model_name = t5, tokenizer, str(name)
        self.target_lang_id = language[1] if language else None
        self.gradient_checkpointing = gradient_checkpointing
        self.decoder_spec = spec_tensor(spec).to(self.decoder_spec.device)

    @property
    def decoder(self):
        """The decoder's spec: {"name", "config", "training" (full | frozen | lora), "target_lang", "lora",
        "fingerprint" (of the base weights, when a checkpoint does not hold them)}."""
        return spec_of(self.decoder_spec)

    @property
    def decoder_model(self):
        """The transformers model (inside its PEFT wrapper with --lora_rank)."""
        return unwrapped(self.t5)

    def fit_decoder(self, spec, where=None, origin="this checkpoint"):
        """Rebuild the decoder a state dict was saved with, when it is not this one (Cell 7 builds a default
        t5-small model, then loads any best_model.pt): from its config when the checkpoint holds all its
        weights, else the base model by name (or `where`), refused when its weights differ. (fit_bridge then
        rebuilds the bridge at the decoder's width.)"""
        current = self.decoder
        if all(spec.get(key) == current.get(key) for key in ("config", "training", "target_lang", "lora", "fingerprint")):
            return
        if spec["training"] == "full":
            t5, tokenizer, fingerprint = t5_from_config(spec["config"]), load_tokenizer(spec["name"], origin), None
        else:
            t5, tokenizer, fingerprint = base_decoder(spec, where, origin)
        lora_rank, lora_alpha = spec["lora"] or (0, 0)
        self.attach_decoder(t5, tokenizer, spec["name"], target_lang=spec["target_lang"],
                            freeze_t5=spec["training"] == "frozen", lora_rank=lora_rank, lora_alpha=lora_alpha,
                            fingerprint=fingerprint, gradient_checkpointing=self.gradient_checkpointing)
        self.to(self.device)                                   # (the bridge's device: the new decoder's is the CPU)

    def trained_state_dict(self):
        """What checkpoints hold (on CPU): everything but a frozen or LoRA-adapted decoder's base weights,
        which are rebuilt from the named base model (`decoder_spec`)."""
        if self.decoder["training"] == "full":
            return cpu_state_dict(self)
        return cpu_state_dict(self, keep=lambda key: not self.is_base_weight(key))

    @staticmethod
    def is_base_weight(key):
        return key.startswith("t5.") and "lora_" not in key

    # The guide's names.
    @property
    def expander(self):
        return self.bridge.expander

    @property
    def attention_bridge(self):
        return self.bridge.attention_bridge

    @property
    def projection(self):
        """The original module's name for the layer from the sentence embedding into T5's width."""
        return self.bridge.projection

    @property
    def device(self):
        return self.expander.device

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_encoder:  # a frozen encoder also keeps its dropout off
            self.sonar_encoder.eval()
        return self

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module's, after renaming the keys of checkpoints saved before bridges were modules and
        fitting the decoder and the frame path to the checkpoint's: the guide's Cell 7 builds a default
        model and loads any best_model.pt into it: another decoder, frozen or LoRA-adapted (the base weights
        then come from the named base model), with frames or without, any stride."""
        state_dict = upgrade_state_dict(state_dict)
        spec = state_dict.get("decoder_spec")
        if spec is not None:
            self.fit_decoder(spec_of(spec))
        # (without a spec: saved before decoders were recorded, so a fully trained T5 like this one)
        self.fit_bridge(state_dict)
        state_dict = self.fit_frame_path(state_dict)      # (checkpoints saved without `model_spec`)
        self.fit_prefix(state_dict)
        state_dict = {**state_dict, "decoder_spec": self.decoder_spec, "model_spec": self.model_spec}
        self.train(self.training)      # parts rebuilt above start in training mode: the model's mode for all
        if self.decoder["training"] == "full":
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not self.is_base_weight(key)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\tMissing key(s): "
                               f"{missing}; unexpected key(s): {result.unexpected_keys}")
        return result._replace(missing_keys=missing)

    def fit_bridge(self, state_dict):
        """The bridge (and frame path) a state dict was saved with, from the options it carries, at the
        decoder's width, when either is not this model's. Saved before 2026-12-01: no `model_spec`; the
        frame path and the prefix width are then read from the weights' shapes (fit_frame_path, fit_prefix),
        the other options taken as this model's."""
        spec = state_dict.get("model_spec")
        recorded = {} if spec is None else {k: v for k, v in spec_of(spec).items() if k in MODEL_DEFAULTS}
        saved = {**self.options, **recorded}
        if saved == self.options and self.expander.shape[1] == self.decoder_model.config.d_model:
            return
        self.options = saved
        frame_mean = state_dict.get("bridge.frame_encoder.frame_mean")
        self.bridge = self.make_bridge(self.sonar_encoder.input_dim if frame_mean is None else len(frame_mean)
                                       ).to(self.device)

    def fit_prefix(self, state_dict):
        """The prefix MLP's hidden width a state dict was saved with (--prefix_dim: 256 by default beside a
        frozen or LoRA decoder, any width when typed), when it is not this model's."""
        saved, mlp = state_dict.get("bridge.prefix_mlp.0.weight"), getattr(self.bridge, "prefix_mlp", None)
        if saved is None or mlp is None or mlp[0].out_features == len(saved):
            return
        self.options = {**self.options, "prefix_dim": len(saved)}
        self.bridge.prefix_mlp = self.bridge.make_prefix_mlp(self.sonar_encoder.output_dim, self.options).to(self.device)

    def fit_frame_path(self, state_dict):
        """Rebuild (or drop) the frame encoder and the frame memory so their shapes are the ones `state_dict`
        was saved with; returns the state dict (with the window of a checkpoint saved before windows were
        recorded: one frame)."""
        projection = state_dict.get("bridge.frame_encoder.frame_projection.weight")
        current = self.bridge.frame_encoder
        if projection is None:
            if current is not None:
                logger.info("This checkpoint was trained without frames (--no-frame_attention): the model reads "
                            "the sentence embedding only.")
                self.bridge.frame_encoder, self.bridge.frame_memory = None, None
                self.options = {**self.options, "frame_attention": False}
            return state_dict
        mean = state_dict["bridge.frame_encoder.frame_mean"]
        if "bridge.frame_encoder.window" not in state_dict:
            state_dict = {**state_dict, "bridge.frame_encoder.window": torch.tensor([1, 1])}
        stride, kernel = (int(v) for v in state_dict["bridge.frame_encoder.window"])
        if current is None or (current.stride, current.kernel, len(current.frame_mean)) != (stride, kernel, len(mean)):
            self.bridge.frame_encoder = FrameEncoder(mean.shape[0], projection.shape[0], stride, kernel).to(self.device)
            self.options = {**self.options, "frame_attention": True, "frame_stride": stride, "frame_kernel": kernel}
        self.fit_frame_memory(state_dict)
        return state_dict

    def fit_frame_memory(self, state_dict):
        """The frame route a state dict was saved with: a frame memory (and its depth) when it has one."""
        layers = {key.split(".")[3] for key in state_dict if key.startswith("bridge.frame_memory.layers.")}
        route = "cross_attention" if "bridge.frame_memory.scale" in state_dict else "encoder"
        ff = state_dict.get("bridge.frame_memory.layers.0.linear1.weight")
        ff_dim = self.options["frame_memory_ff_dim"] if ff is None else len(ff)
        down = state_dict.get("bridge.frame_memory.down.weight")
        divisor = 1 if down is None else down.shape[1] // down.shape[0]
        current = self.bridge.frame_memory
        if (current is None) if route == "encoder" else (
                current is not None and len(current.layers) == len(layers)
                and self.options["frame_memory_divisor"] == divisor
                and (not layers or current.layers[0].linear1.out_features == ff_dim)):
            return
        self.options = {**self.options, "frame_route": route, "frame_memory_layers": len(layers),
                        "frame_memory_ff_dim": ff_dim, "frame_memory_divisor": divisor}
        self.bridge.frame_memory = (FrameMemory(self.decoder_model.config.d_model, self.options, self.bridge.ff_dim, 1.0)
                                    .to(self.device) if route == "cross_attention" else None)

    # -- encoder and bridge --------------------------------------------------------------------

    def sentence_embedding(self, batch):
        """(B, E) from a batch: the cached embedding when frozen, else the encoder on the clip mean."""
        if self.freeze_encoder and "sentence_embedding" in batch:
            return batch["sentence_embedding"].to(self.device)
        if "clip_mean" in batch:
            clip_mean = batch["clip_mean"].to(self.device)
        else:
            clip_mean = masked_mean(batch["features"].to(self.device), batch["length"])
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.sonar_encoder(clip_mean.float())

    def fit_standardizer(self, embeddings, frame_mean=None, frame_std=None):
        self.bridge.fit_standardizer(embeddings, frame_mean, frame_std)

    def frame_tokens(self, batch):
        """With --frame_attention, the clip's frames encoded once per batch (standardised, projected,
        with positions) and their padding mask: (B, T, d_model), (B, T); else (None, None)."""
        if not self.options["frame_attention"]:
            return None, None
        if batch.get("features") is None:
            raise UserError("this model attends to frames (--frame_attention): its dataset must be "
                            "built with return_frames=True")
        return self.bridge.frame_encoder(batch["features"], batch["length"])

    def bridge_batch(self, batch, frame_tokens=None, frame_padding=None):
        """The bridge's output for a batch: (B, Q, d_model). Frame tokens are encoded here unless given."""
        if frame_tokens is None:
            frame_tokens, frame_padding = self.frame_tokens(batch)
        return self.bridge(self.sentence_embedding(batch), frame_tokens, frame_padding)

    def t5_inputs(self, batch):
        """What T5's encoder reads: the bridge's Q tokens, then with --frame_attention (frame route
        `encoder`) the clip's T frame tokens (the ones the bridge attended to, at the same scale), and the
        mask of the frames' padding: (B, Q [+ T], d_model), (B, Q [+ T])."""
        return self.decoder_inputs(batch)[:2]

    def decoder_inputs(self, batch):
        """t5_inputs, and the frame memory for the decoder's cross-attention with the frame route
        `cross_attention` ((B, T, d_model), mask (B, T)); else None."""
        frame_tokens, frame_padding = self.frame_tokens(batch)
        tokens = self.bridge_batch(batch, frame_tokens, frame_padding)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=self.device)
        if frame_tokens is None:
            return tokens, mask, None
        if self.bridge.frame_memory is not None:
            return tokens, mask, self.bridge.frame_memory(frame_tokens, frame_padding)
        tokens = torch.cat([tokens, frame_tokens * self.bridge.output_scale], dim=1)
        return tokens, torch.cat([mask, (~frame_padding).long()], dim=1), None

    def decoder_memory(self, batch):
        """What the decoder's cross-attention reads: its encoder's output for t5_inputs, then the frame
        memory (frame route `cross_attention`), and their mask: (B, M, d_model), (B, M)."""
        inputs_embeds, mask, frame_memory = self.decoder_inputs(batch)
        memory = self.decoder_model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=mask)[0]
        if frame_memory is None:
            return memory, mask
        return torch.cat([memory, frame_memory[0]], dim=1), torch.cat([mask, frame_memory[1]], dim=1)

    # -- T5 --------------------------------------------------------------------------------------

    def forward(self, batch, target_texts=None, max_length=50, *, label_smoothing=0.0):
        """Token-level cross-entropy on batch['labels'] (padded with -100): (loss, target tokens).

        A tensor instead of a batch dict is the original module's call: `features` (B, T, D) padded
        with zero frames (which stay out of the mean); with `target_texts` the scalar loss, without
        them the generated sentences (at most `max_length` new tokens).
        """
        if torch.is_tensor(batch):
            batch = self.batch_from_features(batch)
            if target_texts is None:
                return self.generate(batch, **generation_kwargs({**DECODING_DEFAULTS, "max_new_tokens": max_length}))
            batch["labels"] = self.labels_from_texts(target_texts, max_length=128)
            return self.loss(batch, label_smoothing)[0]
        return self.loss(batch, label_smoothing)

    def labels_from_texts(self, texts, max_length=None):
        """Target sentences as token ids padded with -100 (left out of the loss): (B, L)."""
        return padded_labels(self.target_ids(texts, max_length))

    def as_batch(self, batch):
        """This module's batch dict from the original collate_fn's ({"video_ids", "features", "texts"})."""
        if "texts" in batch and "features" in batch:
            return {**self.batch_from_features(batch["features"]), "id": list(batch["video_ids"]),
                    "text": list(batch["texts"])}
        return batch

    def batch_from_features(self, features):
        """A batch dict from zero-padded frames (B, T, D): each clip ends at its last non-zero frame."""
        features = features.to(self.device).float()
        nonzero = features.abs().sum(dim=-1) > 0                                    # (B, T)
        positions = torch.arange(1, features.shape[1] + 1, device=self.device)
        lengths = (nonzero * positions).max(dim=1).values.cpu()                    # (B,)
        return {"features": features, "length": lengths, "clip_mean": masked_mean(features, lengths)}

    def loss(self, batch, label_smoothing=0.0):
        """Token-level cross-entropy: (loss, target tokens). T5 is called stack by stack so its
        vocabulary head (a quarter of t5-small's training FLOPs) runs only where there is a target token,
        not on the -100 padding; other families compute their own loss (BART, mBART and NLLB start
        the decoder from their own start token)."""
        memory, attention_mask = self.decoder_memory(batch)                 # (B, Q + T, d)
        labels = batch["labels"].to(self.device)                             # (B, L)
        targets = labels != -100
        smoothing = label_smoothing if self.training else 0.0
        t5 = self.decoder_model
        config = t5.config
        if not uses_t5_loss(config):
            output = self.t5(encoder_outputs=encoder_output(memory), attention_mask=attention_mask,
                             labels=labels, use_cache=False)
            if not smoothing:
                return output.loss, targets.sum()
            return F.cross_entropy(output.logits[targets].float(), labels[targets], label_smoothing=smoothing), targets.sum()
        decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], config.decoder_start_token_id),
                                       labels[:, :-1]], dim=1)
        decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == -100, config.pad_token_id)
        hidden = t5.decoder(input_ids=decoder_input_ids, encoder_hidden_states=memory,
                            encoder_attention_mask=attention_mask, use_cache=False)[0]  # (B, L, d)
        hidden = hidden[targets]                                             # (N, d)
        if scales_decoder_output(config):
            hidden = hidden * config.d_model ** -0.5
        logits = t5.lm_head(hidden)                                          # (N, V)
        loss = F.cross_entropy(logits.float(), labels[targets], label_smoothing=smoothing)
        return loss, targets.sum()

    @torch.no_grad()
    def generate(self, batch, **gen_kwargs):
        """Sentences for a batch; gen_kwargs go to the decoder's generate (max_new_tokens always set). A
        multilingual decoder's first token is forced to the target language's code, left out of the text."""
        memory, attention_mask = self.decoder_memory(batch)
        gen_kwargs.setdefault("max_new_tokens", DECODING_DEFAULTS["max_new_tokens"])
        if gen_kwargs.get("num_beams", 1) > 1:
            gen_kwargs.setdefault("past_key_values", beam_search_cache())
        if self.target_lang_id is not None:
            gen_kwargs.setdefault("forced_bos_token_id", self.target_lang_id)
        ids = self.t5.generate(encoder_outputs=encoder_output(memory), attention_mask=attention_mask,
                               **gen_kwargs)
        if self.target_lang_id is not None:
            ids = ids.masked_fill(ids == self.target_lang_id, self.tokenizer.pad_token_id)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def target_ids(self, texts, max_length=None):
        """Token ids of target sentences (lists, unpadded): the tokenizer's, or for a multilingual decoder
        the target-language code, the sentence and </s> (as NLLB's and mBART-50's tokenizers lay out targets)."""
        if self.target_lang_id is None:
            return self.tokenizer(list(texts), max_length=max_length, truncation=max_length is not None)["input_ids"]
        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        end = max_length - 2 if max_length else None
        return [[self.target_lang_id, *row[:end], self.tokenizer.eos_token_id] for row in rows]

    def config_dict(self):
        """What it takes to rebuild this model without the training flags (saved in checkpoints)."""
        frame_encoder, decoder = self.bridge.frame_encoder, self.decoder
        lora_rank, lora_alpha = decoder["lora"] or (0, 0)
        return {"t5_model": self.t5_model_name, "freeze_encoder": self.freeze_encoder,
                "encoder_dims": list(self.sonar_encoder.dims), **self.options,
                "feature_dim": frame_encoder.frame_mean.shape[0] if frame_encoder else None,
                "target_lang": decoder["target_lang"], "freeze_t5": decoder["training"] == "frozen",
                "lora_rank": lora_rank, "lora_alpha": lora_alpha}

    @classmethod
    def from_checkpoint(cls, path, device="cpu", checkpoint=None, base=None):
        """Rebuild a trained model from best_model.pt alone (+ its t5_export/ folder, if present; a frozen
        or LoRA decoder's base model by its recorded name, or from `base`, checked by fingerprint).
        `checkpoint`: the file's contents when the caller has already loaded them."""
        checkpoint = checkpoint if checkpoint is not None else safe_torch_load(path, "model checkpoint")
        check_model_checkpoint(checkpoint, path)
        config = checkpoint["model_config"]
        state = upgrade_state_dict(checkpoint["model_state_dict"])
        spec = state.get("decoder_spec")
        spec = spec_of(spec) if spec is not None else {"training": "full"}
        export = Path(path).parent / "t5_export"
        fingerprint = None
        if spec["training"] == "full":
            head, embedding = state.get("t5.lm_head.weight"), state.get("t5.shared.weight")
            untied = config_is_untied(checkpoint["t5_config"]) or (
                head is not None and embedding is not None and not torch.equal(head, embedding))
            t5, tokenizer = t5_from_config(checkpoint["t5_config"], untied), None
        else:
            t5, tokenizer, fingerprint = base_decoder(spec, base, origin=str(path))
        if export.is_dir() or tokenizer is None:
            tokenizer = load_tokenizer(export if export.is_dir() else config["t5_model"], str(path))
        decoder_options = {k: config.get(k, PREVIOUS_DEFAULTS.get(k)) for k in DECODER_DEFAULTS if k != "gradient_checkpointing"}
        model = cls(None, config["t5_model"], config["freeze_encoder"], device, t5=t5, tokenizer=tokenizer,
                    encoder_dims=config["encoder_dims"], feature_dim=config.get("feature_dim"),
                    decoder_fingerprint=fingerprint, **decoder_options,
                    **{k: config.get(k, PREVIOUS_DEFAULTS.get(k, MODEL_DEFAULTS[k])) for k in MODEL_DEFAULTS})
        load_model_state(model, state, path)
        return model


def resolve_device(name):
    """torch.device from a --device value; CUDA falls back to CPU with a warning where there is none."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device '{name}' is not a device: use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("CUDA is not available on this machine: running on CPU instead.")
        return torch.device("cpu")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--device '{name}' is not supported here: use cuda, cuda:N or cpu")
    return device


# ----------------------------------------------------------------------------------------------
# Decoding, metrics and collapse diagnostics: one decoding loop for training, --predict and Cell 7


def generation_kwargs(settings):
    """One dict for generate from decoding settings (a dict or the parsed flags). Deterministic beam
    search unless sampling is asked for."""
    s = settings if isinstance(settings, dict) else vars(settings)
    kwargs = {"max_new_tokens": s["max_new_tokens"], "num_beams": s["num_beams"]}
    if s["num_beams"] > 1:
        kwargs["early_stopping"] = True
        if s["length_penalty"] != 1.0:
            kwargs["length_penalty"] = s["length_penalty"]
    if s["repetition_penalty"] != 1.0:
        kwargs["repetition_penalty"] = s["repetition_penalty"]
    if s["no_repeat_ngram_size"]:
        kwargs["no_repeat_ngram_size"] = s["no_repeat_ngram_size"]
    if s["do_sample"]:  # passed only when sampling: set otherwise they only raise warnings
        kwargs.update(do_sample=True, temperature=s["temperature"], top_p=s["top_p"])
    return kwargs


class Prediction(NamedTuple):
    index: int | None      # the sample's index in its dataset
    id: str
    reference: str
    prediction: str


@contextlib.contextmanager
def out_of_memory_as_user_error(what, hint):
    """A GPU out-of-memory error becomes one line saying which flags to lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"GPU out of memory {what}: {hint}") from None


def translate(model, batches, gen_kwargs, precision="fp32", with_loss=True, progress=False):
    """Predictions (and the token-weighted loss) over batches of clips: (predictions, loss_sum, tokens)."""
    model.eval()
    predictions, loss_sum, token_count = [], 0.0, 0
    with torch.no_grad(), out_of_memory_as_user_error(
            "while translating", "lower --eval_batch_size (or --num_beams / --max_new_tokens)"):
        for batch in tqdm(batches, desc="translating", leave=False, disable=not progress):
            with autocast_for(model.device, precision):
                if with_loss:
                    if "labels" not in batch:  # e.g. a default-collated How2SignDataset (Cell 7)
                        batch["labels"] = model.labels_from_texts(batch["text"])
                    loss, tokens = model(batch)
                    loss_sum += float(loss) * int(tokens)   # .item(): syncs the GPU, once per batch
                    token_count += int(tokens)
                sentences = model.generate(batch, **gen_kwargs)
            indices = batch["index"].tolist() if "index" in batch else [None] * len(sentences)
            predictions += map(Prediction._make, zip(indices, batch["id"], batch["text"], sentences))
    return predictions, loss_sum, token_count


def corpus_scores(predictions, references):
    """BLEU-4, chrF (sacreBLEU), BLEU-1..4 and ROUGE-L (None without rouge-score), with the BLEU signature."""
    from sacrebleu.metrics import BLEU, CHRF

    if not predictions:
        return {"bleu": 0.0, "chrf": 0.0, "bleu_n": [0.0] * 4, "rouge_l": None, "signature": ""}
    bleu = BLEU()
    score = bleu.corpus_score(predictions, [references])
    bleu_n = [BLEU(max_ngram_order=n, effective_order=n < 4).corpus_score(predictions, [references]).score
              for n in range(1, 5)]
    return {"bleu": score.score, "chrf": CHRF().corpus_score(predictions, [references]).score,
            "bleu_n": bleu_n, "rouge_l": rouge_l(predictions, references), "signature": str(bleu.get_signature())}


ROUGE_SIGNATURE = "rouge-score rougeL F1 x 100, mean over sentences, no stemming"


def rouge_l(predictions, references):
    """Sentence-level ROUGE-L F1 averaged over the corpus, x 100 (Google's rouge-score, as SLT papers
    report it); None, with a note once, when the package is missing."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        if not getattr(rouge_l, "warned", False):
            logger.info("rouge-score not installed: no ROUGE-L (pip install rouge-score).")
            rouge_l.warned = True
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return 100 * sum(scorer.score(reference, prediction)["rougeL"].fmeasure
                     for prediction, reference in zip(predictions, references)) / len(predictions)


def score_predictions(predictions):
    return corpus_scores([p.prediction for p in predictions], [p.reference for p in predictions])


def evaluate_model(model, loader, device, gen_kwargs=None):
    """The guide's Cell 7 API: (BLEU, loss, [(ground_truth, prediction), ...])."""
    model = getattr(model, "module", model)
    predictions, loss_sum, tokens = translate(model, loader, gen_kwargs or generation_kwargs(DECODING_DEFAULTS))
    return score_predictions(predictions)["bleu"], loss_sum / max(tokens, 1), \
        [(p.reference, p.prediction) for p in predictions]


def evaluate(model, val_loader, device=None):
    """The original module's evaluation: (BLEU, predictions, references) over a loader of its
    collate_fn's batches ({"video_ids", "features", "texts"}) or of this module's."""
    model = getattr(model, "module", model)
    predictions, _, _ = translate(model, (model.as_batch(batch) for batch in val_loader),
                                  generation_kwargs(DECODING_DEFAULTS), with_loss=False)
    hypotheses, references = [p.prediction for p in predictions], [p.reference for p in predictions]
    return corpus_scores(hypotheses, references)["bleu"], hypotheses, references


def train_epoch(model, train_loader, optimizer, scheduler, epoch, device=None, max_grad_norm=1.0):
    """The original module's training epoch: one optimizer step per batch (its collate_fn's or this
    module's), gradients clipped to `max_grad_norm`; returns the mean loss."""
    raw = getattr(model, "module", model)
    model.train()
    total, batches = 0.0, 0
    for batch in tqdm(train_loader, desc=f"epoch {epoch}", leave=False):
        batch = raw.as_batch(batch)
        if "labels" not in batch:
            batch["labels"] = raw.labels_from_texts(batch["text"], max_length=128)
        loss, _ = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total += float(loss.detach())
        batches += 1
    return total / max(batches, 1)


def mean_pairwise_cosine(vectors):
    """Mean cosine over distinct pairs of rows: (N, E) -> float."""
    if len(vectors) < 2:
        return float("nan")
    unit = F.normalize(vectors.double(), dim=-1)
    gram = unit @ unit.T
    n = len(unit)
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def bridge_spreads(tokens):
    """Relative spread of bridge outputs (N, Q, d) across clips and across query positions."""
    tokens = tokens.float()
    rms = tokens.pow(2).mean().sqrt().clamp(min=1e-12)
    return float(tokens.std(dim=0).mean() / rms), float(tokens.std(dim=1).mean() / rms)


@torch.no_grad()
def collapse_diagnostics(model, dataset, predictions, references, max_clips=256):
    """Numbers that locate collapse: encoder -> bridge -> decoder."""
    model.eval()
    indices = list(range(min(len(dataset), max_clips)))
    batch = collate_clips([{k: v for k, v in dataset[i].items() if k != "labels"} for i in indices])
    embeddings = model.sentence_embedding(batch).float()                      # (N, E)
    across_clips, across_positions = bridge_spreads(model.bridge_batch(batch))  # from (N, Q, d)
    spread = embeddings.std(dim=0).mean() / embeddings.pow(2).mean().sqrt().clamp(min=1e-12)
    return {
        "encoder_cosine": mean_pairwise_cosine(embeddings),
        "encoder_spread": float(spread),                                   # relative per-dim std
        "bridge_spread_clips": across_clips,                               # do clips differ?
        "bridge_spread_positions": across_positions,                       # do query slots differ?
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
                "(--no-freeze_encoder), or let the model read the frames (the default; drop --no-frame_attention).")
    if d["bridge_spread_positions"] < FLAT_SPREAD:
        return (f"Mode collapse ({share}) starts in the BRIDGE: all query positions carry the same "
                "vector (attention over one key); use the default --bridge prefix_memory.")
    if d["bridge_spread_clips"] < FLAT_SPREAD:
        return (f"Mode collapse ({share}) starts in the BRIDGE: its outputs barely differ between clips "
                f"(spread {d['bridge_spread_clips']:.1e}); keep --standardize on (the default) and train longer.")
    return (f"Mode collapse ({share}) is in the DECODER: the bridge passes on per-clip differences "
            f"(spread {d['bridge_spread_clips']:.2f}) but the decoder ignores them; train longer, or raise "
            "--bridge_learning_rate (with --freeze_t5: try --lora_rank), and check that references are correct (--check).")


# ----------------------------------------------------------------------------------------------
# Training: processes, precision, batches, the optimizer step, one epoch, evaluation


@dataclass
class World:
    """The processes of this run (torchrun's environment); a plain `python` run is rank 0 of 1."""
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self):
        return self.rank == 0

    def gather(self, obj):
        if self.size == 1:
            return [obj]
        gathered = [None] * self.size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def barrier(self):
        if self.size > 1:
            torch.distributed.barrier()


def setup_world(device_name):
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    resolve_device(device_name) if rank == 0 else None     # validates the flag; warns once without CUDA
    use_cuda = device_name.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu"))


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


GROUP_BATCHES = 50   # length grouping: clips are sorted by length within runs of this many batches


def epoch_batches(num_items, batch_size, epoch, seed, world, lengths=None):
    """This process's batches for an epoch: a fresh shuffle per epoch, sharded across processes
    like DistributedSampler (padded to a multiple of the world size); reproducible for resume.
    With `lengths` (frames per clip), batches hold clips of similar length (the frames are padded to
    the batch's longest): the shuffled order is cut into runs of GROUP_BATCHES batches, each run
    sorted by length and cut into batches, and the batches shuffled again."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    if world.size > 1:
        order += order[: (-len(order)) % world.size]
        order = order[world.rank:: world.size]
    if lengths is None:
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    run = batch_size * GROUP_BATCHES
    batches = []
    for start in range(0, len(order), run):
        grouped = sorted(order[start: start + run], key=lambda i: -int(lengths[i]))
        batches += [grouped[i: i + batch_size] for i in range(0, len(grouped), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def length_sorted_batches(dataset, indices, batch_size):
    """Batches of clips of similar length (a proxy for sentence length), so generation and frame
    padding waste little."""
    order = sorted(indices, key=lambda i: int(dataset.lengths[i]))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def clip_batches(dataset, batches, num_workers=0, device=None):
    """A DataLoader over fixed batches of indices, dynamically padded. Its own generator keeps it from
    drawing on the global RNG, so a resumed run's dropout matches an uninterrupted one's."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_clips, num_workers=num_workers,
                      pin_memory=device is not None and device.type == "cuda", generator=torch.Generator())


@torch.no_grad()
def encode_dataset(model, dataset, batch_size=4096):
    """Sentence embeddings of every clip, computed once (the frozen encoder's cache)."""
    model.sonar_encoder.eval()
    with out_of_memory_as_user_error("while encoding the clips", "run with --device cpu once, or free the GPU"):
        chunks = [model.sonar_encoder(dataset.clip_means[i: i + batch_size].to(model.device)).float().cpu()
                  for i in range(0, len(dataset), batch_size)]
    return torch.cat(chunks)                                                  # (N, E)


def clip_gradients(parameters, max_norm):
    """Clip the total gradient norm to max_norm; returns the norm as a float.

    float() syncs the GPU once per optimizer step, which the non-finite check needs anyway; in
    exchange the second pass over every gradient happens only when clipping is needed.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
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


def parameter_groups(model):
    """Trainable parameters by part: T5, bridge, encoder (they train at different rates)."""
    groups = {"t5": [], "bridge": [], "encoder": []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups["t5" if name.startswith("t5.") else
                   "encoder" if name.startswith("sonar_encoder.") else "bridge"].append(parameter)
    return groups


def count_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


OOM_TRAINING_HINT = ("lower --batch_size (and raise --grad_accum_steps to keep the global batch), "
                     "--max_target_length or --num_queries")


def bridge_learning_rate(args):
    """The bridge's peak learning rate: --bridge_learning_rate, else --learning_rate x --bridge_lr_scale
    when that is given, else DEFAULT_BRIDGE_LR (the bridge starts from random weights; T5 need not)."""
    if args.bridge_learning_rate:
        return args.bridge_learning_rate
    return args.learning_rate * args.bridge_lr_scale if args.bridge_lr_scale else DEFAULT_BRIDGE_LR


def frame_source(args):
    """The dataset keywords that say where frames come from: the frame store (in --cache_dir) or the files."""
    return {"frame_store": args.frame_store, "cache_dir": args.cache_dir, "frame_cache_gb": args.frame_cache_gb}


def data_splits(args):
    """(split, manifest, features folder) of the training and validation data."""
    return (("train", args.train_manifest, args.train_features), ("val", args.val_manifest, args.val_features))


def report_dataset(dataset, manifest):
    """The log lines every run prints about a split: how it was read, what was skipped."""
    if dataset.span_reading:
        logger.info(f"{dataset.split}: --feature_fps {dataset.feature_fps:g}: spans from {dataset.span_reading}.")
    summary = skip_summary(dataset)
    if summary:
        logger.warning(summary)
    if dataset.cache and dataset.cache.skipped:
        logger.warning(f"{dataset.split}: frames of {dataset.cache.clips} clips kept in memory "
                       f"({dataset.cache.bytes / 2 ** 30:.2f} GB); {dataset.cache.skipped} more are read from disk "
                       "at every step (raise --frame_cache_gb if memory allows).")
    logger.info(f"{dataset.split}: {len(dataset)} clips ({dataset.feature_dim}-d features, "
                f"up to {dataset.max_frames} frames) from {manifest}")


def write_best_predictions(out, predictions):
    """best_predictions.tsv (id, reference, prediction) and the original module's best_predictions.txt
    ("GT: ..." / "Pred: ..." pairs, a blank line between), each written atomically."""
    atomic_write_text(Path(out) / "best_predictions.tsv", "id\treference\tprediction\n" + "".join(
        f"{clean(p.id)}\t{clean(p.reference)}\t{clean(p.prediction)}\n" for p in predictions))
    atomic_write_text(Path(out) / "best_predictions.txt", "".join(
        f"GT: {clean(p.reference)}\nPred: {clean(p.prediction)}\n\n" for p in predictions))


def score_record(scores):
    """An evaluation's scores as metrics.jsonl fields."""
    return {"val_bleu": scores["bleu"], "val_chrf": scores["chrf"],
            **{f"val_bleu_{n}": value for n, value in enumerate(scores["bleu_n"], start=1)},
            **({"val_rouge_l": scores["rouge_l"]} if scores["rouge_l"] is not None else {})}


def selection_key(record, metric):
    """What "better" means for the best model and --patience: the metric, then the lower loss."""
    loss = -record["val_loss"]
    if metric == "loss":
        return (loss,)
    return (record.get(f"val_{metric}", record["val_bleu"] if metric == "bleu" else -math.inf), loss)


def bleurt_score(predictions, references, checkpoint, device, batch_size=32):
    """Mean BLEURT (the bleurt-pytorch port of Google's metric) of predictions against references."""
    from bleurt_pytorch import BleurtForSequenceClassification, BleurtTokenizer

    try:
        tokenizer = BleurtTokenizer.from_pretrained(checkpoint)
        model = BleurtForSequenceClassification.from_pretrained(checkpoint).to(device).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"--bleurt {checkpoint}: cannot load it ({first_line(error)}); pass a BLEURT-PyTorch "
                        "checkpoint (hub name or folder), e.g. lucadiliello/BLEURT-20-D12") from None
    scores = []
    with torch.no_grad():
        for i in range(0, len(predictions), batch_size):
            inputs = tokenizer(references[i: i + batch_size], predictions[i: i + batch_size], padding="longest",
                               truncation=True, max_length=512, return_tensors="pt").to(device)
            scores += model(**inputs).logits.flatten().tolist()
    return sum(scores) / max(len(scores), 1)


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


@dataclass
class TrainState:
    epoch: int = 0              # completed epochs
    batch_in_epoch: int = 0     # batches of the current epoch already trained (mid-epoch saves)
    global_step: int = 0        # optimizer steps
    loss_sum: float = 0.0       # running train loss of the current epoch (token-weighted)
    token_sum: int = 0
    best: dict | None = None    # {"epoch", "val_bleu", "val_chrf", "val_loss"}
    skipped_steps: int = 0      # non-finite steps skipped in all
    stale_evals: int = 0        # evaluations since the selection metric last improved (--patience)


class Trainer:
    """One run: `setup` builds the model, data and optimizer; `fit` trains, evaluates and saves.

    `model` is what training calls (DDP- and/or torch.compile-wrapped); `raw_model` is the
    SONARwithT5 inside it, used for evaluation and saved without any wrapper prefix.
    """

    def __init__(self, args, world, given=frozenset()):
        self.args, self.world = args, world
        self.given = given          # flags typed on the command line (the others may follow last.pt's)
        if "prefix_dim" not in given and (args.freeze_t5 or args.lora_rank):
            args.prefix_dim = ADAPTER_PREFIX_DIM    # a small bridge beside a frozen or adapted decoder
        self.device = world.device
        self.out = Path(args.output_dir)
        self.precision = resolve_precision(args.precision, self.device)
        self.state = TrainState()
        self.metrics = []
        self.reporter = None
        self.best_eval = None       # (predictions, loss, scores) of the best epoch, when it covered every clip

    # -- set-up ----------------------------------------------------------------------------------

    def setup(self):
        args = self.args
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        resume_from = self.resume_checkpoint() if args.resume else None   # refused early, before any data is read
        self.raw_model = SONARwithT5(args.sonar_checkpoint, args.t5_model, args.freeze_encoder, self.device,
                                     **{k: getattr(args, k) for k in DECODER_DEFAULTS},
                                     **{k: getattr(args, k) for k in MODEL_DEFAULTS})
        if advice := frame_route_advice(self.raw_model):
            logger.warning(advice)
        self.train_set, self.val_set = self.load_datasets()
        train_embeddings = encode_dataset(self.raw_model, self.train_set)
        if args.freeze_encoder:  # computed once, reused every epoch and for evaluation
            self.train_set.sentence_embeddings = train_embeddings
            self.val_set.sentence_embeddings = encode_dataset(self.raw_model, self.val_set)
        self.raw_model.fit_standardizer(train_embeddings, self.train_set.frame_mean, self.train_set.frame_std)
        self.build_optimizer()
        if resume_from:
            self.restore(resume_from, self.out / "last.pt")
        self.model = self.raw_model
        if self.world.size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if args.compile:
            self.model = torch.compile(self.model)
        if self.world.is_main:
            save_t5_export(self.raw_model.t5, self.raw_model.tokenizer, self.out / "t5_export", weights=False)
            self.reporter = RunReporter(report_backends(args.report_to), self.out, args, resume=args.resume)

    def load_datasets(self):
        args, encoder_dim = self.args, self.raw_model.sonar_encoder.input_dim
        datasets, skipped = [], []
        for split, manifest, features in data_splits(args):
            dataset = How2SignDataset(manifest, features, feature_dim=encoder_dim, split=split,
                                      strict=args.strict, return_frames=args.frame_attention,
                                      trim_zero_frames=args.trim_zero_frames, feature_fps=args.feature_fps,
                                      max_samples=args.max_samples, **frame_source(args), progress=self.world.is_main)
            dataset.tokenize(self.raw_model, args.max_target_length)
            report_dataset(dataset, manifest)
            lost = dataset.lost_share()
            if lost > args.max_skip_share:
                raise UserError(f"{split}: {dataset.manifest_rows()} manifest rows -> only "
                                f"{len(dataset)} usable clips ({lost:.0%} lost, more than --max_skip_share "
                                f"{args.max_skip_share:g}). "
                                + (dataset.diagnosis or f"Most common reasons: {dataset.skip_summary_kinds()}; "
                                   "see --check. If your files hold whole videos, add --feature_fps FPS.")
                                + " To train on what is left anyway, add --max_skip_share 1.")
            skipped += [(clip_id, f"{split}: {reason}") for clip_id, reason in dataset.skipped]
            datasets.append(dataset)
        if self.world.is_main:
            atomic_write_text(self.out / "skipped_clips.tsv", "id\treason\n" + "".join(
                f"{clean(clip_id)}\t{clean(reason)}\n" for clip_id, reason in skipped))
        return datasets

    def build_optimizer(self):
        from transformers import get_linear_schedule_with_warmup

        args = self.args
        groups = parameter_groups(self.raw_model)
        rates = {"t5": args.learning_rate, "bridge": bridge_learning_rate(args),
                 "encoder": args.learning_rate * args.encoder_lr_scale}
        self.optimizer = torch.optim.AdamW([{"params": p, "lr": rates[g]} for g, p in groups.items() if p],
                                           weight_decay=args.weight_decay, **fused_adamw(self.device))
        batches = math.ceil(math.ceil(len(self.train_set) / self.world.size) / args.batch_size)
        self.steps_per_epoch = math.ceil(batches / args.grad_accum_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, args.warmup_steps,
                                                         max(self.steps_per_epoch * args.epochs, 1))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def resume_checkpoint(self):
        """last.pt's contents, checked against this run's flags; None when there is none yet."""
        path = self.out / "last.pt"
        if not path.is_file():
            logger.info(f"--resume: no {path} yet, starting from scratch.")
            return None
        checkpoint = safe_torch_load(path, "resume checkpoint")
        check_model_checkpoint(checkpoint, path, RESUME_KEYS)
        check_resume_compatible(checkpoint.get("args", {}), self.args, path, self.given)
        return checkpoint

    def restore(self, checkpoint, path):
        parameters = [id(p) for p in self.raw_model.parameters()]
        load_model_state(self.raw_model, checkpoint["model_state_dict"], path)
        if [id(p) for p in self.raw_model.parameters()] != parameters:   # rebuilt to fit it: the optimizer has others
            raise UserError(f"{path}: its bridge is not the one this run's flags build; rerun with the flags it was "
                            "trained with or use another --output_dir")
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
            self.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
            self.scaler.load_state_dict(checkpoint["scaler_state_dict"])
            set_rng_state(checkpoint["rng"])
            self.state = TrainState(**checkpoint["train_state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise UserError(f"{path}: cannot resume from this checkpoint ({first_line(error)}); it was saved by "
                            "another version or run: use another --output_dir or remove it") from None
        self.metrics = [m for m in read_jsonl(self.out / "metrics.jsonl") if m.get("epoch", 0) <= self.state.epoch]
        if self.world.is_main:  # each epoch exactly once, even if one was logged after the last save
            self.write_metrics()
        logger.info(f"Resumed from {path}: {self.state.epoch} epochs done"
                    + (f", {self.state.batch_in_epoch} batches into epoch {self.state.epoch + 1}"
                       if self.state.batch_in_epoch else "") + ".")

    # -- the loop --------------------------------------------------------------------------------

    def fit(self):
        args = self.args
        global_batch = args.batch_size * self.world.size * args.grad_accum_steps
        logger.info(f"Training {args.epochs} epochs of {self.steps_per_epoch} steps on {self.device} "
                    f"({self.precision}, {self.world.size} process(es), global batch {global_batch}, "
                    f"bridge '{args.bridge}' at learning rate {bridge_learning_rate(args):g}, T5 at "
                    f"{args.learning_rate:g}, {count_trainable(self.raw_model):,} trainable parameters)")
        for epoch in range(self.state.epoch, args.epochs):
            started = time.time()
            train_loss = self.train_epoch(epoch)
            record = {"epoch": epoch + 1, "train_loss": train_loss}
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                record.update(self.evaluate_epoch(epoch))
            record["seconds"] = round(time.time() - started, 2)
            self.state = TrainState(epoch=epoch + 1, global_step=self.state.global_step, best=self.state.best,
                                    skipped_steps=self.state.skipped_steps, stale_evals=self.state.stale_evals)
            if self.world.is_main:
                self.record_metrics(record)
                self.save_last()
            if args.patience and self.state.stale_evals >= args.patience:
                logger.info(f"Early stopping after epoch {epoch + 1}: validation {args.early_stopping_metric} has not "
                            f"improved for {self.state.stale_evals} evaluations (--patience {args.patience}); best "
                            f"epoch {self.state.best['epoch']}.")
                break
        self.world.barrier()
        return self.finish()

    def epoch_batches(self, epoch):
        """This process's training batches of `epoch` (indices), grouped by clip length when frames are read."""
        args = self.args
        grouped = args.group_by_length and self.raw_model.options["frame_attention"]
        return epoch_batches(len(self.train_set), args.batch_size, epoch, args.seed, self.world,
                             self.train_set.lengths if grouped else None)

    def train_epoch(self, epoch):
        args, state = self.args, self.state
        batches = self.epoch_batches(epoch)
        loader = clip_batches(self.train_set, batches[state.batch_in_epoch:], args.num_workers, self.device)
        self.model.train()
        bad_in_row = 0
        loss_sum = torch.tensor(state.loss_sum, device=self.device)
        token_sum = torch.tensor(state.token_sum, device=self.device)
        step_loss = step_tokens = 0   # this optimizer step's micro-batches, counted once it is taken
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", initial=state.batch_in_epoch,
                   total=len(batches), disable=not self.world.is_main, dynamic_ncols=True)
        for i, batch in enumerate(bar, start=state.batch_in_epoch):
            last_micro_batch = (i + 1) % args.grad_accum_steps == 0 or i + 1 == len(batches)
            with self.gradient_sync(last_micro_batch), autocast_for(self.device, self.precision), \
                    out_of_memory_as_user_error(f"at --batch_size {args.batch_size}", OOM_TRAINING_HINT):
                loss, tokens = self.model(batch, label_smoothing=args.label_smoothing)
                if loss.requires_grad:   # not when a frozen decoder's layerdrop skipped every layer this step
                    self.scaler.scale(loss / args.grad_accum_steps).backward()
            step_loss = step_loss + loss.detach().float() * tokens
            step_tokens = step_tokens + tokens
            if not last_micro_batch:
                continue
            if self.optimizer_step():
                bad_in_row = 0
                loss_sum += step_loss
                token_sum += step_tokens
                if state.global_step % 10 == 0:  # float(): syncs the GPU, so only every few steps
                    bar.set_postfix(loss=f"{float(loss_sum / token_sum.clamp(min=1)):.3f}")
                if args.save_every_steps and state.global_step % args.save_every_steps == 0 and self.world.is_main:
                    state.batch_in_epoch, state.loss_sum, state.token_sum = i + 1, float(loss_sum), int(token_sum)
                    self.save_last()
            else:  # a skipped step leaves the weights and the loss log alone
                bad_in_row += 1
                state.skipped_steps += 1
                self.stop_if_diverged(bad_in_row)
            step_loss = step_tokens = 0
        bar.close()
        if self.world.size > 1:
            totals = torch.stack([loss_sum.float(), token_sum.float()])
            torch.distributed.all_reduce(totals)
            loss_sum, token_sum = totals[0], totals[1]
        return float(loss_sum / token_sum.clamp(min=1))

    def gradient_sync(self, last_micro_batch):
        """DDP all-reduces gradients only on the last micro-batch of an optimizer step."""
        if self.world.size > 1 and not last_micro_batch:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def optimizer_step(self):
        """Unscale, clip, check, step, schedule. Returns False (and skips) on a non-finite gradient."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.raw_model.parameters(), self.args.max_grad_norm)
        if math.isfinite(grad_norm):
            self.scaler.step(self.optimizer)
            self.scheduler.step()
            self.state.global_step += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return math.isfinite(grad_norm)

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
        """Predictions over (a fixed subset of) the validation set, split across processes and gathered:
        (predictions in dataset order, loss, scores, whether every clip was covered)."""
        indices = self.eval_indices(full)
        batches = length_sorted_batches(self.val_set, indices[self.world.rank:: self.world.size],
                                        self.args.eval_batch_size)
        part = translate(self.raw_model, clip_batches(self.val_set, batches, self.args.num_workers),
                         generation_kwargs(self.args), self.precision, progress=self.world.is_main)
        gathered = self.world.gather(part)
        by_index = {p.index: p for predictions, _, _ in gathered for p in predictions}
        predictions = [by_index[i] for i in sorted(by_index)]
        loss = sum(p[1] for p in gathered) / max(sum(p[2] for p in gathered), 1)
        return predictions, loss, score_predictions(predictions), len(indices) == len(self.val_set)

    def evaluate_epoch(self, epoch):
        predictions, loss, scores, full = self.evaluate(full=False)
        diagnostics = collapse_diagnostics(self.raw_model, self.val_set, [p.prediction for p in predictions],
                                           [p.reference for p in predictions])
        record = {"val_loss": loss, **score_record(scores), "eval_clips": len(predictions), **diagnostics}
        best = self.state.best
        metric = self.args.early_stopping_metric
        improved = best is None or selection_key(record, metric) > selection_key(best, metric)
        self.state.stale_evals = 0 if improved else self.state.stale_evals + 1
        if improved:  # every process tracks the best; only the main one writes it
            self.state.best = {"epoch": epoch + 1, "val_bleu": scores["bleu"], "val_chrf": scores["chrf"],
                               "val_loss": loss}
            self.best_eval = (predictions, loss, scores) if full else None
        if self.world.is_main:
            self.report(epoch, record, scores, predictions, diagnostics)
            if improved:
                atomic_torch_save(model_checkpoint(self.raw_model, self.args, epoch=epoch + 1,
                                                   val_bleu=scores["bleu"], val_loss=loss), self.out / "best_model.pt")
                if full:
                    write_best_predictions(self.out, predictions)
                logger.info(f"  new best (BLEU {scores['bleu']:.2f}): saved {self.out / 'best_model.pt'}")
        return record

    def report(self, epoch, record, scores, predictions, diagnostics):
        rouge = f" | ROUGE-L {scores['rouge_l']:.2f}" if scores["rouge_l"] is not None else ""
        logger.info(f"epoch {epoch + 1}/{self.args.epochs}: val loss {record['val_loss']:.4f} | "
                    f"BLEU {scores['bleu']:.2f} (BLEU-1..4 {' / '.join(f'{b:.1f}' for b in scores['bleu_n'])}) | "
                    f"chrF {scores['chrf']:.2f}{rouge} | "
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
        for n, p in enumerate(predictions[:5], start=1):
            logger.info(f"  {n}. [{p.id}] reference:  {p.reference}\n     prediction: {p.prediction}")

    def finish(self):
        """Score the best model on the full validation set; write results and the export."""
        if self.state.best is None:
            raise UserError("no evaluation ran; nothing to report")
        best_path = self.out / "best_model.pt"
        self.world.barrier()
        load_model_state(self.raw_model, safe_torch_load(best_path, "best model")["model_state_dict"], best_path)
        # Scores always cover every validation clip: re-evaluate unless the best epoch already did.
        predictions, loss, scores = self.best_eval or self.evaluate(full=True)[:3]
        sentences = [p.prediction for p in predictions]
        results = {"best_epoch": self.state.best["epoch"], "val_bleu": scores["bleu"],
                   **{f"bleu_{n}": value for n, value in enumerate(scores["bleu_n"], start=1)},
                   "val_chrf": scores["chrf"], "val_rouge_l": scores["rouge_l"], "val_loss": loss,
                   "signature": scores["signature"], "rouge_signature": ROUGE_SIGNATURE if scores["rouge_l"] is not None else None,
                   "distinct_share": len(set(sentences)) / max(len(sentences), 1),
                   "val_clips": len(predictions), "skipped_steps": self.state.skipped_steps,
                   "epochs_trained": self.state.epoch, "selection_metric": self.args.early_stopping_metric}
        if self.args.bleurt:
            results["val_bleurt"] = bleurt_score(sentences, [p.reference for p in predictions], self.args.bleurt,
                                                 self.device, self.args.eval_batch_size)
        if self.world.is_main:
            write_best_predictions(self.out, predictions)
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2) + "\n")
            save_t5_export(self.raw_model.t5, self.raw_model.tokenizer, self.out / "t5_export", weights=True)
            logger.info(f"Best epoch {results['best_epoch']}: BLEU {results['val_bleu']:.2f} "
                        f"(BLEU-1..4 {' / '.join(f'{b:.1f}' for b in scores['bleu_n'])}) | chrF "
                        f"{results['val_chrf']:.2f} | distinct {results['distinct_share']:.0%} | "
                        f"{scores['signature']}")
            if results.get("val_rouge_l") is not None or "val_bleurt" in results:
                logger.info("  " + " | ".join(([f"ROUGE-L {results['val_rouge_l']:.2f} ({ROUGE_SIGNATURE})"]
                                               if results.get("val_rouge_l") is not None else [])
                                              + ([f"BLEURT {results['val_bleurt']:.4f} ({self.args.bleurt})"]
                                                 if "val_bleurt" in results else [])))
            logger.info(f"Wrote {best_path}, best_predictions.tsv/.txt, results.json, metrics.jsonl, "
                        f"training_log.json and t5_export/ in {self.out}")
            if self.reporter:
                self.reporter.finish(results, [self.out / name for name in (
                    "results.json", "best_predictions.tsv", "metrics.jsonl", "training_curves.png", "train.log")])
        return results

    # -- outputs ---------------------------------------------------------------------------------

    def write_metrics(self):
        """metrics.jsonl rewritten whole and renamed into place: a kill never cuts a line; beside it the
        original module's training_log.json ([{"epoch", "train_loss", "val_bleu"}, ...])."""
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
        atomic_write_text(self.out / "training_log.json", json.dumps(
            [{"epoch": m["epoch"], "train_loss": m["train_loss"], "val_bleu": m.get("val_bleu")} for m in self.metrics],
            indent=2) + "\n")

    def record_metrics(self, record):
        self.metrics.append(record)
        self.write_metrics()
        plot_training_curves(self.metrics, self.out / "training_curves.png")
        if self.reporter:
            self.reporter.log(record, record["epoch"])

    def save_last(self):
        atomic_torch_save(model_checkpoint(
            self.raw_model, self.args, optimizer_state_dict=self.optimizer.state_dict(),
            scheduler_state_dict=self.scheduler.state_dict(), scaler_state_dict=self.scaler.state_dict(),
            train_state=vars(self.state).copy(), rng=rng_state()), self.out / "last.pt")

# ----------------------------------------------------------------------------------------------
# Experiment tracking (--report_to, the Hugging Face Trainer's convention): params once, metrics per
# evaluation, results and predictions as artifacts. Each backend is an optional package.

REPORT_BACKENDS = ("tensorboard", "mlflow", "wandb")
REPORT_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
                   "wandb": ("wandb", "wandb")}


def report_backends(report_to):
    """The installed backends a --report_to value names ('all': every installed one; 'none': none).
    One the user typed is checked before training (validate_args); the default's is skipped with a note."""
    names = list(dict.fromkeys(report_to))
    if "none" in names:
        return []
    available = []
    for name in REPORT_BACKENDS if "all" in names else names:
        missing = backend_missing(name)
        if missing and "all" not in names:
            logger.info(f"{missing}: not reporting to {name}.")
        elif not missing:
            available.append(name)
    return available


def backend_missing(name):
    """None when the backend's package imports, else the one-line message saying how to get it."""
    module, package = REPORT_PACKAGES[name]
    try:
        __import__(module)
    except ImportError:
        return f"--report_to {name} needs the {package} package: pip install {package} (or leave {name} out of --report_to)"
    return None


def flat_params(args):
    """The run's flags as strings, for a tracker's parameter table."""
    return {key: str(value)[:500] for key, value in sorted(vars(args).items())}


class RunReporter:
    """Sends one run to the trackers --report_to names. A run resumed with --resume continues the same
    tracked run (its id is kept in <output_dir>/tracking_ids.json)."""

    def __init__(self, backends, out, args, resume=False):
        self.out, self.backends = Path(out), {}
        ids_path = self.out / "tracking_ids.json"
        ids = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
        for name in backends:
            self.backends[name] = getattr(self, f"start_{name}")(args, ids.get(name))
        ids = {name: run_id for name, (_, run_id) in self.backends.items() if run_id}
        if ids:
            atomic_write_text(ids_path, json.dumps(ids) + "\n")
        for name in self.backends:
            logger.info(f"Reporting to {name}" + {"tensorboard": f" ({self.out / 'tensorboard'})",
                                                  "mlflow": " (see it with: mlflow ui)"}.get(name, ""))

    def start_tensorboard(self, args, run_id):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.out / "tensorboard"))
        writer.add_text("params", "\n".join(f"    {k}: {v}" for k, v in flat_params(args).items()))
        return writer, None

    def start_mlflow(self, args, run_id):
        import mlflow

        if run_id is None:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "train_sonar_with_t5"))
            run = mlflow.start_run(run_name=self.out.name)
            mlflow.log_params(flat_params(args))
        else:
            run = mlflow.start_run(run_id=run_id)
        return mlflow, run.info.run_id

    def start_wandb(self, args, run_id):
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "train_sonar_with_t5"), name=self.out.name,
                         dir=str(self.out), config=flat_params(args), id=run_id, resume="allow" if run_id else None)
        return run, run.id

    def log(self, record, step):
        """Numeric values of one evaluation's record, at step `step` (the epoch)."""
        metrics = {k: float(v) for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        for name, (client, _) in self.backends.items():
            if name == "tensorboard":
                for key, value in metrics.items():
                    client.add_scalar(key, value, step)
                client.flush()
            elif name == "mlflow":
                client.log_metrics(metrics, step=step)
            else:
                client.log(metrics, step=step)

    def finish(self, results, artifacts):
        """Final scores and the output files (those that exist) as artifacts; closes every run."""
        finals = {f"best_{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}
        files = [str(path) for path in artifacts if Path(path).is_file()]
        for name, (client, _) in self.backends.items():
            if name == "tensorboard":
                client.add_text("results", json.dumps(results, indent=2))
                client.close()
            elif name == "mlflow":
                client.log_metrics(finals)
                for path in files:
                    client.log_artifact(path)
                client.end_run()
            else:
                client.summary.update(finals)
                for path in files:
                    client.save(path, base_path=str(self.out), policy="now")
                client.finish()
        self.backends = {}


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and primitives (weights-only loadable), versioned

MODEL_KEYS = ("model_state_dict", "model_config", "t5_config")
RESUME_KEYS = MODEL_KEYS + ("optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict", "rng",
                            "train_state")
# Format 1 kept the bridge's weights at the top level of the model; they now live in `bridge.`.
FORMAT1_RENAMES = (("frame_projection.", "bridge.frame_encoder.frame_projection."),
                   ("frame_norm.", "bridge.frame_encoder.frame_norm."), ("bridge_blocks.", "bridge.blocks."))


def cpu_state_dict(module, keep=None):
    """State dict on CPU (the entries `keep` accepts); tensors that share storage (tied embeddings) stay shared."""
    copies, state = {}, {}
    for name, tensor in module.state_dict().items():
        if keep is not None and not keep(name):
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in copies:
            copies[key] = tensor.detach().cpu().clone()
        state[name] = copies[key]
    return state


def model_checkpoint(model, args, **extra):
    return {"format": CHECKPOINT_FORMAT, "model_state_dict": model.trained_state_dict(),
            "model_config": model.config_dict(), "t5_config": portable_t5_config(model.decoder_model),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **extra}


def check_model_checkpoint(checkpoint, path, keys=MODEL_KEYS):
    """A clear error for a file that is not (or not all of) a checkpoint this version can read."""
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise UserError(f"{path}: not a model checkpoint of this tool (no 'model_state_dict')")
    if checkpoint.get("format", 1) > CHECKPOINT_FORMAT:
        raise UserError(f"{path}: saved by a newer version of train_sonar_with_t5.py (checkpoint format "
                        f"{checkpoint['format']}, this one reads up to {CHECKPOINT_FORMAT}): update the script")
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise UserError(f"{path}: this checkpoint lacks {', '.join(missing)} (saved by an older or another "
                        "script?); rebuild the model with SONARwithT5(...) and load_state_dict, or retrain")


def upgrade_state_dict(state):
    """Keys of a format-1 state dict (bridge weights at the top level) renamed for this version."""
    if not any(key.startswith("bridge.") for key in state) and "expander" in state:
        def renamed(key):
            for old, new in FORMAT1_RENAMES:
                if key.startswith(old):
                    return new + key[len(old):]
            return key if key.startswith(("t5.", "sonar_encoder.")) or key in ("decoder_spec", "model_spec") else "bridge." + key
        state = {renamed(key): value for key, value in state.items()}
    return state


def load_model_state(model, state_dict, path):
    try:
        result = model.load_state_dict(state_dict, strict=False)   # SONARwithT5's: upgrades format-1 keys
    except RuntimeError as error:  # shape mismatches
        lines = str(error).splitlines()
        raise UserError(f"{path}: checkpoint is from another model ({(lines[1] if len(lines) > 1 else lines[0]).strip()})") from None
    # A tied T5 stores its input embedding once; the tied copies may be missing.
    tied = not is_untied(model.t5)
    missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))
               and not k.endswith("embed_tokens.weight")]
    if missing or result.unexpected_keys:
        raise UserError(f"{path}: checkpoint is from another model (missing keys: "
                        f"{missing[:5] or 'none'}; unexpected keys: {result.unexpected_keys[:5] or 'none'})")


def check_resume_compatible(saved_args, args, path, given=()):
    """Architecture flags typed on this command line must match last.pt's; the others take last.pt's
    values (so a run started by an earlier version, whose defaults differed, resumes as it was)."""
    saved = {name: saved_args.get(name, PREVIOUS_DEFAULTS.get(name)) for name in ARCHITECTURE_FLAGS}
    adopted = [name for name in ARCHITECTURE_FLAGS if name not in given and saved[name] != getattr(args, name)]
    for name in adopted:
        setattr(args, name, saved[name])
    if adopted:
        logger.info(f"--resume: as {path} was trained: " + ", ".join(f"--{n} {saved[n]!r}" for n in adopted))
    differences = [f"--{name} {saved[name]!r} (now {getattr(args, name)!r})"
                   for name in ARCHITECTURE_FLAGS if saved[name] != getattr(args, name)]
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


# ----------------------------------------------------------------------------------------------
# Modes: --check (the guide's Cell 3), --predict, --demo


def describe_decoder(name, target_lang):
    """The decoder's family, width and target language, from its config and tokenizer (not its weights)."""
    config = decoder_config(name)
    language = target_language(load_tokenizer(name, "--t5_model"), target_lang, name)
    return (f"{config.model_type}, d_model {config.d_model}" + (f", target language {language[0]}" if language else "")
            + (" (local folder)" if Path(name).is_dir() else " (hub: downloaded on first use, then cached)"))


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
    try:
        print(f"  ok  decoder '{args.t5_model}': {describe_decoder(args.t5_model, args.target_lang)}")
    except UserError as error:
        ok = False
        print(f"  ERR {error}")
    for split, manifest, features in data_splits(args):
        if features and not Path(features).is_dir():
            ok = False
            print(f"  ERR {split}: features folder not found: {features}")
            continue
        try:
            dataset = How2SignDataset(manifest, features, feature_dim=encoder_dim, split=split,
                                      trim_zero_frames=args.trim_zero_frames, feature_fps=args.feature_fps,
                                      max_samples=args.max_samples, **frame_source(args), progress=True)
        except UserError as error:
            ok = False
            print(f"  ERR {error}")
            continue
        usable = dataset.lost_share() <= args.max_skip_share     # the rule training stops on
        ok = ok and usable
        dims = ", ".join(f"{d}-d x{n}" for d, n in sorted(dataset.dim_counts.items()))
        print(f"  {'ok ' if usable else 'ERR'} {split}: {dataset.manifest_rows()} manifest rows -> "
              f"{len(dataset)} usable clips "
              f"(feature dims: {dims}; {int(dataset.lengths.min())}-{dataset.max_frames} frames)")
        if dataset.span_reading:
            print(f"      --feature_fps {args.feature_fps:g}: spans from {dataset.span_reading}")
        for reason, count in dataset.skip_kinds().most_common():
            examples = list(dict.fromkeys(clip_id for clip_id, r in dataset.skipped if skip_kind(r) == reason))[:3]
            print(f"      {count} {reason}: {', '.join(examples)}")
        if not usable:
            print(f"      {dataset.diagnosis or 'More than --max_skip_share of the rows are unusable: fix the causes above.'}")
    print("All checks passed: ready to train." if ok else "Fix the problems above before training.")
    return 0 if ok else 1


def run_predict(args, given):
    """Translate clips with a trained best_model.pt; BLEU/chrF when the manifest has references."""
    checkpoint = Path(args.checkpoint or Path(args.output_dir) / "best_model.pt")
    device = resolve_device(args.device)
    contents = safe_torch_load(checkpoint, "model checkpoint")
    model = SONARwithT5.from_checkpoint(checkpoint, device, checkpoint=contents,
                                        base=args.t5_model if "t5_model" in given else None)
    saved = contents.get("args", {})
    for name in DECODING_FLAGS:  # decode as in training unless this command says otherwise
        if name not in given and name in saved:
            setattr(args, name, saved[name])
    dataset = How2SignDataset(args.manifest, args.features, feature_dim=model.sonar_encoder.input_dim,
                              split="predict", require_text=args.manifest is not None,
                              return_frames=model.options["frame_attention"], trim_zero_frames=args.trim_zero_frames,
                              feature_fps=args.feature_fps, **frame_source(args), progress=True)
    report_dataset(dataset, args.manifest or args.features)
    batches = length_sorted_batches(dataset, range(len(dataset)), args.eval_batch_size)
    predictions, _, _ = translate(model, clip_batches(dataset, batches, args.num_workers), generation_kwargs(args),
                                  resolve_precision(args.precision, device), with_loss=False, progress=True)
    predictions.sort(key=lambda p: p.index)
    out = Path(args.predictions_file or checkpoint.parent / "predictions.tsv")
    atomic_write_text(out, "id\tprediction\n" + "".join(f"{clean(p.id)}\t{clean(p.prediction)}\n"
                                                        for p in predictions))
    logger.info(f"Wrote {len(predictions)} translations to {out}")
    if args.manifest is not None:
        scores = score_predictions(predictions)
        logger.info(f"BLEU {scores['bleu']:.2f} | chrF {scores['chrf']:.2f} | {scores['signature']}")
    return 0


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
DEMO_FPS = 8    # the demo's feature frames per second (a sentence of ~30 frames lasts ~4 s)


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


def build_tiny_t5(tokenizer, folder, d_model=128, layers=2, heads=4, seed=0, vocab_size=None, untied=False):
    """A randomly initialised T5 (+ tokenizer) saved in `folder`; vocab_size defaults to the tokenizer's.
    `untied`: T5 v1.1's shape (gated-GELU feed-forward, an output head of its own)."""
    from transformers import T5Config

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size or len(tokenizer), d_model=d_model, d_ff=4 * d_model, d_kv=d_model // heads,
                      num_heads=heads, num_layers=layers, num_decoder_layers=layers, dropout_rate=0.1,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      feed_forward_proj="gated-gelu" if untied else "relu", tie_word_embeddings=not untied)
    t5 = t5_from_config(json.loads(config.to_json_string()), untied)
    if untied:   # an output head that differs from the embedding, as a trained v1.1 model has
        nn.init.normal_(t5.lm_head.weight, std=d_model ** -0.5)
    save_t5_export(t5, tokenizer, folder, weights=True)
    return folder


TINY_FAMILIES = {   # family -> (model_type, language codes added to the tokenizer, scaled token embeddings)
    "t5": ("t5", (), False), "mt5": ("mt5", (), False), "bart": ("bart", (), False),
    "mbart": ("mbart", ("en_XX", "fr_XX", "de_DE"), True), "nllb": ("m2m_100", ("eng_Latn", "fra_Latn", "deu_Latn"), True)}


def build_tiny_seq2seq(tokenizer, folder, family="t5", d_model=128, layers=2, heads=4, seed=0):
    """A randomly initialised model of a family (TINY_FAMILIES) and its tokenizer, saved in `folder`,
    loadable offline like the hub's: mt5 is T5 v1.1-shaped; nllb is M2M100 (NLLB-200's architecture)
    and mbart mBART-50, each with language-code tokens; they start decoding from </s>, as theirs do."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    if family == "t5":
        return build_tiny_t5(tokenizer, folder, d_model, layers, heads, seed)
    model_type, codes, scaled = TINY_FAMILIES[family]
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
    model = t5_from_config(json.loads(config.to_json_string()), untied=model_type == "mt5")
    if model_type == "mt5":   # an output head that differs from the embedding, as a trained mT5 has
        nn.init.normal_(model.lm_head.weight, std=d_model ** -0.5)
    save_t5_export(model, tokenizer, folder, weights=True)
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
            start, end = (offset + gap) / DEMO_FPS, (offset + gap + len(clips[i])) / DEMO_FPS
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


def make_demo_data(root, num_train=2200, num_val=200, feature_dim=256, seed=0,
                   t5_folder="t5-tiny", target_cosine=0.99, messy=True, sentences=None, layout="clips"):
    """Write a How2Sign-shaped project: features/{train,val}/<id>.npy, manifests/{train,val}.tsv,
    data/How2Sign_val.json, an encoder checkpoint in the users' format, and a tiny T5 + tokenizer.

    Each word has a "sign" (a random vector shown over 2-4 noisy frames); every frame also carries a
    large component shared by all clips, scaled until the frozen encoder's embeddings of different
    clips reach a mean pairwise cosine >= target_cosine, as the users' real encoder does.
    layout="videos" writes what the users really have instead: one file per video of ~15 sentences,
    a video-level TSV and How2Sign's CSV (write_video_layout).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    sentences = list(sentences) if sentences is not None else demo_sentences(num_train + num_val, rng)
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
        if layout == "videos":
            write_video_layout(root, split, [clips[i] + scale * shared for i in indices],
                               [sentences[i] for i in indices], rng, scale * shared)
            continue
        folder = root / "features" / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["id\tduration\ttext"]
        for i in indices:
            clip_id = f"demo_{split}_{i:05d}"
            np.save(folder / f"{clip_id}.npy", clips[i] + scale * shared)
            lines.append(f"{clip_id}\t{len(clips[i]) / DEMO_FPS:.2f}\t{sentences[i]}")
            if split == "val":
                json_rows.append({"id": clip_id, "text": sentences[i],
                                  "features": f"../features/val/{clip_id}.npy"})
        if messy and split == "train":  # what real manifests contain: both are skipped and listed
            lines += ["\t1.00\tA row whose id is empty.", "demo_missing_clip\t2.00\tA clip that is not there."]
        (root / "manifests").mkdir(exist_ok=True)
        (root / "manifests" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    if json_rows:
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / "How2Sign_val.json").write_text(json.dumps(json_rows, indent=1))
    if t5_folder:
        build_tiny_t5(build_tokenizer(sentences), root / t5_folder, seed=seed)
    with torch.no_grad():
        cosine = mean_pairwise_cosine(encoder(probe + scale * torch.from_numpy(shared)))
    (root / "READY").write_text(json.dumps({"encoder_cosine": cosine}))   # written last: data complete
    return {"root": root, "encoder": encoder_path, "t5": root / t5_folder if t5_folder else None,
            "encoder_cosine": cosine, "vocabulary": len(vocabulary)}


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


# ----------------------------------------------------------------------------------------------
# Command line

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
    g.add_argument("--t5_model", default=DEFAULT_T5,
                   help="the decoder: any encoder-decoder model AutoModelForSeq2SeqLM loads, hub name or local "
                        "folder (t5-small, google/flan-t5-base, google/mt5-small, facebook/bart-base, "
                        "facebook/mbart-large-50, facebook/nllb-200-distilled-600M); the name is the guide's")
    g.add_argument("--log_file", default=None, help="log file (default <output_dir>/train.log)")

    g = p.add_argument_group("data")
    g.add_argument("--feature_fps", type=float, default=None,
                   help="feature files hold whole VIDEOS at this many feature frames per second: each manifest "
                        "row becomes its own sample, its time span cut from its video's file")
    g.add_argument("--max_samples", type=int, default=None,
                   help="use only the first N clips of the train and of the validation set (the original's "
                        "flag, for quick tests)")
    g.add_argument("--max_skip_share", type=float, default=0.5,
                   help="stop before training when a split loses more than this share of its manifest rows "
                        "(1: train on whatever is left)")
    g.add_argument("--frame_store", action=argparse.BooleanOptionalAction, default=True,
                   help="read the clip files once into a memory-mapped frame store on local disk, which later "
                        "runs, --resume, --predict and every torchrun process read instead of the files")
    g.add_argument("--cache_dir", default=None,
                   help=f"where frame stores live (default ${CACHE_ENV}, else ~/.cache/train_sonar_with_t5: on "
                        "Colab the VM's local disk, not Drive)")
    g.add_argument("--frame_cache_gb", type=float, default=4.0,
                   help="--no-frame_store: keep up to this many GB of frames in memory (fp16); the rest "
                        "are read from disk at every step")

    g = p.add_argument_group("bridge (see --help of each; the guide's troubleshooting knobs)")
    g.add_argument("--bridge", choices=BRIDGE_KINDS, default=MODEL_DEFAULTS["bridge"],
                   help="prefix_memory: per-query content refined by attention; memory: memory tokens + "
                        "attention; prefix: MLP prefix, no attention; guide: the guide's single-key attention "
                        "(collapses)")
    g.add_argument("--num_queries", type=int, default=MODEL_DEFAULTS["num_queries"],
                   help="learnable query tokens (expander length) fed to T5")
    g.add_argument("--num_heads", type=int, default=MODEL_DEFAULTS["num_heads"], help="attention heads")
    g.add_argument("--bridge_layers", type=int, default=MODEL_DEFAULTS["bridge_layers"], help="bridge depth")
    g.add_argument("--memory_tokens", type=int, default=MODEL_DEFAULTS["memory_tokens"],
                   help="key/value tokens projected from the embedding")
    g.add_argument("--bridge_ff_dim", type=int, default=MODEL_DEFAULTS["bridge_ff_dim"],
                   help="bridge feed-forward and prefix MLP width (0: 4 x d_model)")
    g.add_argument("--bridge_dropout", type=float, default=MODEL_DEFAULTS["bridge_dropout"], help="bridge dropout")
    g.add_argument("--bridge_layernorm", action=argparse.BooleanOptionalAction,
                   default=MODEL_DEFAULTS["bridge_layernorm"],
                   help="LayerNorm on the bridge output, scaled to T5's embedding scale")
    g.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=MODEL_DEFAULTS["standardize"],
                   help="standardise the frozen embedding (and frames) with training-set mean/std")
    g.add_argument("--frame_attention", action=argparse.BooleanOptionalAction,
                   default=MODEL_DEFAULTS["frame_attention"],
                   help="the clip's frames (standardised, strided, with positions) go to T5 beside the bridge's "
                        "tokens (--frame_route), and the bridge's queries attend to them too (--no-frame_attention: the "
                        "sentence embedding only)")
    g.add_argument("--frame_stride", type=int, default=MODEL_DEFAULTS["frame_stride"],
                   help="temporal striding: one frame token every this many frames")
    g.add_argument("--frame_kernel", type=int, default=MODEL_DEFAULTS["frame_kernel"],
                   help="consecutive frames that make one frame token (at least --frame_stride)")
    g.add_argument("--frame_route", choices=FRAME_ROUTE_CHOICES, default=MODEL_DEFAULTS["frame_route"],
                   help="where the frame tokens go: 'cross_attention' (beside the encoder's output, straight into "
                        "the decoder's cross-attention: the encoder reads only the bridge's tokens), 'encoder' (the "
                        "decoder's encoder reads them after the bridge's tokens; slower), or 'auto': cross_attention "
                        "for T5 and mT5 decoders, encoder for the others (BART, M2M100 / NLLB-200), as measured")
    g.add_argument("--frame_memory_layers", type=int, default=MODEL_DEFAULTS["frame_memory_layers"],
                   help="with --frame_route cross_attention: self-attention layers over the frame tokens first")
    g.add_argument("--frame_memory_ff_dim", type=int, default=MODEL_DEFAULTS["frame_memory_ff_dim"],
                   help="feed-forward width of those layers (0: the bridge's, 4 x d_model, over "
                        "--frame_memory_divisor; a narrower one is faster and scored lower in bench/quality.py)")
    g.add_argument("--frame_memory_divisor", type=int, default=MODEL_DEFAULTS["frame_memory_divisor"],
                   help="run those layers at d_model / this width, projected down and back up (1: at d_model)")
    g.add_argument("--freeze_encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the sentence encoder frozen (--no-freeze_encoder trains it at a lower rate)")
    g.add_argument("--prefix_dim", type=int, default=MODEL_DEFAULTS["prefix_dim"],
                   help=f"hidden width of the prefix MLP (0: the feed-forward width, or {ADAPTER_PREFIX_DIM} with "
                        "--freeze_t5 / --lora_rank, which keeps their checkpoints small)")

    g = p.add_argument_group("decoder (--t5_model)")
    g.add_argument("--target_lang", default=None,
                   help="a multilingual decoder's target language code (NLLB eng_Latn, mBART-50 en_XX, M2M100 "
                        "en): labels start with it and generation is forced to start with it; default English")
    g.add_argument("--freeze_t5", action="store_true",
                   help="keep the decoder's weights frozen: only the bridge (and frame path) train; checkpoints "
                        "hold those plus the base model's name and fingerprint, not its weights")
    g.add_argument("--lora_rank", type=int, default=0,
                   help="train LoRA adapters of this rank on the decoder's attention (needs peft), the base frozen")
    g.add_argument("--lora_alpha", type=int, default=0, help="LoRA scaling alpha (0: 2 x --lora_rank)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute the decoder's activations in the backward pass: less memory, ~30%% slower")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20, help="training epochs")
    g.add_argument("--batch_size", type=int, default=16, help="clips per step and process")
    g.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=5e-5, help="peak learning rate of T5")
    g.add_argument("--bridge_learning_rate", type=float, default=None,
                   help=f"peak learning rate of the (randomly initialised) bridge; default {DEFAULT_BRIDGE_LR:g} "
                        "whatever --learning_rate is, or learning_rate x --bridge_lr_scale when that is given")
    g.add_argument("--bridge_lr_scale", type=float, default=None,
                   help="bridge learning rate = learning_rate x this (unless --bridge_learning_rate is given)")
    g.add_argument("--encoder_lr_scale", type=float, default=0.1,
                   help="encoder learning rate = learning_rate x this (with --no-freeze_encoder)")
    g.add_argument("--warmup_steps", type=int, default=500, help="linear warm-up steps")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--label_smoothing", type=float, default=0.1, help="label smoothing of the training loss")
    g.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                   help="with frames: training batches of clips of similar length (less padding, faster steps)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--max_target_length", type=int, default=128, help="target tokens kept per sentence")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:N or cpu (cuda falls back to CPU with a warning)")
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
    d = DECODING_DEFAULTS
    g.add_argument("--num_beams", type=int, default=d["num_beams"], help="beam search width (1: greedy)")
    g.add_argument("--max_new_tokens", type=int, default=d["max_new_tokens"], help="longest generated sentence")
    g.add_argument("--length_penalty", type=float, default=d["length_penalty"],
                   help="beam search: >1 favours longer sentences, <1 shorter (1.5 measured best in "
                        "bench/quality.py: our models' sentences otherwise run short)")
    g.add_argument("--repetition_penalty", type=float, default=d["repetition_penalty"], help="the guide used 1.5")
    g.add_argument("--no_repeat_ngram_size", type=int, default=d["no_repeat_ngram_size"],
                   help="the guide used 2")
    g.add_argument("--do_sample", action="store_true", help="sample instead of beam search (hides collapse)")
    g.add_argument("--temperature", type=float, default=d["temperature"], help="sampling temperature (with --do_sample)")
    g.add_argument("--top_p", type=float, default=d["top_p"], help="nucleus sampling (with --do_sample)")

    g.add_argument("--patience", type=int, default=0,
                   help="early stopping: stop after this many evaluations without improvement of "
                        "--early_stopping_metric (0: never)")
    g.add_argument("--early_stopping_metric", choices=("bleu", "chrf", "loss"), default="bleu",
                   help="what picks best_model.pt and counts for --patience (ties: lower validation loss)")
    g.add_argument("--bleurt", default=None, metavar="CHECKPOINT",
                   help="also score the best model with BLEURT (needs the bleurt-pytorch package), e.g. "
                        "lucadiliello/BLEURT-20-D12")
    g.add_argument("--report_to", nargs="+", choices=("tensorboard", "mlflow", "wandb", "all", "none"),
                   default=["tensorboard"],
                   help="experiment trackers (Hugging Face Trainer's convention): params once, metrics per "
                        "evaluation, results and predictions as artifacts. mlflow follows MLFLOW_TRACKING_URI "
                        "and MLFLOW_EXPERIMENT_NAME, wandb WANDB_PROJECT")

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
    for name in ("epochs", "batch_size", "grad_accum_steps", "num_queries", "num_heads", "bridge_layers", "frame_stride", "frame_kernel",
                 "frame_memory_divisor",
                 "memory_tokens", "eval_every", "eval_batch_size", "num_beams", "max_new_tokens",
                 "max_target_length", "max_bad_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.frame_memory_layers < 0:
        problems.append(f"--frame_memory_layers must be at least 0 (got {args.frame_memory_layers})")
    if args.frame_kernel < args.frame_stride:
        problems.append(f"--frame_kernel {args.frame_kernel} must be at least --frame_stride {args.frame_stride} "
                        "(frames between windows would be skipped)")
    if args.freeze_t5 and args.lora_rank:
        problems.append("--freeze_t5 and --lora_rank: LoRA already keeps the base frozen; use one of them")
    if args.lora_rank and not args.check and not args.predict and importlib.util.find_spec("peft") is None:
        problems.append("--lora_rank needs the peft package: pip install peft")
    if args.max_samples is not None and args.max_samples < 1:
        problems.append(f"--max_samples must be at least 1 (got {args.max_samples})")
    if not args.check and not args.predict:
        explicit = [name for name in dict.fromkeys(args.report_to) if name in REPORT_BACKENDS]
        problems += [message for message in map(backend_missing, explicit) if message]
        if args.bleurt and importlib.util.find_spec("bleurt_pytorch") is None:
            problems.append("--bleurt needs the bleurt-pytorch package: pip install "
                            "git+https://github.com/lucadiliello/bleurt-pytorch.git (or leave out --bleurt)")
    for name in ("warmup_steps", "max_eval_clips", "save_every_steps", "num_workers", "patience",
                 "bridge_ff_dim", "frame_memory_ff_dim", "no_repeat_ngram_size", "frame_cache_gb", "prefix_dim", "lora_rank", "lora_alpha"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be 0 or more (got {getattr(args, name)})")
    for name in ("learning_rate", "encoder_lr_scale", "max_grad_norm", "temperature", "repetition_penalty",
                 "length_penalty"):
        if not getattr(args, name) > 0:
            problems.append(f"--{name} must be positive (got {getattr(args, name)})")
    for name in ("bridge_learning_rate", "bridge_lr_scale", "feature_fps"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            problems.append(f"--{name} must be positive (got {getattr(args, name)})")
    for name, low, high in (("label_smoothing", 0, 1), ("bridge_dropout", 0, 1)):
        if not low <= getattr(args, name) < high:
            problems.append(f"--{name} must be in [{low}, {high}) (got {getattr(args, name)})")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p must be in (0, 1] (got {args.top_p})")
    if not 0 <= args.max_skip_share <= 1:
        problems.append(f"--max_skip_share must be in [0, 1] (got {args.max_skip_share})")
    try:
        resolve_device(args.device)
    except UserError as error:
        problems.append(str(error))
    if sum([args.check, args.predict, args.demo]) > 1:
        problems.append("--check, --predict and --demo are separate modes: use one")
    folders = []
    if args.predict:
        if not args.features and not args.manifest:
            problems.append("--predict needs --features (a folder of clips) or --manifest")
        folders = [("features", args.features)] if args.features else []
    elif not args.check and not args.demo:
        folders = [("train_features", args.train_features), ("val_features", args.val_features)]
        for flag in ("train_manifest", "val_manifest", "sonar_checkpoint"):
            if not Path(getattr(args, flag)).is_file():
                problems.append(f"--{flag} file not found: {getattr(args, flag)}")
    for flag, folder in folders:
        if Path(folder).is_file():
            problems.append(f"--{flag} {folder} is a file: pass the folder that holds the <id>.npy / <id>.pt files")
        elif not Path(folder).is_dir():
            problems.append(f"--{flag} folder not found: {folder}")
    if args.num_heads >= 1 and not args.predict and Path(args.t5_model).is_dir():
        with contextlib.suppress(OSError, ValueError, KeyError):
            d_model = json.loads((Path(args.t5_model) / "config.json").read_text())["d_model"]
            if d_model % args.num_heads:
                problems.append(f"--num_heads {args.num_heads} does not divide the decoder's d_model {d_model}")
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    given = explicit_flags(argv)
    args.output_dir = args.output_dir or ("demo_output" if args.demo else "checkpoints/sonar_t5")
    is_main = int(os.environ.get("RANK", "0")) == 0
    log_file = None if (args.check or args.predict) else (args.log_file or Path(args.output_dir) / "train.log")
    setup_logging(log_file, is_main)
    try:
        validate_args(args)
        if args.check:
            return run_check(args)
        if args.predict:
            return run_predict(args, given)
        if args.demo:
            prepare_demo(args, given)
        trainer = Trainer(args, setup_world(args.device), given)
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
