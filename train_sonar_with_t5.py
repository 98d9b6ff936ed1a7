"""Translate sign-language video to English: clip features -> a frozen sentence encoder and the frames (or
the frames alone: --sonar_checkpoint none) -> a bridge -> any encoder-decoder model (T5 by default),
trained from the command line or from Python.

    python train_sonar_with_t5.py --demo                        # offline demo, generated data, tiny T5
    python train_sonar_with_t5.py --check  <the training flags>  # every path and clip, before training
    python train_sonar_with_t5.py <the guide's Cell 5 flags>     # train (add --resume after a disconnect)
    python train_sonar_with_t5.py --predict --checkpoint OUT/best_model.pt --features FOLDER [--manifest M]
    torchrun --standalone --nproc_per_node=N train_sonar_with_t5.py <the same flags>

Sections, in order:
  1. Configuration   ModelConfig: everything that shapes the model, kept once, saved in its state dict.
  2. Safe file I/O   weights-only loading, atomic writes, one-line errors for a full disk.
  3. Manifests       TSV, How2Sign's CSV, Tarrés et al.'s and SSVP-SLT's, JSON; video-level diagnosis, spans.
  4. Frame store     clip files found (subfolders too, pickles refused), read once into a local memory-mapped store.
  5. Dataset         How2SignDataset (clips, texts, lengths, frame statistics) and its collates.
  6. Encoder         SentenceEncoder: the users' fine-tuned mean-pool MLP (best_encoder.pt).
  7. Bridge          the sentence embedding (frames alone: FrameSummary) and the frames -> the decoder's inputs.
  8. Decoder         DecoderAdapter: any seq2seq model (full or LoRA) behind one loss and one generate.
  9. Model           SONARwithT5: encoder + bridge + decoder; rebuilt from a state dict's configuration.
 10. Checkpoints     what best_model.pt and last.pt hold, and reading them back.
 11. Decoding        one translation loop, metrics (BLEU-1..4, chrF, ROUGE-L, repeats, length), collapse diagnostics.
 12. Guide's API     evaluate_model, evaluate, train_epoch, collate_fn: the guide's and original module's calls.
 13. Training        processes, precision, batches, Trainer (set-up, epochs, evaluation, the test split, outputs).
 14. Tracking        --report_to tensorboard / mlflow.
 15. Modes           --check, --predict (and --sweep), --compare, --demo (its generated data).
 16. Command line    the flags, their validation, main().
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import errno
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
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
# 1. Configuration

DEFAULT_T5 = "t5-small"
# Where the frame tokens go is the decoder family's: beside the encoder's output for these (measured better for
# T5 and mT5 in bench/quality.py, docs/benchmarks/quality.md), in the encoder for the others (BART and M2M100 /
# NLLB-200 learned far worse beside it).
CROSS_ROUTE_FAMILIES = ("t5", "mt5")
ADAPTER_PREFIX_DIM = 256     # the prefix MLP's width beside a LoRA decoder: small checkpoints
CHECKPOINT_FORMAT = 3        # state dicts carry their ModelConfig; earlier formats are refused
WHITENING_SHRINKAGE = 1.0    # how softly frames are whitened (0: fully); docs/benchmarks/quality.md measured 1


class UserError(Exception):
    """A problem the user can fix (a path, a flag, a file): printed as one line, no traceback."""


def flag(default, group, help, rule=None, choices=None):
    """A ModelConfig field that the command-line flag of its name sets: its help, and the rule a value must
    keep (validate_args' RULES)."""
    return field(default=default, metadata={"group": group, "help": help, "rule": rule, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    """What shapes the model, as asked for: the flags of the same names (build_parser makes them from these
    fields), or SONARwithT5's keywords. Values that follow from it (the frame route `auto` picks, the prefix
    width, the target-language code) are derived, not stored. The state dict carries it (get_extra_state),
    so --resume, --predict, from_checkpoint and the guide's Cell 7 rebuild exactly what was trained."""
    encoder_dims: tuple | None = None     # the sentence encoder's layer sizes (from its checkpoint); None: frames alone
    feature_dim: int | None = None        # the frames' width (None: the encoder's input width)
    freeze_encoder: bool = flag(True, "bridge", "keep the sentence encoder frozen (--no-freeze_encoder trains it at "
                                "--encoder_lr_scale)")
    num_queries: int = flag(32, "bridge", "learnable query tokens (the guide's `expander` length) fed to the decoder", "at least 1")
    num_heads: int = flag(8, "bridge", "attention heads (bridge and frame layers)", "at least 1")
    bridge_layers: int = flag(1, "bridge", "bridge depth", "at least 1")
    memory_tokens: int = flag(8, "bridge", "key/value tokens projected from the sentence embedding", "at least 1")
    bridge_ff_dim: int = flag(0, "bridge", "feed-forward width of the bridge and frame layers (0: 4 x d_model)", "0 or more")
    bridge_dropout: float = flag(0.1, "bridge", "bridge dropout", "in [0, 1)")
    frame_stride: int = flag(2, "frames", "temporal striding: one frame token every this many frames", "at least 1")
    frame_kernel: int = flag(4, "frames", "consecutive frames that make one frame token (at least --frame_stride)", "at least 1")
    frame_memory_layers: int = flag(1, "frames", "T5 and mT5 decoders: self-attention layers over the frame tokens, which "
                                    "go beside the encoder's output", "0 or more")
    t5_model: str = flag(DEFAULT_T5, "paths", "the decoder: any encoder-decoder model AutoModelForSeq2SeqLM loads, hub "
                         "name or local folder (t5-small, google/flan-t5-base, google/mt5-small, facebook/bart-base, "
                         "facebook/mbart-large-50, facebook/nllb-200-distilled-600M); the name is the guide's")
    target_lang: str | None = flag(None, "decoder", "a multilingual decoder's target language code (NLLB eng_Latn, "
                                   "mBART-50 en_XX, M2M100 en): labels and generation start with it; default English")
    lora_rank: int = flag(0, "decoder", "train LoRA adapters of this rank on the decoder's attention (needs peft), "
                          "the base frozen", "0 or more")
    lora_alpha: int = flag(0, "decoder", "LoRA scaling alpha (0: 2 x --lora_rank)", "0 or more")
    gradient_checkpointing: bool = flag(False, "decoder", "recompute the decoder's activations in the backward pass: "
                                        "less memory, ~30%% slower")
    decoder_config: dict | None = None    # the decoder's own config (filled in when the model is built)
    decoder_fingerprint: str | None = None  # a LoRA decoder's base weights (checkpoints omit them)

    FLAGS = ()   # (set below: the fields that have a flag)

    def __post_init__(self):
        if self.encoder_dims is not None:
            object.__setattr__(self, "encoder_dims", tuple(self.encoder_dims))

    @classmethod
    def from_args(cls, args, **facts):
        return cls(**{name: getattr(args, name) for name in cls.FLAGS}, **facts)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self):
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def decoder_training(self):
        return "lora" if self.lora_rank else "full"

    @property
    def family(self):
        return (self.decoder_config or {}).get("model_type", "t5")

    @property
    def d_model(self):
        return self.decoder_config["d_model"]

    @property
    def route(self):
        """Where the frame tokens go: beside the encoder's output ('cross_attention') for CROSS_ROUTE_FAMILIES,
        else read by the decoder's encoder after the bridge's tokens ('encoder')."""
        return family_route(self.family)

    @property
    def ff_width(self):
        return self.bridge_ff_dim or 4 * self.d_model

    @property
    def prefix_width(self):
        """ADAPTER_PREFIX_DIM beside a LoRA decoder, else the feed-forward width."""
        return ADAPTER_PREFIX_DIM if self.decoder_training != "full" else self.ff_width

    @property
    def uses_encoder(self):
        """False for frames alone (--sonar_checkpoint none): a summary learned from the frames stands in."""
        return self.encoder_dims is not None

    @property
    def frame_width(self):
        """The frames' width: feature_dim, else the encoder's input width (None before either is known)."""
        return self.feature_dim or (self.encoder_dims[0] if self.encoder_dims else None)

    def same_decoder(self, other):
        """Whether `other` holds the same decoder (its folder's name aside: it differs between machines)."""
        keys = ("decoder_config", "decoder_training", "target_lang", "lora_rank", "lora_alpha", "decoder_fingerprint")
        return all(getattr(self, key) == getattr(other, key) for key in keys)


ModelConfig.FLAGS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata)
# Options retired on 2026-12-07: measurements rejected them and no default used them (their numbers are in
# docs/benchmarks' archives; CHANGELOG.md lists them). A flag: (its retired values, None: the flag itself; what
RETIRED = {   # replaced it)
    "bridge": (None, "the bridge is always prefix_memory (the guide's single-key bridge collapsed: docs/benchmarks/collapse.md)"),
    "bridge_layernorm": (None, "the bridge's output is always LayerNorm-scaled to the decoder's embeddings (the guide's step 3)"),
    "frame_attention": (None, "the model always reads the clip's frames (the sentence embedding alone scored 6.49 against "
                              "33.38 BLEU in bench/quality.py)"),
    "freeze_t5": (None, "train LoRA adapters instead, which keep the base frozen: --lora_rank 8 (36.41 against 33.73 BLEU)"),
    "frame_summary": (None, "frames alone always learn the attention summary, which scored higher than the mean"),
    **dict.fromkeys(("frame_store", "frame_cache_gb"), (None, "clips are always read once into the frame store; put it "
                                                              "elsewhere with --cache_dir DIR")),
    "bridge_lr_scale": (None, "set the bridge's rate itself with --bridge_learning_rate LR"),
    "standardize": (None, "the bridge always standardises its input (without it, it collapsed)"),
    "prefix_dim": (None, "the prefix MLP is as wide as the feed-forward (--bridge_ff_dim), 256 beside a LoRA decoder"),
    "report_to": (("wandb", "all"), "the trackers are TensorBoard (the default) and MLflow: name them, e.g. --report_to mlflow"),
    **dict.fromkeys(("do_sample", "temperature", "top_p"), (None, "decoding is deterministic beam search (sampling hid "
                                                                  "collapse and made --predict irreproducible)")),
    "compile": (None, "it was never measured faster: shapes change every batch (dynamic padding)"),
    "strict": (None, "--max_skip_share 0 stops before training on any unusable row or clip, naming the causes"),
    "num_workers": (None, "items come from the memory-mapped frame store (extra DataLoader processes were never measured)"),
    "group_by_length": (None, "training batches are always of clips of similar length (less padding, faster steps)"),
    "frame_route": (None, "frames go where they scored higher for the decoder's family (the former auto): beside the "
                          "encoder's output for T5 and mT5, into the encoder for BART and M2M100 / NLLB-200"),
    "bleurt": (None, "it was never measured or tested here; score best_predictions.tsv or test_predictions.tsv with "
                     "BLEURT afterwards (docs/training.md shows how)"),
    "max_eval_clips": (None, "every evaluation decodes every validation clip (a subset was never measured; evaluate less "
                             "often with --eval_every N)"),
    "frame_centering": (None, "it lost on bench/quality.py (27.21 against 32.00 BLEU); pose clips are centred on the "
                              "shoulders when they are prepared"),
    "word_loss": (None, "every form screened lost BLEU (up to 8.5) on bench/quality.py's word-per-sign "
                        "rows (docs/benchmarks/quality.md)"),
}
KEPT_VALUES = {"frame_summary": ("attention",), "standardize": (True,), "prefix_dim": (None,),   # what checkpoints may hold
               "frame_centering": (False,), "bridge": ("prefix_memory",), "bridge_layernorm": (True,),
               "frame_attention": (True,), "freeze_t5": (False,), "word_loss": (0.0,)}


def family_route(family):
    return "cross_attention" if family in CROSS_ROUTE_FAMILIES else "encoder"


def retired_flag(argv):
    """The one line for a retired flag (or flag value) on a command line, else None."""
    for i, token in enumerate(argv):
        name, _, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        values, replacement = RETIRED.get(name.removeprefix("no-"), ((), None))
        value = value or (argv[i + 1] if i + 1 < len(argv) else "")
        if replacement and (values is None or value in values):
            return f"{token if values is None else f'--{name} {value}'} was retired: {replacement}"
    return None


def retired_option(config_dict):
    """('--flag value', what replaced it) of a retired option a saved configuration used, else None."""
    route = family_route((config_dict.get("decoder_config") or {}).get("model_type", "t5"))
    kept = {**KEPT_VALUES, "frame_route": ("auto", route)}
    for name, (values, replacement) in RETIRED.items():
        saved = config_dict.get(name, kept.get(name, (None,))[0])
        if saved in (values or ()) or (name in kept and saved not in kept[name]):
            return f"--{name} {saved}", replacement
    return None


DEFAULT_BRIDGE_LR = 3e-3   # bench/quality.py: a random bridge at T5's fine-tuning rate (5e-5) barely learns
DECODING_DEFAULTS = dict(num_beams=4, max_new_tokens=64, length_penalty=1.5, repetition_penalty=1.0,
                         no_repeat_ngram_size=0)
# After training, the best checkpoint's decoding is chosen on the validation clips from this grid (--decoding_grid)
DECODING_GRID = "length_penalty=1.0,1.5 no_repeat_ngram_size=0,3"
FEATURE_SUFFIXES = (".npy", ".pt")
PICKLE_SUFFIXES = (".pkl", ".pickle")
ORIGINAL_PAD_FRAMES = 300    # the original collate padded (or cut) every clip to 300 frames


# ----------------------------------------------------------------------------------------------
# 2. Safe file I/O: weights-only loading, atomic writes


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
    if magic[:2] != b"PK" and magic[:1] != b"\x80":     # neither torch's zip format nor its legacy pickle
        raise UserError(f"{path}: the {what} is not a PyTorch checkpoint (saved with torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds; all mean "this file is not usable"
        if "Weights only load failed" in str(error) or "weights_only" in str(error):
            raise UserError(f"{path}: refused to load the {what}: it holds Python objects beyond "
                            "tensors, which could run code (weights-only loading). Re-save it as a "
                            "plain dict of tensors") from None
        raise UserError(f"{path}: cannot read the {what}: not a PyTorch checkpoint or truncated "
                        f"({first_line(error)})") from None


def is_disk_full(error):
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


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
        if is_disk_full(error):
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
# 3. Manifests: TSV (id / duration / text), How2Sign's CSV, Tarrés et al.'s and SSVP-SLT's TSVs, JSON, JSON Lines


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


class Manifest(list):
    """A manifest's rows, and the layout they were read as (named by --check and the training log)."""

    def __init__(self, rows, layout):
        super().__init__(rows)
        self.layout = layout


def is_pickle(path):
    """Whether a file is a pickle (protocol 2 or later), or an .npy whose array holds one (object dtype)."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    if head[:1] == b"\x80":
        return True
    if head == b"\x93NUMPY":
        try:
            np.load(path, allow_pickle=False, mmap_mode="r")
        except ValueError:
            return True
    return False


def is_ssvp_row(fields):
    """SSVP-SLT's headerless `<split>_features.tsv`: video_name (with its .mp4), length, label."""
    return len(fields) >= 3 and fields[0].strip().endswith(".mp4") and fields[1].strip().isdigit()


def read_manifest(path):
    """Rows of a manifest, format chosen by extension and header. Raises UserError on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}" + (" (it is a folder: pass the manifest file)"
                                                         if path.is_dir() else ""))
    if path.suffix in PICKLE_SUFFIXES or is_pickle(path):
        raise refuse_pickle(path, "manifest")        # (SpaMo's *_info_ml.npy needs allow_pickle=True)
    if path.suffix in (".json", ".jsonl"):
        return Manifest(_read_json_manifest(path), "JSON Lines" if path.suffix == ".jsonl" else "JSON")
    reader = csv.reader(decode_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [name.strip() for name in next(reader, [])]
    columns = {name: i for i, name in enumerate(header)}
    first_line = 2
    if {"SENTENCE_NAME", "SENTENCE"} <= set(columns):  # official how2sign_realigned_*.csv
        layout = "How2Sign's realigned CSV (SENTENCE_NAME, SENTENCE, VIDEO_NAME, START/END_REALIGNED)"
        names = dict(id="SENTENCE_NAME", text="SENTENCE", video="VIDEO_NAME",
                     start="START_REALIGNED" if "START_REALIGNED" in columns else "START",
                     end="END_REALIGNED" if "END_REALIGNED" in columns else "END")
    elif {"id", "signs_file", "translation"} <= set(columns):
        layout = ("Tarrés et al. 2023's fairseq TSV (id, signs_file, translation): each clip is found by its id "
                  "under the features folder; signs_file (the authors' cluster paths) is not read")
        names = dict(id="id", text="translation")
    elif {"id", "text"} <= set(columns):
        layout = "TSV (id, duration, text)"
        names = dict(id="id", text="text", video="video", start="start", end="end", duration="duration")
    elif is_ssvp_row(header):
        layout = "SSVP-SLT's features manifest (headerless: video_name, length, label)"
        columns, names, first_line = {"id": 0, "text": 2}, dict(id="id", text="text"), 1
        reader = itertools.chain([header], reader)
    else:
        raise UserError(f"{path}: unknown manifest header {header[:8]}; expected a tab-separated "
                        "header 'id<TAB>duration<TAB>text', How2Sign's SENTENCE_NAME/SENTENCE, Tarrés et al.'s "
                        "id/signs_file/translation, or SSVP-SLT's headerless video_name/length/label")
    rows = Manifest([], layout)
    for line, fields in enumerate(reader, start=first_line):
        if not any(value.strip() for value in fields):
            continue
        row = {key: fields[columns[name]].strip() if columns.get(name, len(fields)) < len(fields) else ""
               for key, name in names.items()}          # a short row lacks its last columns: ""
        clip_id = row["id"][: -len(".mp4")] if row["id"].endswith(".mp4") else row["id"]
        rows.append(ManifestRow(clip_id, row["text"], line, video=row.get("video") or None,
                                start=float_or_none(row.get("start")), end=float_or_none(row.get("end")),
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
    """One row per clip file (subfolders too), id = file name without extension (--predict without a manifest)."""
    files = sorted(feature_files(features_dir).items())
    for _, path in files:
        if path.suffix in PICKLE_SUFFIXES:
            raise refuse_pickle(path)
    return Manifest([ManifestRow(stem, "", i, features=str(path)) for i, (stem, path) in enumerate(files, start=1)],
                    "the clip files of a folder")


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
# 4. Frame store: every clip file read once (pose clips prepared into frames first); each clip (or each
# sentence's span of a video) keeps its mean frame and its length in memory, and its frames in the store

# Poses as clips: How2Sign's OpenPose folders (one JSON per frame) and .pose files (pose-format) become (T, 2 x points)
# frames by one preparation, chosen in bench/poses.py (docs/benchmarks/poses.md): the points that sign (upper body, 23
# face points, both hands; no hips or legs), centred on the shoulders' mid-point and scaled by their width (medians
# over the clip), each hand's points relative to its wrist, x and y per point (a missing point: zeros; a channel of
# confidences or a found/missing mask scored lower there).
POSE_SUFFIX = ".pose"
POSE_PREPARATION = "upper body, 23 face points, hands from their wrists; shoulder-centred and -scaled; a missing point 0"
OPENPOSE_FRAME = re.compile(r"_(\d+)_keypoints\.json$")
OPENPOSE_PARTS = (("pose_keypoints_2d", 25), ("face_keypoints_2d", 70), ("hand_left_keypoints_2d", 21),
                  ("hand_right_keypoints_2d", 21))


# The signing points of the skeletons pose files hold (their components' names: body, face, left hand, right hand;
# the body points and face points kept; the body's left and right shoulder). Other components keep every point.
SKELETONS = (
    (tuple(name for name, _ in OPENPOSE_PARTS), (0, 1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 18),
     (17, 19, 21, 22, 24, 26, 36, 39, 42, 45, 30, 48, 50, 51, 52, 54, 56, 57, 58, 61, 63, 65, 67), (5, 2)),
    (("POSE_LANDMARKS", "FACE_LANDMARKS", "LEFT_HAND_LANDMARKS", "RIGHT_HAND_LANDMARKS"), (0, 2, 5, 7, 8, 11, 12, 13, 14,
     15, 16), (70, 105, 107, 336, 334, 300, 33, 133, 362, 263, 1, 61, 291, 0, 17, 37, 267, 84, 314, 13, 14, 78, 308), (11, 12)),
)


def is_pose_clip(path):
    """A .pose file or a keypoint folder; a feature file's path is told by its name, with no stat (Drive is slow)."""
    path = str(path)
    return path.endswith(POSE_SUFFIX) or (not path.endswith(FEATURE_SUFFIXES + PICKLE_SUFFIXES) and os.path.isdir(path))


def prepare_pose(parts):
    """(T, 2 x points) float32 frames from {component: (T, P, 3) x, y, confidence} (confidence 0: not found): x and y
    of each kept point (0, 0 where it was not found); the hands are the last 2 x 21 points (of a known skeleton)."""
    skeleton = next((s for s in SKELETONS if set(s[0]) <= set(parts)), None)
    if skeleton is None:                              # centre and scale: the box of every point found
        points = np.concatenate(list(parts.values()), axis=1)
        shoulders = np.zeros((len(points), 2, 3), dtype=np.float32)
    else:
        (body, face, left, right), keep_body, keep_face, pair = [parts[name] for name in skeleton[0]], *skeleton[1:]
        points = np.concatenate([body[:, list(keep_body)], face[:, list(keep_face)], left, right], axis=1)
        shoulders = body[:, list(pair)]
    both = (shoulders[..., 2] > 0).all(axis=1)
    if both.any():
        centre = np.median(shoulders[both, :, :2].mean(axis=1), axis=0)
        scale = float(np.median(np.linalg.norm(shoulders[both, 0, :2] - shoulders[both, 1, :2], axis=-1)))
    else:
        xy = points[points[..., 2] > 0][:, :2]
        centre, scale = (xy.min(axis=0) + xy.max(axis=0)) / 2, float(np.ptp(xy, axis=0).max(initial=0))
    found = points[..., 2:] > 0
    xy = (points[..., :2] - centre) / (scale if scale > 0 else 1.0) * found
    for wrist in (-42, -21) if skeleton is not None else ():      # each hand's points from its wrist (its point 0)
        hand = slice(wrist + 1, wrist + 21 or None)
        xy[:, hand] = (xy[:, hand] - xy[:, wrist: wrist + 1]) * found[:, hand] * found[:, wrist: wrist + 1]
    return np.nan_to_num(xy).reshape(len(points), -1).astype(np.float32)


def read_openpose_folder(folder):
    """({component: (T, P, 3)}, notes) of one How2Sign keypoint folder: one OpenPose JSON per frame, in frame-number
    order, the most confident person of each; a frame with no person, a missing frame number or an unreadable file
    is a frame of missing points, and `notes` names it ({kind: [count, first example]}), as it names stray files."""
    numbered, notes = {}, {}

    def note(kind, example):
        notes.setdefault(kind, [0, example])[0] += 1

    for name in sorted(os.listdir(folder)):
        match = OPENPOSE_FRAME.search(name)
        if match:
            numbered[int(match.group(1))] = name
        else:
            note("stray files", name)
    if not numbered:
        raise ValueError("no OpenPose frame files (<name>_<frame>_keypoints.json) in the folder")
    first = min(numbered)
    points = np.zeros((max(numbered) - first + 1, sum(count for _, count in OPENPOSE_PARTS), 3), dtype=np.float32)
    for number in range(first, max(numbered) + 1):
        if number not in numbered:
            note("missing frame numbers", f"frame {number}")
            continue
        try:
            with open(os.path.join(folder, numbered[number]), "rb") as handle:
                people = [np.concatenate([np.asarray(person.get(key) or [0.0] * 3 * count, dtype=np.float32)
                                          .reshape(count, 3) for key, count in OPENPOSE_PARTS])
                          for person in json.load(handle)["people"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            note("unreadable frame files", numbered[number])
            continue
        if not people:
            note("frames with no person", numbered[number])
            continue
        points[number - first] = max(people, key=lambda person: person[:, 2].sum())
    if not (points[..., 2] > 0).any():
        raise ValueError(f"no person in any frame ({len(numbered)} frame files)")
    bounds = np.cumsum([0] + [count for _, count in OPENPOSE_PARTS])
    return {key: points[:, bounds[i]: bounds[i + 1]] for i, (key, _) in enumerate(OPENPOSE_PARTS)}, notes


def read_pose_file(path):
    """({component: (T, P, 3)}, notes) of a .pose file (pose-format): the most confident person of each frame."""
    from pose_format import Pose
    pose = Pose.read(Path(path).read_bytes())
    data = np.ma.filled(pose.body.data, 0).astype(np.float32)            # (T, people, P, dims)
    confidence = np.asarray(pose.body.confidence, dtype=np.float32)      # (T, people, P)
    if data.shape[1] == 0 or not (confidence > 0).any():
        raise ValueError(f"no person in any frame ({data.shape[0]} frames)")
    best = confidence.sum(axis=-1).argmax(axis=1)
    frames = np.arange(len(best))
    points = np.concatenate([data[frames, best, :, :2], confidence[frames, best, :, None]], axis=-1)
    empty = int((points[..., 2].max(axis=1) <= 0).sum())
    parts, at = {}, 0
    for component in pose.header.components:
        parts[component.name] = points[:, at: at + len(component.points)]
        at += len(component.points)
    return parts, ({"frames with no person": [empty, f"{empty} of {len(points)} frames"]} if empty else {})


def prepared_pose(path):
    """(frames, notes, None) of a pose clip (a keypoint folder or a .pose file), or (None, {}, why it is unusable)."""
    try:
        parts, notes = (read_openpose_folder if os.path.isdir(path) else read_pose_file)(path)
        return prepare_pose(parts), notes, None
    except Exception as error:  # noqa: BLE001 - any read failure is reported, never raised
        reason = first_line(error)[:120]
        return None, {}, reason if reason.startswith("no ") else f"unreadable pose clip ({reason})"


def prepared_pose_part(path, parts_dir):
    """prepared_pose, kept in parts_dir until the store is built: a build killed half-way reads it back."""
    info = os.stat(path)
    key = json.dumps([os.path.abspath(path), info.st_size, info.st_mtime_ns, POSE_PREPARATION])
    part = Path(parts_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    with contextlib.suppress(OSError, ValueError, KeyError):
        with np.load(part, allow_pickle=False) as saved:
            return saved["frames"], json.loads(str(saved["notes"])), None
    frames, notes, error = prepared_pose(path)
    if frames is not None:
        with contextlib.suppress(OSError, UserError):
            atomic_write(part, lambda handle: np.savez(handle, frames=frames, notes=np.array(json.dumps(notes))))
    return frames, notes, error


def read_pose_clips(paths, parts_dir, workers):
    """prepared_pose_part of each path, in order; in `workers` processes when there are many (JSON is CPU work)."""
    Path(parts_dir).mkdir(parents=True, exist_ok=True)
    read = functools.partial(prepared_pose_part, parts_dir=parts_dir)
    if workers < 2 or len(paths) < 64:
        yield from map(read, paths)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield from pool.map(read, paths, chunksize=8)
    finally:                                   # stopped early (an error, a kill): the clips not begun are dropped
        pool.shutdown(cancel_futures=True)



def feature_files(features_dir):
    """{clip id: path} of the clips in a folder and its subfolders (SSVP-SLT's `<epoch>/<video_name[:5]>/<name>.pt`
    tree), one listing per folder (one call on Google Drive instead of a lookup per clip): feature files (.npy wins
    over .pt of the same name), .pose files, and How2Sign's keypoint folders (a folder of OpenPose frame files is
    one clip, its name the id). Pickle files are listed too, to be refused."""
    found = {}
    if not Path(features_dir).is_dir():
        raise UserError(f"features folder not found: {features_dir}")
    for folder, subfolders, names in os.walk(features_dir):
        if any(OPENPOSE_FRAME.search(name) for name in names):        # a keypoint folder: one clip
            subfolders.clear()
            entries = [(os.path.basename(folder), "/", Path(folder))]
        else:
            entries = [(*os.path.splitext(name), Path(folder) / name) for name in names]
        for stem, suffix, path in entries:
            if suffix not in FEATURE_SUFFIXES + (POSE_SUFFIX, "/") + PICKLE_SUFFIXES:
                continue
            if stem in found and found[stem].parent != path.parent:
                raise UserError(f"clip '{stem}' is in two folders of {features_dir} ({found[stem].parent} and "
                                f"{path.parent}): pass the folder of one extraction (SSVP-SLT: <root>/<epoch>)")
            if stem not in found or suffix == FEATURE_SUFFIXES[0]:
                found[stem] = path
    pose_files = [path for path in found.values() if path.suffix == POSE_SUFFIX]
    if pose_files and importlib.util.find_spec("pose_format") is None:
        raise UserError(f"{pose_files[0]}: .pose clips are read with the pose-format package: pip install pose-format")
    return found


def refuse_pickle(path, what="clip"):
    """The one line for a pickle-based file (Uni-Sign's pose .pkl clips, SpaMo's annotation .npy)."""
    return UserError(f"{path}: this {what} is a Python pickle, which can run code when loaded, so it is not "
                     "loaded here. On a machine you trust, convert it: load it with pickle (or np.load(..., "
                     "allow_pickle=True)) and write its (T, D) array with np.save as <id>.npy (a manifest: as a "
                     "TSV with id, duration and text columns)")


def clip_files(rows, manifest, features_dir, spans):
    """{clip file: its rows} (a file holds one clip, or with --feature_fps one video's sentences): a row's
    own path (JSON manifests), else the file named by its id (or video) under the features folder."""
    files, listing = defaultdict(list), None
    for row in rows:
        if row.features:
            path = row.features
        elif features_dir is None:
            raise UserError(f"{manifest}: rows have no 'features' path; pass the features folder")
        else:
            stem = row.file_stem(spans=spans)
            listing = listing if listing is not None else feature_files(features_dir)
            found = listing.get(stem)
            if found is not None and found.suffix in PICKLE_SUFFIXES:
                raise refuse_pickle(found)
            path = str(found) if found else str(Path(features_dir) / f"{stem}.npy|.pt")
        files[path].append(row)
    return files


@dataclass
class ClipScan:
    """One clip (or one span of a video file) as read from disk, or why it cannot be used."""
    mean: torch.Tensor | None = None      # (D,) mean over the valid frames
    first: int = 0                        # first frame in the file
    length: int = 0                       # valid frames
    dim: int = 0
    frames: int | None = None             # its row in the FrameStore
    error: str | None = None
    notes: dict | None = None             # a pose clip's frames of missing points and stray files (read_openpose_folder)


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
    `index.npz` (per stored clip: offset, length, first frame, dim and mean; stores built before the frames
    were whitened hold each clip's mean of squares too, unread) and
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
        payload += [POSE_PREPARATION] if any(map(is_pose_clip, paths)) else []
        sizes = sum(info[0] for info in stats if info)
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest(), sizes

    @property
    def frames_file(self):
        """The fp16 frames, memory-mapped on first use (each torchrun process maps its own)."""
        if self._frames is None:
            self._frames = np.memmap(self.folder / "frames.f16", dtype=np.float16, mode="r")
        return self._frames

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
        index, grouped, notes = self.index, [], self.meta.get("notes", {})
        for path in spans_by_file:
            file_scans = self.meta["scans"][os.path.abspath(path)]
            group = []
            for entry in file_scans:
                if isinstance(entry, str):
                    group.append(ClipScan(error=entry))
                    continue
                d, at = int(index["dims"][entry]), int(index["stat_offsets"][entry])
                group.append(ClipScan(torch.from_numpy(index["means"][at: at + d].copy()), int(index["firsts"][entry]),
                                      int(index["lengths"][entry]), d, entry, notes=notes.get(os.path.abspath(path))))
            grouped.append(group)
        for name in ("means", "square_means", "firsts", "stat_offsets"):     # in the dataset now: free them
            self.index.pop(name, None)
        return grouped


class FrameStoreBuilder:
    """Writes a FrameStore while the clip files are scanned (its `keep`), then renames it into place. A full
    disk is a UserError naming the folder and the space needed."""

    def __init__(self, folder, needed_bytes):
        self.folder, self.needed = Path(folder), needed_bytes
        for stale in self.folder.parent.glob(f".{self.folder.name}.building-*"):   # killed builds (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.folder.parent / f".{self.folder.name}.building-{os.getpid()}"
        self.tmp.mkdir(parents=True)
        self.handle = open(self.tmp / "frames.f16", "wb")
        self.lock = threading.Lock()
        self.rows, self.written = [], 0      # rows: (offset, length, first, dim, mean)

    def disk_full(self):
        return UserError(f"disk full while building the frame store in {self.folder.parent}: it needs about "
                         f"{self.needed / 2 ** 30:.1f} GB; free space there, or put the store elsewhere with "
                         f"--cache_dir DIR (or {CACHE_ENV}=DIR); nothing in --output_dir was changed")

    def keep(self, frames, mean, first):
        data = (frames - mean).to(torch.float16).numpy().tobytes()
        with self.lock:
            try:
                self.handle.write(data)
            except OSError as error:
                raise (self.disk_full() if is_disk_full(error) else error) from None
            self.rows.append((self.written // 2, frames.shape[0], first, frames.shape[1], mean))
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
                     means=np.concatenate([r[4].numpy() for r in rows]) if rows else empty)
            scans = {os.path.abspath(path): [scan.frames if scan.error is None else scan.error for scan in group]
                     for path, group in zip(spans_by_file, scanned)}
            notes = {os.path.abspath(path): group[0].notes for path, group in zip(spans_by_file, scanned) if group[0].notes}
            (self.tmp / "meta.json").write_text(json.dumps({"version": FRAME_STORE_VERSION, "clips": len(rows),
                                                            "scans": scans, "notes": notes}))
            os.replace(self.tmp, self.folder)
        except OSError as error:
            self.abandon()
            raise (self.disk_full() if is_disk_full(error) else error) from None
        return FrameStore(self.folder)

    def abandon(self):
        with contextlib.suppress(OSError):
            self.handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def scan_files(spans_by_file, trim_zero_frames, fps, keep, io_threads=8, progress=False, split="data", parts_dir=None):
    """Read every clip once, in parallel (Google Drive is latency bound; pose clips in processes, JSON is CPU work):
    a list of ClipScans per file."""
    def read(item, pose=None):
        return scan_file(item[0], item[1], trim_zero_frames, fps, keep, pose)

    bar = dict(total=len(spans_by_file), desc=f"reading {split} clips", disable=not progress, leave=False)
    poses = [path for path in spans_by_file if is_pose_clip(path)]
    if poses:
        prepared, pose_paths = read_pose_clips(poses, parts_dir, min(io_threads, os.cpu_count() or 1)), set(poses)
        return [read(item, next(prepared) if item[0] in pose_paths else None) for item in tqdm(spans_by_file.items(), **bar)]
    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        return list(tqdm(pool.map(read, spans_by_file.items()), **bar))


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
            scanned = scan_files(spans_by_file, trim_zero_frames, fps, builder.keep, io_threads, progress, split,
                                 Path(cache_dir) / "poses")
            store = builder.finish(spans_by_file, scanned)
            shutil.rmtree(Path(cache_dir) / "poses", ignore_errors=True)    # every clip is in the store now
        except BaseException:
            builder.abandon()
            raise
        logger.info(f"{split}: frame store built in {time.time() - started:.0f} s: {folder} "
                    f"({store.nbytes / 2 ** 30:.2f} GB); later runs, --resume and --predict read it instead of the clip files")
        return store.scans(spans_by_file), store        # as a later run will see them


def scan_file(path, spans, trim_zero_frames, fps=None, keep=None, pose=None):
    """Read a clip file once: one ClipScan per span ((start, end) seconds; None = the whole file). `pose`: a pose
    clip's prepared_pose. `keep(frames, mean, first)` (a FrameStoreBuilder's) stores the frames."""
    def failed(reason):
        return [ClipScan(error=reason) for _ in spans]

    if path is None or not os.path.exists(path):
        return failed(f"missing feature file ({path})")
    if pose is not None and pose[2]:
        return failed(pose[2])
    try:
        features = torch.from_numpy(pose[0]) if pose is not None else load_clip_features(path)
    except Exception as error:  # noqa: BLE001 - any read failure is reported, never raised
        return failed(f"unreadable feature file ({first_line(error)[:120]})")
    if features.numel() and not torch.isfinite(features).all():
        return failed("clip has NaN/Inf values")
    total = valid_length(features) if trim_zero_frames and pose is None else features.shape[0]
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
        mean = features[first:stop].double().mean(dim=0).float()
        scans.append(ClipScan(mean, first, stop - first, features.shape[1], keep(features[first:stop], mean, first),
                              notes=pose and pose[1]))
    return scans


# ----------------------------------------------------------------------------------------------
# 5. Dataset


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
    the memory-mapped store when an item is read. With `feature_fps`, files hold whole videos and every
    manifest row is its own sample: its span of the video. Problem rows and clips are skipped and
    listed in `self.skipped`. Items are fixed-size, so PyTorch's default collate batches them.
    """

    def __init__(self, manifest, features_dir=None, max_samples=None, *, feature_dim=None, split="data",
                 trim_zero_frames=True, require_text=True,
                 feature_fps=None, cache_dir=None, io_threads=8, progress=False):
        if manifest is not None and Path(manifest).is_dir() and (features_dir is None or Path(features_dir).is_file()):
            manifest, features_dir = features_dir, manifest   # the original (features_dir, manifest_path)
        if features_dir is not None and Path(features_dir).is_file():
            raise UserError(f"{features_dir} is a file, not a folder of clips: pass the folder that holds "
                            "<id>.npy / <id>.pt files")
        self.manifest, self.split = str(manifest or features_dir), split
        self.trim_zero_frames = trim_zero_frames
        self.feature_fps = feature_fps
        rows = read_manifest(manifest) if manifest is not None else rows_from_folder(features_dir)
        self.layout = rows.layout
        self.diagnosis = None if feature_fps else video_level_diagnosis(rows, manifest)
        kept, self.skipped = screen_manifest_rows(rows, require_text, spans=bool(feature_fps))
        self.span_reading = assign_spans(kept, manifest) if feature_fps else None
        kept = self._unique(kept)
        if max_samples:
            kept = kept[:max_samples]
        files = clip_files(kept, manifest, features_dir, spans=bool(feature_fps))   # each file read once
        spans_by_file = {path: [(row.start, row.end) if feature_fps else None for row in file_rows]
                         for path, file_rows in files.items()}
        scanned, self.store = scan_into_store(spans_by_file, trim_zero_frames, feature_fps,
                                              cache_dir or default_cache_dir(), io_threads, progress, split)
        results = [(row, path, scan) for (path, file_rows), scans in zip(files.items(), scanned)
                   for row, scan in zip(file_rows, scans)]
        results.sort(key=lambda item: item[0].line)           # manifest order
        self.dim_counts = Counter(scan.dim for _, _, scan in results if not scan.error)
        self.feature_dim = feature_dim or (self.dim_counts.most_common(1)[0][0] if self.dim_counts else None)
        self.ids, self.texts, self.paths, self.first_frames, self.stored = [], [], [], [], []
        means, lengths = [], []
        self.clamped = 0       # spans whose end runs past their file's frames (How2Sign's realigned times do)
        self.pose_notes = {}   # kind: [count, clips, first example] (read_openpose_folder's notes)
        for row, path, scan in results:
            for kind, (count, example) in (scan.notes or {}).items():
                entry = self.pose_notes.setdefault(kind, [0, 0, f"{row.id}: {example}"])
                entry[0], entry[1] = entry[0] + count, entry[1] + 1
            if not scan.error and scan.dim != self.feature_dim:
                scan.error = f"wrong feature dimension ({scan.dim}, expected {self.feature_dim})"
            if scan.error:
                self.skipped.append((row.id, scan.error))
                continue
            self.clamped += bool(feature_fps and row.end is not None and round(row.end * feature_fps) > scan.first + scan.length)
            self.ids.append(row.id)
            self.texts.append(row.text)
            self.paths.append(path)
            self.first_frames.append(scan.first)
            self.stored.append(scan.frames)
            means.append(scan.mean)
            lengths.append(scan.length)
        if feature_dim and self.dim_counts and feature_dim not in self.dim_counts:
            dims = "/".join(str(d) for d in sorted(self.dim_counts))
            if any(map(is_pose_clip, files)):
                raise UserError(f"{split}: the clips are poses ({dims} values per frame once prepared) and the model "
                                f"reads {feature_dim}-d features: a sentence encoder trained on other features does not "
                                "fit poses; train from the poses alone with --sonar_checkpoint none")
            raise UserError(f"{split}: the clips are {dims}-d but {feature_dim}-d features are expected (the "
                            "encoder's input): use the features the model was trained on")
        if not self.ids:
            raise UserError(f"{split}: no usable clips in {manifest or features_dir} ({len(self.skipped)} skipped"
                            + (f": {self.skip_summary_kinds()}" if self.skipped else "") + "). "
                            + (self.diagnosis or "Run with --check to see why."))
        self.clip_means = torch.stack(means)                      # (N, D)
        self.lengths = torch.tensor(lengths, dtype=torch.long)    # (N,)
        self.max_frames = int(self.lengths.max())
        self.frame_mean = ((self.clip_means.double() * self.lengths[:, None]).sum(0) / self.lengths.sum()).float()
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

    def reading(self):
        """How the split was read, for --check and the log: its layout, its spans (--feature_fps), the pose clips and
        what they lacked, and the spans cut at their file's end."""
        lines = [f"read as {self.layout}"] + ([f"--feature_fps {self.feature_fps:g}: spans from {self.span_reading}"]
                                              if self.span_reading else [])
        kinds = Counter("How2Sign keypoint folders" if os.path.isdir(path) else ".pose files"
                        for path in self.paths if is_pose_clip(path))
        if kinds:
            lines.append(f"clips: {', '.join(f'{n} {kind}' for kind, n in kinds.items())}, prepared into "
                         f"{self.feature_dim // 2} points x (x, y): {POSE_PREPARATION}")
        lines += [f"{count} {kind} in {clips} clips, first {example}: " + ("ignored" if kind == "stray files" else
                  "kept as frames of missing points") for kind, (count, clips, example) in self.pose_notes.items()]
        return lines + ([f"{self.clamped} spans end past their video's features (How2Sign's realigned times can): cut "
                         "at the file's end"] if self.clamped else [])

    def fingerprint(self):
        """sha256 of the split as used (after skips): its samples' ids, texts and spans, sorted by id."""
        rows = sorted(zip(self.ids, self.texts, self.first_frames, self.lengths.tolist()))
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

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
        """(length, D) float32 frames of one sample, from the frame store."""
        return self.store.residual(self.stored[index]).float() + self.clip_means[index]

    def frame_covariance(self, max_frames=400_000):
        """(D, D) covariance of the frames about frame_mean (the mean over every valid frame), from every clip,
        or past max_frames frames every k-th clip (enough for the whitening; a pass over every frame is slow)."""
        picked = range(0, len(self), -(-int(self.lengths.sum()) // max_frames))
        centred = (self.frames(i).double() - self.frame_mean.double() for i in picked)
        return sum(x.T @ x for x in centred) / float(self.lengths[list(picked)].sum())

    def __getitem__(self, index):
        item = {"index": index, "id": self.ids[index], "text": self.texts[index],
                "clip_mean": self.clip_means[index], "length": self.lengths[index]}
        if self.sentence_embeddings is not None:
            item["sentence_embedding"] = self.sentence_embeddings[index]
        # Frames and labels are padded to the dataset's longest so default collate stacks them;
        # collate_clips trims them back to the batch's longest.
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


# ----------------------------------------------------------------------------------------------
# 6. Encoder: the users' fine-tuned sentence encoder (`best_encoder.pt`)


class SentenceEncoder(nn.Module):
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
    encoder = SentenceEncoder(dims, dropout)
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
# 7. Bridge: the standardised sentence embedding and the frames -> the decoder's input embeddings.
# It keeps the guide's `expander` (the learnable queries) and `attention_bridge` (its first
# nn.MultiheadAttention). The guide's own bridge (queries attending to ONE key, so every query got the same
# vector) collapsed and was retired: docs/benchmarks/collapse.md.


def sinusoidal_positions(length, dim, device):
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class BridgeBlock(nn.Module):
    """Pre-norm cross-attention (queries -> memory) and feed-forward, both residual: the residual path keeps
    each query position distinct even when attention weights are uniform."""

    def __init__(self, d_model, num_heads, ff_dim, dropout):
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.query_norm = nn.LayerNorm(d_model)
        self.ff_norm = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(ff_dim, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, memory, memory_padding_mask=None):     # (B, Q, d), (B, M, d)
        attended = self.attention(self.query_norm(queries), memory, memory,
                                  key_padding_mask=memory_padding_mask, need_weights=False)[0]
        queries = queries + self.dropout(attended)
        return queries + self.dropout(self.feed_forward(self.ff_norm(queries)))


def whitening_matrix(covariance):
    """(D, D) symmetric map that softly whitens frames of this covariance: each principal direction of
    eigenvalue e gets variance (1 + s) e / (e + s mean(e)), s = WHITENING_SHRINKAGE. Directions far above the
    mean (what every clip shares: an extractor's drift, a signer's shift) come down to 1 + s; those near it
    stay near 1, and weak ones (noise) are not blown up as full whitening would."""
    eigenvalues, vectors = torch.linalg.eigh(covariance.double())
    eigenvalues = eigenvalues.clamp(min=0)
    shrunk = eigenvalues + WHITENING_SHRINKAGE * eigenvalues.mean().clamp(min=1e-12)
    return ((vectors * ((1 + WHITENING_SHRINKAGE) / shrunk).sqrt()) @ vectors.T).float()


class FrameEncoder(nn.Module):
    """Frames centred and softly whitened with training-set statistics (whitening_matrix), then temporal
    striding: a window of `kernel` consecutive frames, every `stride` frames, projected into one token (a
    linear map of the stacked frames, i.e. a 1-D convolution: order within the window is kept), with
    positions. stride 1, kernel 1: one token per frame."""

    def __init__(self, frame_dim, d_model, stride=1, kernel=None):
        super().__init__()
        self.stride, self.kernel = stride, kernel or stride
        self.register_buffer("frame_mean", torch.zeros(frame_dim))
        self.register_buffer("frame_whitening", torch.eye(frame_dim))
        self.frame_projection = nn.Linear(self.kernel * frame_dim, d_model)
        self.frame_norm = nn.LayerNorm(d_model)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        std = state_dict.pop(prefix + "frame_std", None)    # trained before the whitening: standardised per dimension
        if std is not None:
            state_dict.setdefault(prefix + "frame_whitening", torch.diag(1 / std))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, frames, lengths):      # (B, T, D), (B,) -> (B, T', d), padding mask (B, T'); T' = ceil(T / stride)
        lengths = lengths.to(self.frame_mean.device)
        frames = (frames.to(self.frame_mean.device, self.frame_projection.weight.dtype) - self.frame_mean) @ self.frame_whitening
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
    """The frame route `cross_attention`: the frame tokens as memory of their own for the decoder's
    cross-attention, beside what its encoder makes of the bridge's tokens. The decoder's encoder then
    reads 32 tokens, not 32 + T: a frame token costs each decoder layer a key and a value instead of a
    pass through every encoder layer. --frame_memory_layers pre-norm self-attention layers give the frame
    tokens context first. `scale` starts at the RMS of the decoder encoder's own output."""

    def __init__(self, config, scale):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(config.d_model, config.num_heads, config.ff_width, config.bridge_dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.frame_memory_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, tokens, padding):      # (B, T, d), (B, T) -> (B, T, d), attention mask (B, T)
        for layer in self.layers:
            tokens = layer(tokens, src_key_padding_mask=padding)
        return self.norm(tokens) * self.scale, (~padding).long()


class FrameSummary(nn.Module):
    """Frames alone (--sonar_checkpoint none): one vector per clip, learned from its frame tokens, where the
    sentence encoder's embedding would go (the bridge's prefix and memory tokens are made from it): a learned
    query reads the frame tokens through one attention layer (an MLP on their mean scored lower and was
    retired). Trained with the bridge; LayerNorm-scaled, so the bridge's standardisation stays the identity."""

    def __init__(self, config):
        super().__init__()
        d_model = config.d_model
        self.query = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.attention = nn.MultiheadAttention(d_model, config.num_heads, dropout=config.bridge_dropout,
                                               batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    @property
    def output_dim(self):
        return self.norm.normalized_shape[0]

    def forward(self, tokens, padding):      # (B, T, d), padding mask (B, T) -> (B, d)
        query = self.query.expand(len(tokens), -1, -1).to(tokens.dtype)
        pooled = self.attention(query, tokens, tokens, key_padding_mask=padding, need_weights=False)[0][:, 0]
        return self.norm(pooled)


class Bridge(nn.Module):
    """The sentence embedding, standardised per dimension, -> `num_queries` tokens for the decoder: each
    `expander` query gets its own content from the embedding (a prefix MLP), then refines it by attending to
    `memory_tokens` tokens projected from the embedding and to the clip's frame tokens. The output is
    LayerNorm-scaled to the decoder's embeddings (the guide's troubleshooting step 3)."""

    def __init__(self, config, embed_dim, output_scale):
        super().__init__()
        d_model = config.d_model
        self.register_buffer("embedding_mean", torch.zeros(embed_dim))
        self.register_buffer("embedding_std", torch.ones(embed_dim))
        self.expander = nn.Parameter(torch.randn(config.num_queries, d_model))   # the learnable queries
        self.frame_encoder = FrameEncoder(config.frame_width, d_model, config.frame_stride, config.frame_kernel)
        self.frame_memory = None             # FrameMemory on the cross_attention route (make_bridge)
        self.memory_projection = nn.Linear(embed_dim, config.memory_tokens * d_model)
        self.memory_positions = nn.Parameter(torch.randn(config.memory_tokens, d_model) * 0.02)
        self.memory_norm = nn.LayerNorm(d_model)
        self.blocks = nn.ModuleList(BridgeBlock(d_model, config.num_heads, config.ff_width, config.bridge_dropout)
                                    for _ in range(config.bridge_layers))
        self.prefix_mlp = nn.Sequential(nn.Linear(embed_dim, config.prefix_width), nn.GELU(),
                                        nn.Dropout(config.bridge_dropout),
                                        nn.Linear(config.prefix_width, self.expander.numel()))
        self.output_norm = nn.LayerNorm(d_model)
        # Pretrained T5 embeddings are large (std ~ 11.6 for t5-v1_1): LayerNorm-scale inputs would be
        # drowned by its layers' outputs, so the output scale starts at T5's own embedding scale.
        self.output_scale = nn.Parameter(torch.tensor(output_scale))

    @property
    def attention_bridge(self):
        return self.blocks[0].attention

    @torch.no_grad()
    def set_statistics(self, embeddings, frame_mean=None, frame_whitening=None):
        """Training-set statistics as buffers (saved in checkpoints): the embeddings' mean and std (None, frames
        alone: the summary is learned, left at the identity), the frames' mean and whitening_matrix."""
        if embeddings is not None:
            embeddings = embeddings.float().to(self.embedding_mean.device)
            self.embedding_mean.copy_(embeddings.mean(dim=0))
            self.embedding_std.copy_(embeddings.std(dim=0, unbiased=False).clamp(min=1e-6)
                                     if len(embeddings) > 1 else torch.ones_like(self.embedding_std))
        if frame_mean is not None:
            self.frame_encoder.frame_mean.copy_(frame_mean)
            self.frame_encoder.frame_whitening.copy_(frame_whitening)

    def forward(self, sentence_embedding, frame_tokens, frame_padding):  # (B, E), the frame encoder's -> (B, Q, d)
        # Clips' embeddings share most of their direction (cosine ~0.99); standardising per dimension makes
        # the small per-clip differences the signal (without it the bridge collapsed: docs/benchmarks/collapse.md).
        embedding = (sentence_embedding.to(self.expander.dtype) - self.embedding_mean) / self.embedding_std
        queries = self.expander + self.prefix_mlp(embedding).view(len(embedding), *self.expander.shape)  # (B, Q, d)
        memory = self.memory_projection(embedding).view(len(embedding), -1, self.expander.shape[1])
        memory = torch.cat([self.memory_norm(memory + self.memory_positions), frame_tokens], dim=1)   # (B, M + T, d)
        padding = F.pad(frame_padding, (memory.shape[1] - frame_tokens.shape[1], 0), value=False)
        for block in self.blocks:
            queries = block(queries, memory, padding)
        return self.output_norm(queries) * self.output_scale


def make_bridge(config, embed_dim, decoder):
    """The bridge `config` describes, its output at the decoder's embedding scale; on the cross_attention
    route with a frame memory at the scale of the decoder encoder's output."""
    bridge = Bridge(config, embed_dim, embedding_scale(decoder.seq2seq))
    if config.route == "cross_attention":
        bridge.frame_memory = FrameMemory(config, encoder_output_scale(decoder.seq2seq))
    return bridge


# ----------------------------------------------------------------------------------------------
# 8. Decoder (--t5_model, the guide's name): any encoder-decoder AutoModelForSeq2SeqLM loads (t5, T5 v1.1,
# flan-t5, mT5, BART, mBART-50, M2M100, NLLB-200). T5 v1.1 / flan-t5 / mT5 have an output head (lm_head)
# of their own; t5-small ties it to the input embedding and scales the decoder output. transformers 5.x
# always builds the two tied from a config and records the difference in `scale_decoder_outputs`; 4.x
# reads `tie_word_embeddings`. The helpers below keep an untied model untied under both. Multilingual
# models (NLLB, mBART-50, M2M100) start every target sentence with a language code (--target_lang).

T5_FAMILY = ("t5", "mt5")    # an output head of their own where the config says untied (T5 v1.1, flan-t5, mT5)
LANGUAGE_CODE = re.compile(r"^(?:[a-z]{3}_[A-Z][a-z]{3}|[a-z]{2}_[A-Z]{2}|__[a-z]{2,3}__)$")  # eng_Latn en_XX __en__
ENGLISH_CODES = ("eng_Latn", "en_XX", "en")
TIED_WEIGHT = re.compile(r"(embed_tokens|lm_head|shared)\.weight$")


def unloadable_decoder(name_or_path, error):
    return UserError(f"cannot load the decoder '{name_or_path}': {first_line(error)} "
                     "(offline? pass a local folder saved with save_pretrained)")


def read_decoder_config(name_or_path):
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


def load_decoder(name_or_path):
    """Model and tokenizer from a hub name (t5-small, facebook/nllb-200-distilled-600M, ...) or a local
    folder. Anything that is not an encoder-decoder, or whose files lack weights, is refused in one line."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    read_decoder_config(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model, info = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, output_loading_info=True)
    except (OSError, ValueError, KeyError) as error:
        raise unloadable_decoder(name_or_path, error) from None
    missing = sorted(key for key in info.get("missing_keys", ()) if not TIED_WEIGHT.search(key))
    if len(missing) > len(model.state_dict()) // 2:
        raise UserError(f"decoder '{name_or_path}': {len(missing)} of its weights are not in its files (e.g. "
                        f"{missing[0]}) and would start random: its config and weights do not belong together")
    if missing:
        logger.warning(f"decoder '{name_or_path}': {len(missing)} weights not in its files start random: "
                       + ", ".join(missing[:5]))
    return model, tokenizer


def load_tokenizer(name, origin):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{origin}: cannot load the tokenizer of decoder '{name}' ({first_line(error)}); "
                        "offline? keep its t5_export/ folder beside the checkpoint") from None


def config_is_untied(config_dict):
    return config_dict.get("tie_word_embeddings") is False or config_dict.get("scale_decoder_outputs") is False


def unwrapped(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay in it), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_untied(model):
    model = unwrapped(model)
    return model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def scales_decoder_output(config):
    """Whether T5 multiplies the decoder output by d_model ** -0.5 before the head (tied models)."""
    return bool(getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)))


def portable_config(model):
    """The model's config as a dict that 4.x and 5.x both read the same way (an untied T5 stays untied),
    without what says how or where it was saved."""
    config = json.loads(unwrapped(model).config.to_json_string())
    if config.get("model_type", "t5") in T5_FAMILY and is_untied(model):
        config.update(tie_word_embeddings=False, scale_decoder_outputs=False)
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in (
        "transformers_version", "architectures", "torch_dtype", "dtype", "use_cache")}


def decoder_from_config(config_dict, untied=None):
    """A model built from a saved config (any family; T5 by default), with a separate output head when
    the model had one."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    untied = config_is_untied(config_dict) if untied is None else untied
    model_type = config_dict.get("model_type", "t5")
    config = {k: v for k, v in config_dict.items() if k not in ("scale_decoder_outputs", "model_type")}
    if model_type in T5_FAMILY or untied:
        config["tie_word_embeddings"] = not untied
    model = AutoModelForSeq2SeqLM.from_config(type(AutoConfig.for_model(model_type)).from_dict(config))
    if untied and not is_untied(model):   # 5.x ties whatever the config says
        model.lm_head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    return model


def save_export(model, tokenizer, folder, weights):
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
    if weights and hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model = unwrapped(model)
    (model.save_pretrained if weights else model.config.save_pretrained)(folder)
    config = json.loads(model.config.to_json_string())
    atomic_write_text(Path(folder) / "config.json", json.dumps({**config, **portable_config(model)}, indent=2) + "\n")


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


def weights_fingerprint(model):
    """sha256 over the model's weights (each parameter's shape, dtype and bytes; tied ones once; names left
    out, so transformers 4.x and 5.x agree): tells a frozen base model from another."""
    digests = []
    for parameter in unwrapped(model).parameters():
        tensor = parameter.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        digests.append(digest.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def enable_checkpointing(model):
    """Activation (gradient) checkpointing: 5.x's name, else 4.x's; non-reentrant, so gradients reach
    the bridge through a frozen decoder."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def with_lora(model, rank, alpha):
    """LoRA adapters on the query and value projections of every attention layer (the usual choice; PEFT's
    own default where the model names them otherwise); the base frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora_rank needs the peft package: pip install peft") from None
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = next((pair for pair in (["q_proj", "v_proj"], ["q", "v"]) if set(pair) <= names), None)  # BART/NLLB, T5
    lora = LoraConfig(task_type="SEQ_2_SEQ_LM", r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.05,
                      target_modules=targets)
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise UserError(f"--lora_rank: PEFT has no LoRA target modules for a {model.config.model_type} model "
                        f"({first_line(error)})") from None


def decoder_for(config, where=None, tokenizer_from=None, origin="this checkpoint"):
    """(model, tokenizer) of the decoder a saved configuration describes: built from its config when the
    checkpoint holds all its weights, else its base model loaded by name (or from `where`; SONARwithT5
    checks it by fingerprint). The tokenizer from `tokenizer_from` (a t5_export/ folder), else by name."""
    if config.decoder_training == "full":
        model, tokenizer = decoder_from_config(config.decoder_config), None
    else:
        model, tokenizer = load_decoder(str(where or config.t5_model))
    if tokenizer_from is not None or tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_from or config.t5_model, origin)
    return model, tokenizer


def beam_search_cache():
    """A fresh cache for one generate call. Beam search reorders every cached key and value at every step. The
    cross-attention ones are the same for every beam of a clip (its one encoder output, repeated per beam) and
    beams are only ever reordered within a clip, so reordering them copies the whole memory (most of it frames)
    for nothing: this cache leaves them where they are."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    class BeamSearchCache(EncoderDecoderCache):
        def reorder_cache(self, beam_idx):
            self.self_attention_cache.reorder_cache(beam_idx)

    return BeamSearchCache(DynamicCache(), DynamicCache())


@functools.lru_cache(maxsize=None)
def cache_kwarg():
    """generate's keyword for a cache: `cache` in transformers 5.x (`past_key_values` warns), else `past_key_values`."""
    import transformers

    return "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


def encoder_output(memory):
    """`memory` (B, M, d) as the encoder output a transformers seq2seq model takes (`encoder_outputs=`)."""
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=memory)


def embedding_scale(model):
    """RMS of what the model's encoder receives for its own tokens: the scale its pretrained layers
    expect. T5: its embedding rows. BART, mBART, M2M100/NLLB: the rows x sqrt(d_model) (a scaled
    embedding in transformers 5.x; an `embed_scale` applied by the encoder in older versions)."""
    encoder = model.get_encoder()
    embed = getattr(encoder, "embed_tokens", None) or model.get_input_embeddings()
    if type(embed) is nn.Embedding:
        scale = float(getattr(encoder, "embed_scale", 1.0) or 1.0)
        return float(embed.weight.detach().float().pow(2).mean().sqrt()) * scale
    count = embed.weight.shape[0]
    ids = torch.linspace(0, count - 1, min(count, 4096), device=embed.weight.device).long()
    with torch.no_grad():
        return float(embed(ids).float().pow(2).mean().sqrt())


def encoder_output_scale(model):
    """RMS of the model's encoder output for a sequence of its own tokens (spread over the vocabulary,
    dropout off): the scale its decoder's cross-attention reads."""
    encoder, embedding = model.get_encoder(), model.get_input_embeddings().weight
    ids = torch.linspace(0, embedding.shape[0] - 1, 64, device=embedding.device).long()[None]
    training = encoder.training
    with torch.no_grad():
        output = encoder.eval()(input_ids=ids)[0]
    encoder.train(training)
    return float(output.float().pow(2).mean().sqrt())


class DecoderAdapter(nn.Module):
    """One decoder behind one interface, whatever its family and however it trains (in full, or through LoRA
    adapters): its encoder reads the bridge's tokens (`inputs_embeds`); its decoder reads
    that encoder's output and the frame memory (`memory`) for a loss or for sentences."""

    def __init__(self, model, tokenizer, config):
        super().__init__()
        language = target_language(tokenizer, config.target_lang, config.t5_model)
        if config.lora_rank:
            model = with_lora(model, config.lora_rank, config.lora_alpha)
        if config.gradient_checkpointing:
            enable_checkpointing(unwrapped(model))
        # `t5`, as the original module named it: users' scripts group parameters by "t5" in their names
        self.t5, self.tokenizer = model, tokenizer
        self.target_lang = language[0] if language else None
        self.target_lang_id = language[1] if language else None

    @property
    def seq2seq(self):
        """The transformers model (inside its PEFT wrapper with --lora_rank)."""
        return unwrapped(self.t5)

    def encode(self, inputs_embeds, mask):
        return self.seq2seq.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=mask)[0]

    def loss(self, memory, mask, labels, smoothing=0.0):
        """Token-level cross-entropy of `labels` (padded with -100) given the cross-attention memory:
        (loss, target tokens). T5 is called stack by stack so its vocabulary head (a quarter of t5-small's
        training FLOPs) runs only where there is a target token, not on the -100 padding; other families
        compute their own loss (BART, mBART and NLLB start the decoder from their own start token)."""
        targets = labels != -100
        seq2seq = self.seq2seq
        config = seq2seq.config
        if config.model_type != "t5":   # (mT5 too: 5.x's MT5 never scales the decoder output, 4.x's does when tied)
            output = self.t5(encoder_outputs=encoder_output(memory), attention_mask=mask, labels=labels,
                                use_cache=False)
            if not smoothing:
                return output.loss, targets.sum()
            return F.cross_entropy(output.logits[targets].float(), labels[targets], label_smoothing=smoothing), targets.sum()
        decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], config.decoder_start_token_id),
                                       labels[:, :-1]], dim=1)
        decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == -100, config.pad_token_id)
        hidden = seq2seq.decoder(input_ids=decoder_input_ids, encoder_hidden_states=memory,
                                 encoder_attention_mask=mask, use_cache=False)[0]   # (B, L, d)
        hidden = hidden[targets]                                             # (N, d)
        if scales_decoder_output(config):
            hidden = hidden * config.d_model ** -0.5
        logits = seq2seq.lm_head(hidden)                                     # (N, V)
        return F.cross_entropy(logits.float(), labels[targets], label_smoothing=smoothing), targets.sum()

    @torch.no_grad()
    def generate(self, memory, mask, **gen_kwargs):
        """Sentences; gen_kwargs go to the model's generate (max_new_tokens always set). A multilingual
        decoder's first token is forced to the target language's code, left out of the text."""
        gen_kwargs.setdefault("max_new_tokens", DECODING_DEFAULTS["max_new_tokens"])
        if gen_kwargs.get("num_beams", 1) > 1:
            gen_kwargs.setdefault(cache_kwarg(), beam_search_cache())
        if self.target_lang_id is not None:
            gen_kwargs.setdefault("forced_bos_token_id", self.target_lang_id)
        ids = self.t5.generate(encoder_outputs=encoder_output(memory), attention_mask=mask, **gen_kwargs)
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

    def export(self, folder, weights):
        save_export(self.t5, self.tokenizer, folder, weights)


# ----------------------------------------------------------------------------------------------
# 9. Model


def is_base_weight(key):
    """A LoRA decoder's own weights: rebuilt from its base model, not saved in checkpoints."""
    return key.startswith("decoder.t5.") and "lora_" not in key


class SONARwithT5(nn.Module):
    """Sentence encoder (frozen by default) -> bridge -> decoder, as ModelConfig describes.

    SONARwithT5(sonar_checkpoint, t5_model_name="t5-small", freeze_encoder=True, device="cuda") as in
    the original module; the other options as keywords (ModelConfig's fields). The bridge reads the
    standardised embedding and the clip's frame tokens; the decoder reads the frame tokens too, beside its
    encoder's output (route cross_attention) or in its encoder after the bridge's tokens.
    Frames alone: SONARwithT5(None, feature_dim=D, ...) (--sonar_checkpoint none) has no sentence encoder;
    a FrameSummary learned from the frame tokens takes the sentence embedding's place.

    Calls:  model(batch) -> (loss, target tokens)            the trainer's batch dicts
            model(features, target_texts) -> loss              the original API: (B, T, D) zero-padded
            model(features, max_length=50) -> [sentence, ...]
    """

    def __init__(self, sonar_checkpoint=None, t5_model_name=DEFAULT_T5, freeze_encoder=True, device="cuda", *,
                 encoder=None, decoder=None, tokenizer=None, config=None, **options):
        super().__init__()
        if config is None:
            unknown = set(options) - {f.name for f in dataclasses.fields(ModelConfig)}
            if unknown:
                raise TypeError(f"unknown SONARwithT5 options: {sorted(unknown)}")
            config = ModelConfig(**{"t5_model": str(t5_model_name), "freeze_encoder": freeze_encoder, **options})
        if sonar_checkpoint is not None:
            encoder = load_sonar_encoder(sonar_checkpoint)
        if encoder is not None:
            config = config.replace(encoder_dims=encoder.dims)
        if decoder is None:
            decoder, tokenizer = load_decoder(config.t5_model)
        self.build(config, decoder, tokenizer, encoder)
        self.to(resolve_device(device) if isinstance(device, str) else device)

    def build(self, config, decoder, tokenizer=None, encoder=None):
        """The parts `config` describes around `decoder`: a transformers model (checked against the
        configuration's base-weight fingerprint, when it has one), or this model's DecoderAdapter, kept."""
        if not isinstance(decoder, DecoderAdapter):
            decoder = decoder.float()   # half-precision hub weights: autocast, not the weights, sets the precision
            facts = {} if config.decoder_config else {"decoder_config": portable_config(decoder)}
            if config.decoder_training != "full":
                fingerprint = weights_fingerprint(decoder)
                if config.decoder_fingerprint not in (None, fingerprint):
                    raise UserError(f"this checkpoint holds only what was trained on top of decoder "
                                    f"'{config.t5_model}' (weights {config.decoder_fingerprint[:12]}), but the one "
                                    f"given has other weights ({fingerprint[:12]}): give that base model (--t5_model)")
                facts["decoder_fingerprint"] = fingerprint
            config = config.replace(**facts)
            decoder = DecoderAdapter(decoder, tokenizer, config)
        if not config.uses_encoder and not config.feature_dim:
            raise UserError("a model with no sentence encoder (sonar_checkpoint=None, --sonar_checkpoint none) reads "
                            "the frames alone: it needs their width (feature_dim=D); a trained best_model.pt loads "
                            "with SONARwithT5.from_checkpoint(path)")
        self.config = config
        self.decoder = decoder
        self.decoding = getattr(self, "decoding", {})    # chosen after training; carried by the state dict
        if config.uses_encoder:
            self.sonar_encoder = encoder if encoder is not None else SentenceEncoder(config.encoder_dims)
            self.frame_summary = None
            if config.freeze_encoder:  # frozen means frozen from the start: no gradient and no dropout
                self.sonar_encoder.requires_grad_(False).eval()
        else:
            self.sonar_encoder, self.frame_summary = None, FrameSummary(config)
        embed_dim = (self.sonar_encoder or self.frame_summary).output_dim
        self.bridge = make_bridge(config, embed_dim, decoder)

    def rebuild(self, config):
        """This model as `config` describes it (the decoder kept when it is the same one)."""
        device, training = self.device, self.training
        decoder, tokenizer = (self.decoder, None) if config.same_decoder(self.config) else decoder_for(config)
        self.build(config, decoder, tokenizer)
        self.to(device).train(training)

    def get_extra_state(self):
        """What the state dict carries beside the weights (plain values, weights-only loadable): the configuration,
        and the decoding settings chosen on the validation clips after training (Trainer.tune_decoding)."""
        return {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "decoding": self.decoding}

    def set_extra_state(self, state):
        """The chosen decoding (load_state_dict has rebuilt the model to the state's configuration first)."""
        self.decoding = dict(state.get("decoding") or {})

    def decoding_settings(self):
        """DECODING_DEFAULTS with the settings chosen on validation: how the guide's calls decode."""
        return {**DECODING_DEFAULTS, **self.decoding}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module's, after rebuilding this model as the state dict's configuration describes: the guide's
        Cell 7 builds a default model and loads any best_model.pt into it (another bridge, frame path or
        decoder; a LoRA decoder's base weights come from its base model, by name)."""
        saved = saved_config(state_dict)
        if saved != self.config:
            self.rebuild(saved)
        if self.config.decoder_training == "full":
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if not is_base_weight(key)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\tMissing key(s): "
                               f"{missing}; unexpected key(s): {result.unexpected_keys}")
        return result._replace(missing_keys=missing)

    def trained_state_dict(self):
        """What checkpoints hold (on CPU): everything but a LoRA-adapted decoder's base weights."""
        return cpu_state_dict(self, None if self.config.decoder_training == "full" else
                              lambda key: not is_base_weight(key))

    @classmethod
    def from_checkpoint(cls, path, device="cpu", checkpoint=None, base=None):
        """A trained model from best_model.pt alone (and its t5_export/ folder when present; a LoRA
        decoder's base model by its recorded name, or from `base`)."""
        return load_model(path, device, checkpoint, base)

    # -- the guide's and the original module's names --------------------------------------------

    @property
    def expander(self):
        return self.bridge.expander

    @property
    def attention_bridge(self):
        return self.bridge.attention_bridge

    @property
    def projection(self):
        """The original module's name for the layer from the sentence embedding into the decoder's width (to the
        bridge's memory tokens)."""
        return self.bridge.memory_projection

    @property
    def t5(self):
        """The original module's name for the decoder model (inside its PEFT wrapper with --lora_rank)."""
        return self.decoder.t5

    @property
    def tokenizer(self):
        return self.decoder.tokenizer

    @property
    def device(self):
        return self.expander.device

    def train(self, mode=True):
        super().train(mode)
        if self.sonar_encoder is not None and self.config.freeze_encoder:  # a frozen encoder keeps its dropout off
            self.sonar_encoder.eval()
        return self

    # -- encoder, bridge, decoder ------------------------------------------------------------------

    def sentence_embedding(self, batch, frame_tokens=None, frame_padding=None):
        """(B, E) from a batch: the cached embedding when frozen, else the encoder on the clip mean; with no
        encoder the frame summary of the clip's frame tokens (encoded here unless given)."""
        if self.sonar_encoder is None:
            if frame_tokens is None:
                frame_tokens, frame_padding = self.frame_tokens(batch)
            return self.frame_summary(frame_tokens, frame_padding)
        if self.config.freeze_encoder and "sentence_embedding" in batch:
            return batch["sentence_embedding"].to(self.device)
        if "clip_mean" in batch:
            clip_mean = batch["clip_mean"].to(self.device)
        else:
            clip_mean = masked_mean(batch["features"].to(self.device), batch["length"])
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            return self.sonar_encoder(clip_mean.float())

    def set_statistics(self, embeddings, frame_mean=None, frame_whitening=None):
        """The training set's embedding (and frame) statistics, for the bridge's standardisation."""
        self.bridge.set_statistics(embeddings, frame_mean, frame_whitening)

    def frame_tokens(self, batch):
        """The clip's frames encoded once per batch (standardised, projected, with positions) and their padding
        mask: (B, T, d_model), (B, T)."""
        return self.bridge.frame_encoder(batch["features"], batch["length"])

    def bridge_tokens(self, batch, frame_tokens=None, frame_padding=None):
        """The bridge's output for a batch: (B, Q, d_model). Frame tokens are encoded here unless given."""
        if frame_tokens is None:
            frame_tokens, frame_padding = self.frame_tokens(batch)
        return self.bridge(self.sentence_embedding(batch, frame_tokens, frame_padding), frame_tokens, frame_padding)

    def encoder_inputs(self, batch):
        """What the decoder's encoder reads and its mask: the bridge's Q tokens, then on the frame route
        `encoder` the clip's T frame tokens (at the bridge's output scale): (B, Q [+ T], d), (B, Q [+ T]);
        and on the route `cross_attention` the frame memory for its cross-attention ((B, T, d), (B, T)), else None."""
        frame_tokens, frame_padding = self.frame_tokens(batch)
        tokens = self.bridge_tokens(batch, frame_tokens, frame_padding)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=self.device)
        if self.bridge.frame_memory is not None:
            return tokens, mask, self.bridge.frame_memory(frame_tokens, frame_padding)
        tokens = torch.cat([tokens, frame_tokens * self.bridge.output_scale], dim=1)
        return tokens, torch.cat([mask, (~frame_padding).long()], dim=1), None

    def decoder_memory(self, batch):
        """What the decoder's cross-attention reads: its encoder's output for encoder_inputs, then the frame
        memory (route `cross_attention`), and their mask: (B, M, d_model), (B, M)."""
        inputs_embeds, mask, frame_memory = self.encoder_inputs(batch)
        memory = self.decoder.encode(inputs_embeds, mask)
        if frame_memory is None:
            return memory, mask
        return torch.cat([memory, frame_memory[0]], dim=1), torch.cat([mask, frame_memory[1]], dim=1)

    def forward(self, batch, target_texts=None, max_length=50, *, label_smoothing=0.0):
        """Token-level cross-entropy on batch['labels'] (padded with -100): (loss, target tokens). A tensor
        instead of a batch dict is the original module's call (original_forward)."""
        if torch.is_tensor(batch):
            return original_forward(self, batch, target_texts, max_length, label_smoothing)
        return self.loss(batch, label_smoothing)

    def loss(self, batch, label_smoothing=0.0):
        """(loss, target tokens) of a batch; label smoothing only in training mode."""
        memory, mask = self.decoder_memory(batch)
        return self.decoder.loss(memory, mask, batch["labels"].to(self.device),
                                 label_smoothing if self.training else 0.0)

    @torch.no_grad()
    def generate(self, batch, **gen_kwargs):
        """Sentences for a batch (gen_kwargs: the decoder's generate's)."""
        memory, mask = self.decoder_memory(batch)
        return self.decoder.generate(memory, mask, **gen_kwargs)

    def target_ids(self, texts, max_length=None):
        return self.decoder.target_ids(texts, max_length)

    def labels_from_texts(self, texts, max_length=None):
        """Target sentences as token ids padded with -100 (left out of the loss): (B, L)."""
        return padded_labels(self.target_ids(texts, max_length))

    def batch_from_features(self, features):
        """A batch dict from zero-padded frames (B, T, D): each clip ends at its last non-zero frame."""
        features = features.to(self.device).float()
        nonzero = features.abs().sum(dim=-1) > 0                                    # (B, T)
        positions = torch.arange(1, features.shape[1] + 1, device=self.device)
        lengths = (nonzero * positions).max(dim=1).values.cpu()                    # (B,)
        return {"features": features, "length": lengths, "clip_mean": masked_mean(features, lengths)}


# ----------------------------------------------------------------------------------------------
# 10. Checkpoints: plain dicts of tensors and primitives (weights-only loadable). The model's state dict
# carries its ModelConfig (`_extra_state`, with the format number); best_model.pt adds the epoch and
# its scores, last.pt the optimizer, scheduler, scaler, random states and the loop's state.

RESUME_KEYS = ("optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict", "rng", "train_state")


def cpu_state_dict(module, keep=None):
    """State dict on CPU (the entries `keep` accepts); tensors that share storage (tied embeddings) stay shared."""
    copies, state = {}, {}
    for name, value in module.state_dict().items():
        if keep is not None and not keep(name):
            continue
        if not torch.is_tensor(value):
            state[name] = value
            continue
        key = (value.data_ptr(), tuple(value.shape), value.dtype)
        if key not in copies:
            copies[key] = value.detach().cpu().clone()
        state[name] = copies[key]
    return state


def plain_args(args):
    """The flags as plain values (saved in checkpoints and results.json)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def model_checkpoint(model, args, **extra):
    return {"model_state_dict": model.trained_state_dict(), "args": plain_args(args), **extra}


def saved_config(state_dict, origin="this checkpoint"):
    """The ModelConfig a state dict carries; one saved by another version of this tool is refused."""
    extra = state_dict.get("_extra_state") if isinstance(state_dict, dict) else None
    saved = extra.get("format") if isinstance(extra, dict) else None
    if saved != CHECKPOINT_FORMAT:
        if isinstance(saved, int) and saved > CHECKPOINT_FORMAT:
            raise UserError(f"{origin}: saved by a newer version of train_sonar_with_t5.py (checkpoint format "
                            f"{saved}, this one reads {CHECKPOINT_FORMAT}): update the script")
        raise UserError(f"{origin}: saved by an earlier version of this tool; retrain with this one")
    retired = retired_option(extra["config"])
    if retired:
        raise UserError(f"{origin}: trained with {retired[0]}, which this version no longer has: {retired[1]}; "
                        "retrain with this version")
    return ModelConfig.from_dict(extra["config"])


def check_model_checkpoint(checkpoint, path, keys=()):
    """A clear error for a file that is not (or not all of) a checkpoint this version can read; its config."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state_dict"), dict):
        raise UserError(f"{path}: not a model checkpoint of this tool (no 'model_state_dict')")
    config = saved_config(checkpoint["model_state_dict"], path)
    missing = [key for key in keys if key not in checkpoint]
    if missing:
        raise UserError(f"{path}: this checkpoint lacks {', '.join(missing)} (not saved by --resume's last.pt?); "
                        "use another --output_dir or remove it")
    return config


def load_model(path, device="cpu", checkpoint=None, base=None):
    """SONARwithT5.from_checkpoint: the model a best_model.pt (or last.pt) holds, built once from its config."""
    checkpoint = checkpoint if checkpoint is not None else safe_torch_load(path, "model checkpoint")
    config = check_model_checkpoint(checkpoint, path)
    export = Path(path).parent / "t5_export"
    decoder, tokenizer = decoder_for(config, base, export if export.is_dir() else None, str(path))
    model = SONARwithT5(None, device=device, decoder=decoder, tokenizer=tokenizer, config=config)
    load_model_state(model, checkpoint["model_state_dict"], path)
    return model


def load_model_state(model, state_dict, path):
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        lines = str(error).splitlines()
        raise UserError(f"{path}: checkpoint is from another model ({(lines[1] if len(lines) > 1 else lines[0]).strip()})") from None
    # A tied decoder stores its input embedding once; the tied copies may be missing.
    tied = not is_untied(model.t5)
    missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))
               and not k.endswith("embed_tokens.weight")]
    if missing or result.unexpected_keys:
        raise UserError(f"{path}: checkpoint is from another model (missing keys: "
                        f"{missing[:5] or 'none'}; unexpected keys: {result.unexpected_keys[:5] or 'none'})")


def adopted_config(checkpoint, config, args, given, path, resume=True):
    """The configuration of a run that continues a checkpoint: --resume's last.pt, or --init_from's trained
    model (a new run on new data). It is the checkpoint's, with this command line's gradient checkpointing;
    a flag typed now that contradicts it is one line, and so is another --feature_fps on --resume."""
    saved = check_model_checkpoint(checkpoint, path, RESUME_KEYS if resume else ())
    if "sonar_checkpoint" in given and (args.sonar_checkpoint is None) == saved.uses_encoder:
        raise UserError(f"cannot {'resume' if resume else 'start'} from {path}: it was trained "
                        + ("with a sentence encoder; leave out --sonar_checkpoint none" if saved.uses_encoder else
                           "with no sentence encoder (frames alone); leave out --sonar_checkpoint or give none"))
    differences = [f"--{name} {getattr(saved, name)!r} (now {getattr(config, name)!r})" for name in ModelConfig.FLAGS
                   if name in given and name != "gradient_checkpointing" and getattr(saved, name) != getattr(config, name)]
    fps = checkpoint.get("args", {}).get("feature_fps")
    if resume and fps != args.feature_fps:
        differences.append(f"--feature_fps {fps!r} (now {args.feature_fps!r})")
    if differences:
        raise UserError(f"cannot {'resume' if resume else 'start'} from {path}: it was trained with "
                        + ", ".join(differences) + "; leave those flags out (they come from the checkpoint)"
                        + (" or use another --output_dir" if resume else ""))
    return saved.replace(gradient_checkpointing=config.gradient_checkpointing)


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# 11. Decoding, metrics and collapse diagnostics: one decoding loop for training, --predict and Cell 7


def generation_kwargs(settings):
    """One dict for generate from decoding settings (a dict or the parsed flags): deterministic beam search."""
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


def in_dataset_order(parts):
    """Every process's share of a dataset's predictions (lists of Predictions) as one list, in dataset order."""
    return sorted({p.index: p for part in parts for p in part}.values(), key=lambda p: p.index)


def corpus_scores(predictions, references):
    """BLEU-4, chrF (sacreBLEU), BLEU-1..4 and ROUGE-L (None without rouge-score), with the BLEU signature."""
    from sacrebleu.metrics import BLEU, CHRF

    if not predictions:
        return {"bleu": 0.0, "chrf": 0.0, "bleu_n": [0.0] * 4, "rouge_l": None, "signature": "",
                "repeat_4gram_share": 0.0, "length_ratio": 0.0}
    bleu = BLEU()
    score = bleu.corpus_score(predictions, [references])
    bleu_n = [BLEU(max_ngram_order=n, effective_order=n < 4).corpus_score(predictions, [references]).score
              for n in range(1, 5)]
    return {"bleu": score.score, "chrf": CHRF().corpus_score(predictions, [references]).score,
            "bleu_n": bleu_n, "rouge_l": rouge_l(predictions, references), "signature": str(bleu.get_signature()),
            "repeat_4gram_share": sum(map(repeats_a_4gram, predictions)) / len(predictions),
            "length_ratio": score.sys_len / max(score.ref_len, 1)}


def repeats_a_4gram(sentence):
    """Whether a sentence holds some 4 words twice in a row (a decoding loop); words split on spaces."""
    words = sentence.split()
    grams = [tuple(words[i: i + 4]) for i in range(len(words) - 3)]
    return len(grams) != len(set(grams))


LOOP_SHARE = 0.1    # more than this share of predictions repeating a 4-gram: the log names the loops


def loop_warning(scores, predictions):
    """One line when more than LOOP_SHARE of the predictions repeat a 4-gram (decoding loops), else None."""
    if scores["repeat_4gram_share"] <= LOOP_SHARE:
        return None
    example = next((p.prediction for p in predictions if repeats_a_4gram(p.prediction)), "")
    return (f"{scores['repeat_4gram_share']:.0%} of the predictions repeat a 4-gram (decoding loops, e.g. "
            f"\"{example[:80]}...\"): the decoder has not learned where sentences end. After training the decoding is "
            "chosen on the validation clips (the default --decoding_grid tries --no_repeat_ngram_size 3 and --length_penalty 1.0); "
            "meanwhile more epochs, more data or --no_repeat_ngram_size 3 help")


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
    frame_tokens, frame_padding = model.frame_tokens(batch)                   # encoded once for both stages
    embeddings = model.sentence_embedding(batch, frame_tokens, frame_padding).float()       # (N, E)
    across_clips, across_positions = bridge_spreads(model.bridge_tokens(batch, frame_tokens, frame_padding))
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


def diagnose_collapse(diagnostics, frames_alone=False):
    """One plain sentence naming where collapse starts and what to try, or None when healthy. With frames
    alone the "encoder" numbers are the frame summary's."""
    d = diagnostics
    if d["distinct_share"] >= COLLAPSE_SHARE * d["reference_distinct_share"]:
        return None
    share = f"only {d['distinct_share']:.0%} of predictions are distinct"
    if frames_alone and d["encoder_spread"] < FLAT_SPREAD:
        return (f"Mode collapse ({share}) starts in the FRAMES: the summaries learned from different clips' frames "
                f"are identical (spread {d['encoder_spread']:.1e}); check that the clips differ (--check) and train longer.")
    if d["encoder_spread"] < FLAT_SPREAD:
        return (f"Mode collapse ({share}) starts in the ENCODER: its embeddings of different clips are "
                f"identical (spread {d['encoder_spread']:.1e}); retrain or unfreeze it "
                "(--no-freeze_encoder), or train from the frames alone (--sonar_checkpoint none).")
    if d["bridge_spread_clips"] < FLAT_SPREAD:
        return (f"Mode collapse ({share}) starts in the BRIDGE: its outputs barely differ between clips "
                f"(spread {d['bridge_spread_clips']:.1e}); train longer.")
    return (f"Mode collapse ({share}) is in the DECODER: the bridge passes on per-clip differences "
            f"(spread {d['bridge_spread_clips']:.2f}) but the decoder ignores them; train longer, or raise "
            "--bridge_learning_rate, and check that references are correct (--check).")


# ----------------------------------------------------------------------------------------------
# 12. The guide's and the original module's API: the calls their cells and scripts make


def original_forward(model, features, target_texts=None, max_length=50, label_smoothing=0.0):
    """model(features, target_texts) -> the scalar loss; model(features, max_length=50) -> sentences.
    `features` (B, T, D): frames padded with zero frames (which stay out of the mean), as the original
    collate_fn padded every clip to 300 frames."""
    batch = model.batch_from_features(features)
    if target_texts is None:
        return model.generate(batch, **generation_kwargs({**model.decoding_settings(), "max_new_tokens": max_length}))
    batch["labels"] = model.labels_from_texts(target_texts, max_length=128)
    return model.loss(batch, label_smoothing)[0]


def original_batch(model, batch):
    """This module's batch dict from the original collate_fn's ({"video_ids", "features", "texts"})."""
    if "texts" in batch and "features" in batch:
        return {**model.batch_from_features(batch["features"]), "id": list(batch["video_ids"]),
                "text": list(batch["texts"])}
    return batch


def collate_fn(items):
    """The original module's collate: {"video_ids", "features" (B, 300, D) zero-padded or cut, "texts"}."""
    frames = [item["features"][: int(item["length"])][:ORIGINAL_PAD_FRAMES] for item in items]
    return {"video_ids": [item["id"] for item in items], "texts": [item["text"] for item in items],
            "features": torch.stack([F.pad(f, (0, 0, 0, ORIGINAL_PAD_FRAMES - f.shape[0])) for f in frames])}


def evaluate_model(model, loader, device, gen_kwargs=None):
    """The guide's Cell 7 API: (BLEU, loss, [(ground_truth, prediction), ...])."""
    model = getattr(model, "module", model)
    predictions, loss_sum, tokens = translate(model, loader, gen_kwargs or generation_kwargs(model.decoding_settings()))
    return score_predictions(predictions)["bleu"], loss_sum / max(tokens, 1), \
        [(p.reference, p.prediction) for p in predictions]


def evaluate(model, val_loader, device=None):
    """The original module's evaluation: (BLEU, predictions, references) over a loader of its
    collate_fn's batches ({"video_ids", "features", "texts"}) or of this module's."""
    model = getattr(model, "module", model)
    predictions, _, _ = translate(model, (original_batch(model, batch) for batch in val_loader),
                                  generation_kwargs(model.decoding_settings()), with_loss=False)
    hypotheses, references = [p.prediction for p in predictions], [p.reference for p in predictions]
    return corpus_scores(hypotheses, references)["bleu"], hypotheses, references


def train_epoch(model, train_loader, optimizer, scheduler, epoch, device=None, max_grad_norm=1.0):
    """The original module's training epoch: one optimizer step per batch (its collate_fn's or this
    module's), gradients clipped to `max_grad_norm`; returns the mean loss."""
    raw = getattr(model, "module", model)
    model.train()
    total, batches = 0.0, 0
    for batch in tqdm(train_loader, desc=f"epoch {epoch}", leave=False):
        batch = original_batch(raw, batch)
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


# ----------------------------------------------------------------------------------------------
# 13. Training: processes, precision, batches, the optimizer step, one epoch, evaluation


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


@dataclass
class World:
    """The processes of this run (torchrun's environment); a plain `python` run is rank 0 of 1."""
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self):
        return self.rank == 0

    @staticmethod
    def env_rank():
        """This process's rank as torchrun sets it (0 for a plain `python` run)."""
        return int(os.environ.get("RANK", "0"))

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
    rank, local_rank = World.env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    resolve_device(device_name) if rank == 0 else None     # validates the flag; warns once without CUDA
    use_cuda = device_name.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu"))


NATIVE_BF16_CAPABILITY = 8    # A100, L4, H100 and later; a T4 (Colab's free GPU, 7.5) only emulates bf16


def resolve_precision(precision, device):
    """(precision, why): --precision auto is bf16 only where the GPU runs it natively (compute capability 8.0
    or more), else fp32. torch.cuda.is_bf16_supported() says yes on a T4 too, by emulation, slower than fp32."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            logger.warning(f"--precision {precision} needs a GPU: training in fp32 on CPU.")
        return "fp32", "on CPU"
    major, minor = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    native = major >= NATIVE_BF16_CAPABILITY
    if precision == "auto":
        return ("bf16", f"auto: the {gpu} runs bf16 natively") if native else \
            ("fp32", f"auto: the {gpu} has no native bf16; emulated bf16 runs slower than fp32")
    if precision == "bf16" and not native:
        logger.warning(f"--precision bf16 on the {gpu}: bf16 is emulated there and runs slower than fp32; "
                       "--precision auto (fp32 on this GPU) is faster")
    return precision, f"--precision {precision} on the {gpu}"


def fp16_warning(precision, config):
    """The warning for fp16 with a T5-family decoder, else None."""
    if precision == "fp16" and config.family in T5_FAMILY:
        return ("--precision fp16 with a T5-family decoder: T5's feed-forward outputs pass fp16's range (65,504), so "
                "steps turn non-finite and training stops (Hugging Face issues #4287, #10830, #14189); use "
                "--precision bf16 on a GPU of compute capability 8.0 or more, else fp32")
    return None


def autocast_for(device, precision):
    """One autocast context: bf16/fp16 on GPU, nothing on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


GROUP_BATCHES = 50   # length grouping: clips are sorted by length within runs of this many batches


def epoch_batches(num_items, batch_size, epoch, seed, world, lengths):
    """This process's batches for an epoch: a fresh shuffle per epoch, sharded across processes
    like DistributedSampler (padded to a multiple of the world size); reproducible for resume.
    Batches hold clips of similar `lengths` (frames per clip; the frames are padded to the batch's
    longest): the shuffled order is cut into runs of GROUP_BATCHES batches, each run sorted by length
    and cut into batches, and the batches shuffled again."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    if world.size > 1:
        order += order[: (-len(order)) % world.size]
        order = order[world.rank:: world.size]
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


def clip_batches(dataset, batches, device=None):
    """A DataLoader over fixed batches of indices, dynamically padded. Its own generator keeps it from
    drawing on the global RNG, so a resumed run's dropout matches an uninterrupted one's."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_clips,
                      pin_memory=device is not None and device.type == "cuda", generator=torch.Generator())


@torch.no_grad()
def encode_dataset(model, dataset, batch_size=4096):
    """Sentence embeddings of every clip, computed once (the frozen encoder's cache)."""
    model.sonar_encoder.eval()
    with out_of_memory_as_user_error("while encoding the clips", "run with --device cpu once, or free the GPU"):
        chunks = [model.sonar_encoder(dataset.clip_means[i: i + batch_size].to(model.device)).float().cpu()
                  for i in range(0, len(dataset), batch_size)]
    return torch.cat(chunks)                                                  # (N, E)


def parameter_groups(model):
    """Trainable parameters by part: decoder, bridge, encoder (they train at different rates)."""
    groups = {"decoder": [], "bridge": [], "encoder": []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups["decoder" if name.startswith("decoder.") else
                   "encoder" if name.startswith("sonar_encoder.") else "bridge"].append(parameter)
    return groups


OOM_TRAINING_HINT = ("lower --batch_size (and raise --grad_accum_steps to keep the global batch), "
                     "--max_target_length or --num_queries")


def load_split(args, split, manifest, features, feature_dim, require_text=True, progress=True):
    """How2SignDataset of one split as the flags ask (the one place training, --check and --predict build one)."""
    return How2SignDataset(manifest, features, feature_dim=feature_dim, split=split,
                           require_text=require_text, trim_zero_frames=args.trim_zero_frames,
                           feature_fps=args.feature_fps, max_samples=args.max_samples, cache_dir=args.cache_dir,
                           progress=progress)


def data_splits(args):
    """(split, manifest, features folder) of the training, validation and (when given) test data."""
    return (("train", args.train_manifest, args.train_features), ("val", args.val_manifest, args.val_features),
            *((("test", args.test_manifest, args.test_features),) if args.test_manifest else ()))


def warn_if_test_is_not_held_out(val, test):
    """A warning when the test split shares clips (ids) with the validation split, or is its manifest."""
    shared = len(set(val.ids) & set(test.ids))
    same = Path(val.manifest).resolve() == Path(test.manifest).resolve()
    if shared or same:
        logger.warning(f"test: {shared} of its {len(test)} clips are validation clips too" + (" (the same manifest)"
                       if same else "") + ": its score is not held out, since the validation set picks the best "
                       "checkpoint; give a test split of its own (How2Sign's how2sign_realigned_test.csv)")


def report_dataset(dataset, manifest):
    """The log lines every run prints about a split: how it was read, what was skipped (why, the first ids)."""
    for line in dataset.reading():
        logger.info(f"{dataset.split}: {line}")
    if dataset.skipped:
        logger.warning(f"{dataset.split}: skipped {len(dataset.skipped)} rows/clips ({dataset.skip_summary_kinds()}); "
                       f"first: {', '.join(clip_id for clip_id, _ in dataset.skipped[:5])}")
    logger.info(f"{dataset.split}: {len(dataset)} clips ({dataset.feature_dim}-d features, "
                f"up to {dataset.max_frames} frames) from {manifest}")


def write_predictions_tsv(path, predictions):
    """`id reference prediction`, one row per clip, written atomically."""
    atomic_write_text(path, "id\treference\tprediction\n" + "".join(
        f"{clean(p.id)}\t{clean(p.reference)}\t{clean(p.prediction)}\n" for p in predictions))


def write_best_predictions(out, predictions):
    """best_predictions.tsv (id, reference, prediction) and the original module's best_predictions.txt
    ("GT: ..." / "Pred: ..." pairs, a blank line between), each written atomically."""
    write_predictions_tsv(Path(out) / "best_predictions.tsv", predictions)
    atomic_write_text(Path(out) / "best_predictions.txt", "".join(
        f"GT: {clean(p.reference)}\nPred: {clean(p.prediction)}\n\n" for p in predictions))


def score_record(scores, prefix="val"):
    """Scores under the one key scheme of the log, metrics.jsonl, results.json, sweep.json and the trackers:
    <prefix>_bleu, <prefix>_bleu_1..4, <prefix>_chrf, <prefix>_rouge_l, <prefix>_repeat_4gram_share,
    <prefix>_length_ratio (no prefix: the bare names)."""
    p = f"{prefix}_" if prefix else ""
    return {f"{p}bleu": scores["bleu"], f"{p}chrf": scores["chrf"],
            **{f"{p}bleu_{n}": value for n, value in enumerate(scores["bleu_n"], start=1)},
            **({f"{p}rouge_l": scores["rouge_l"]} if scores["rouge_l"] is not None else {}),
            f"{p}repeat_4gram_share": scores["repeat_4gram_share"], f"{p}length_ratio": scores["length_ratio"]}


def describe_scores(scores):
    """BLEU, BLEU-1..4, chrF (and ROUGE-L), the length ratio and repeated 4-grams on one log line."""
    rouge = f" | ROUGE-L {scores['rouge_l']:.2f}" if scores["rouge_l"] is not None else ""
    return (f"BLEU {scores['bleu']:.2f} (BLEU-1..4 {' / '.join(f'{b:.1f}' for b in scores['bleu_n'])}) | "
            f"chrF {scores['chrf']:.2f}{rouge} | length ratio {scores['length_ratio']:.2f} | "
            f"{scores['repeat_4gram_share']:.0%} repeat a 4-gram")


def improves(record, best, metric, threshold=0.0):
    """Whether an evaluation beats the best one, for best_model.pt and --patience: by more than
    --early_stopping_threshold on the metric (a lower loss for "loss"). A tie is no improvement, as in
    the Hugging Face Trainer's early stopping."""
    if best is None:
        return True
    if metric == "loss":
        return record["val_loss"] < best["val_loss"] - threshold
    return record[f"val_{metric}"] > best[f"val_{metric}"] + threshold


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

    `model` is what training calls (DDP-wrapped with torchrun); `raw_model` is the
    SONARwithT5 inside it, used for evaluation and saved without any wrapper prefix.
    """

    def __init__(self, args, world, given=frozenset()):
        self.args, self.world = args, world
        self.given = given          # flags typed on the command line (--resume: the others follow last.pt's)
        self.device = world.device
        self.out = Path(args.output_dir)
        self.precision, self.precision_reason = resolve_precision(args.precision, self.device)
        self.state = TrainState()
        self.metrics = []
        self.reporter = None
        self.best_eval = None       # (predictions, loss, scores) of the best epoch in this process
        self.decoding = {name: getattr(args, name) for name in DECODING_DEFAULTS}   # tuned after training

    # -- set-up ----------------------------------------------------------------------------------

    def setup(self):
        args = self.args
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        config = ModelConfig.from_args(args)
        resume_from = self.resume_checkpoint() if args.resume else None   # refused early, before any data is read
        init_from = safe_torch_load(args.init_from, "--init_from checkpoint") if args.init_from else None
        encoder = None
        if resume_from or init_from:   # (the encoder's weights, when it has one, come with the checkpoint's)
            config = adopted_config(resume_from or init_from, config, args, self.given,
                                    self.out / "last.pt" if resume_from else args.init_from, resume=bool(resume_from))
        elif args.sonar_checkpoint is not None:
            encoder = load_sonar_encoder(args.sonar_checkpoint)
            config = config.replace(encoder_dims=encoder.dims)
        logger.info(f"Precision: {self.precision} ({self.precision_reason})")   # once the model's files are read
        datasets = self.load_datasets(config)
        if config.frame_width is None:   # frames alone: the training clips' width
            config = config.replace(feature_dim=datasets["train"].feature_dim)
        self.raw_model = SONARwithT5(None, config=config, encoder=encoder, device=self.device)
        self.config = self.raw_model.config
        for dataset in datasets.values():
            dataset.tokenize(self.raw_model, args.max_target_length)
        if not self.config.uses_encoder:
            logger.info(f"No sentence encoder (--sonar_checkpoint none): frames alone, {self.config.feature_dim}-d; a "
                        "summary learned from the frame tokens (one attention query) takes the sentence "
                        "embedding's place")
        if resume_from or init_from:   # its weights and input statistics (the encoder's cache below needs them)
            load_model_state(self.raw_model, (resume_from or init_from)["model_state_dict"],
                             self.out / "last.pt" if resume_from else args.init_from)
        if init_from:   # a second stage: a new run on new data
            logger.info(f"--init_from {args.init_from}: starting from its weights (epoch {init_from.get('epoch', '?')} of "
                        "that run); epoch 1 of a new run, with a new optimizer and schedule")
        if advice := fp16_warning(self.precision, self.config):
            logger.warning(advice)
        self.train_set, self.val_set, self.test_set = datasets["train"], datasets["val"], datasets.get("test")
        if self.test_set is not None:
            warn_if_test_is_not_held_out(self.val_set, self.test_set)
        self.fingerprints = {split: dataset.fingerprint() for split, dataset in datasets.items()}
        logger.info("data fingerprints (sha256 of each split as used): "
                    + ", ".join(f"{split} {value[:12]}" for split, value in self.fingerprints.items()))
        train_embeddings = encode_dataset(self.raw_model, self.train_set) if self.config.uses_encoder else None
        if self.config.uses_encoder and self.config.freeze_encoder:  # computed once, reused every epoch and for evaluation
            for dataset in datasets.values():
                dataset.sentence_embeddings = train_embeddings if dataset is self.train_set else \
                    encode_dataset(self.raw_model, dataset)
        if not (resume_from or init_from):   # (a trained model keeps the statistics its weights were trained with)
            self.raw_model.set_statistics(train_embeddings, self.train_set.frame_mean,
                                          whitening_matrix(self.train_set.frame_covariance()))
        self.build_optimizer()
        if resume_from:
            self.restore(resume_from, self.out / "last.pt")
        self.model = self.raw_model
        if self.world.size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.world.is_main:
            self.raw_model.decoder.export(self.out / "t5_export", weights=False)
            self.reporter = RunReporter(report_backends(args.report_to), self.out, args, resume=args.resume)

    def load_datasets(self, config):
        """Every split, read and checked (its targets are tokenised once the model is built). The clips'
        width: the model's, or with frames alone (none known yet) the training split's."""
        args = self.args
        datasets, skipped, width = {}, [], config.frame_width
        for split, manifest, features in data_splits(args):
            dataset = load_split(args, split, manifest, features, width, progress=self.world.is_main)
            width = width or dataset.feature_dim
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
            datasets[split] = dataset
        if self.world.is_main:
            atomic_write_text(self.out / "skipped_clips.tsv", "id\treason\n" + "".join(
                f"{clean(clip_id)}\t{clean(reason)}\n" for clip_id, reason in skipped))
        return datasets

    def build_optimizer(self):
        from transformers import get_linear_schedule_with_warmup

        args = self.args
        groups = parameter_groups(self.raw_model)
        rates = {"decoder": args.learning_rate, "bridge": args.bridge_learning_rate,
                 "encoder": args.learning_rate * args.encoder_lr_scale}
        self.optimizer = torch.optim.AdamW([{"params": p, "lr": rates[g]} for g, p in groups.items() if p],
                                           weight_decay=args.weight_decay, fused=True)
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
        return safe_torch_load(path, "resume checkpoint")

    def restore(self, checkpoint, path):
        """The optimizer, schedule, random state and progress of last.pt (setup loaded its weights)."""
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
        trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        logger.info(f"Training {args.epochs} epochs of {self.steps_per_epoch} steps on {self.device} "
                    f"({self.precision}, {self.world.size} process(es), global batch {global_batch}, bridge at learning "
                    f"rate {args.bridge_learning_rate:g}, decoder at {args.learning_rate:g}, {trainable:,} trainable parameters)")
        if args.patience and self.state.stale_evals >= args.patience:
            logger.info(f"This run stopped early after epoch {self.state.epoch} (validation {args.early_stopping_metric} "
                        f"had not improved for {self.state.stale_evals} evaluations): nothing to train. Raise --patience "
                        f"above {self.state.stale_evals} to continue it.")
            return None if (self.out / "results.json").is_file() else self.finish()
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
        """This process's training batches of `epoch` (indices): clips of similar length (less padding)."""
        args = self.args
        return epoch_batches(len(self.train_set), args.batch_size, epoch, args.seed, self.world, self.train_set.lengths)

    def train_epoch(self, epoch):
        args, state = self.args, self.state
        batches = self.epoch_batches(epoch)
        loader = clip_batches(self.train_set, batches[state.batch_in_epoch:], self.device)
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
        # (float(): syncs the GPU once per optimizer step, which the non-finite check needs anyway)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.args.max_grad_norm))
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
            hint = ("fp16 overflows easily (T5 is known to): use --precision bf16 on a GPU of compute capability 8.0 "
                    "or more, else fp32."
                    if self.precision == "fp16" else
                    "lower --learning_rate, check the features for extreme values, or resume from last.pt.")
            raise UserError(f"Training diverged: {bad_in_row} steps in a row had a non-finite loss or "
                            f"gradient ({self.state.skipped_steps} skipped in all); {hint} "
                            f"The last good checkpoint is {self.out / 'last.pt'}.")

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, dataset=None):
        """Predictions over every clip of the validation set (or of `dataset`), split across processes and
        gathered: (predictions in dataset order, loss, scores)."""
        part = translate(self.raw_model, self.shard_batches(dataset or self.val_set), generation_kwargs(self.decoding),
                         self.precision, progress=self.world.is_main)
        gathered = self.world.gather(part)
        predictions = in_dataset_order(predictions for predictions, _, _ in gathered)
        loss = sum(p[1] for p in gathered) / max(sum(p[2] for p in gathered), 1)
        return predictions, loss, score_predictions(predictions)

    def shard_batches(self, dataset):
        """This process's share of a dataset's clips (every world-size-th), in batches of similar length."""
        indices = list(range(len(dataset)))[self.world.rank:: self.world.size]
        return clip_batches(dataset, length_sorted_batches(dataset, indices, self.args.eval_batch_size))

    def evaluate_epoch(self, epoch):
        predictions, loss, scores = self.evaluate()
        diagnostics = collapse_diagnostics(self.raw_model, self.val_set, [p.prediction for p in predictions],
                                           [p.reference for p in predictions])
        record = {"val_loss": loss, **score_record(scores), "eval_clips": len(predictions), **diagnostics}
        best = self.state.best
        metric = self.args.early_stopping_metric
        improved = improves(record, best, metric, self.args.early_stopping_threshold)
        self.state.stale_evals = 0 if improved else self.state.stale_evals + 1
        if improved:  # every process tracks the best; only the main one writes it
            self.state.best = {"epoch": epoch + 1, "val_bleu": scores["bleu"], "val_chrf": scores["chrf"],
                               "val_loss": loss}
            self.best_eval = (predictions, loss, scores)
        if self.world.is_main:
            self.report(epoch, record, scores, predictions, diagnostics)
            if improved:
                atomic_torch_save(model_checkpoint(self.raw_model, self.args, epoch=epoch + 1,
                                                   val_bleu=scores["bleu"], val_loss=loss), self.out / "best_model.pt")
                write_best_predictions(self.out, predictions)
                logger.info(f"  new best (BLEU {scores['bleu']:.2f}): saved {self.out / 'best_model.pt'}")
        return record

    def report(self, epoch, record, scores, predictions, diagnostics):
        logger.info(f"epoch {epoch + 1}/{self.args.epochs}: val loss {record['val_loss']:.4f} | "
                    f"{describe_scores(scores)} | distinct predictions {diagnostics['distinct_share']:.0%} "
                    f"({record['eval_clips']} clips)")
        logger.info(f"  sacreBLEU {scores['signature']}")
        frames_alone = not self.config.uses_encoder
        logger.info(f"  diagnostics: {'frame summary' if frames_alone else 'encoder'} cosine "
                    f"{diagnostics['encoder_cosine']:.4f} (spread "
                    f"{diagnostics['encoder_spread']:.2e}) | bridge spread across clips "
                    f"{diagnostics['bridge_spread_clips']:.3f}, across positions "
                    f"{diagnostics['bridge_spread_positions']:.3f}")
        verdict = diagnose_collapse(diagnostics, frames_alone)
        if verdict:
            logger.warning("  " + verdict)
        if loops := loop_warning(scores, predictions):
            logger.warning("  " + loops)
        for n, p in enumerate(predictions[:5], start=1):
            logger.info(f"  {n}. [{p.id}] reference:  {p.reference}\n     prediction: {p.prediction}")

    def finish(self):
        """Score the best model on the full validation set, and once on the test split when given (which
        never picks a checkpoint); write results and the export."""
        if self.state.best is None:
            raise UserError("no evaluation ran; nothing to report")
        best_path = self.out / "best_model.pt"
        self.world.barrier()
        load_model_state(self.raw_model, safe_torch_load(best_path, "best model")["model_state_dict"], best_path)
        # The best epoch's evaluation, or (the run resumed after it) the best model's again.
        predictions, loss, scores = self.best_eval or self.evaluate()
        tuning = self.tune_decoding(scores)
        if tuning:
            predictions, scores = tuning.pop("predictions"), tuning.pop("scores")
            self.raw_model.decoding = tuning["chosen"]   # its state dict carries the choice to --predict and Cell 7
            if self.world.is_main:
                checkpoint = safe_torch_load(best_path, "best model")
                atomic_torch_save({**checkpoint, "model_state_dict": self.raw_model.trained_state_dict()}, best_path)
        sentences = [p.prediction for p in predictions]
        results = {"best_epoch": self.state.best["epoch"], **score_record(scores), "val_loss": loss,
                   "signature": scores["signature"], "rouge_signature": ROUGE_SIGNATURE if scores["rouge_l"] is not None else None,
                   "distinct_share": len(set(sentences)) / max(len(sentences), 1),
                   "val_clips": len(predictions), "skipped_steps": self.state.skipped_steps,
                   "epochs_trained": self.state.epoch, "selection_metric": self.args.early_stopping_metric,
                   "data_fingerprints": {split: self.fingerprints.get(split) for split in ("train", "val", "test")},
                   "sentence_encoder": list(self.config.encoder_dims) if self.config.uses_encoder else None,
                   "frames_alone": not self.config.uses_encoder, "decoding": self.decoding,
                   "decoding_tuning": tuning, "args": plain_args(self.args)}
        test = self.evaluate(self.test_set) if self.test_set is not None else None
        if test:
            results.update(score_record(test[2], "test"), test_loss=test[1], test_clips=len(test[0]))
        if self.world.is_main:
            write_best_predictions(self.out, predictions)
            if test:
                write_predictions_tsv(self.out / "test_predictions.tsv", test[0])
                logger.info(f"Test split (scored once, with the best model of epoch {results['best_epoch']}): "
                            f"{describe_scores(test[2])}")
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2) + "\n")
            self.raw_model.decoder.export(self.out / "t5_export", weights=True)
            logger.info(f"Best epoch {results['best_epoch']}: {describe_scores(scores)} | distinct "
                        f"{results['distinct_share']:.0%} | {scores['signature']}"
                        + (f" | ROUGE-L: {ROUGE_SIGNATURE}" if scores["rouge_l"] is not None else ""))
            logger.info(f"Wrote {best_path}, best_predictions.tsv/.txt, results.json, metrics.jsonl, "
                        f"training_log.json and t5_export/ in {self.out}")
            if self.reporter:
                self.reporter.finish(results, [self.out / name for name in (
                    "results.json", "best_predictions.tsv", "metrics.jsonl", "train.log")])
        return results

    def tune_decoding(self, trained_scores):
        """The best checkpoint's decoding, chosen on every validation clip from --decoding_grid (the settings the
        command line did not set; each batch encoded once): the highest BLEU of the settings that loop (repeat a
        4-gram) in at most LOOP_SHARE of the clips (of all of them when each loops more); kept in self.decoding for
        the test split, results and --predict. Returns what the log and results.json say of it (None when there is
        nothing to tune), with the chosen setting's predictions and scores."""
        grid = {name: values for name, values in parse_sweep(self.args.decoding_grid, "--decoding_grid").items() if name not in self.given}
        if not grid:
            return None
        rows = sweep_rows(self.raw_model, self.shard_batches(self.val_set), self.decoding, grid, self.precision,
                          self.world.gather)
        best = max(rows, key=lambda row: (row["scores"]["repeat_4gram_share"] <= LOOP_SHARE, row["scores"]["bleu"]))
        self.decoding = {**self.decoding, **best["settings"]}
        if self.world.is_main:
            logger.info(f"Decoding chosen on the {len(self.val_set)} validation clips with the best model (--decoding_grid "
                        f"\"{self.args.decoding_grid}\"; settings typed on the command line are kept):")
            log_sweep_table(grid, sorted(rows, key=lambda row: -row["scores"]["bleu"]))
            logger.info(f"  chosen: {', '.join(f'{k} {v:g}' for k, v in best['settings'].items())} (BLEU "
                        f"{best['scores']['bleu']:.2f}; as trained {trained_scores['bleu']:.2f}): the test split and "
                        "--predict decode with it")
        return {"grid": self.args.decoding_grid, "chosen": best["settings"], "val_bleu_as_trained": trained_scores["bleu"],
                "settings": [{**row["settings"], **score_record(row["scores"], prefix="val")} for row in rows],
                "predictions": best["predictions"], "scores": best["scores"]}

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
        if self.reporter:
            self.reporter.log(record, record["epoch"])

    def save_last(self):
        atomic_torch_save(model_checkpoint(
            self.raw_model, self.args, optimizer_state_dict=self.optimizer.state_dict(),
            scheduler_state_dict=self.scheduler.state_dict(), scaler_state_dict=self.scaler.state_dict(),
            train_state=vars(self.state).copy(), rng=rng_state()), self.out / "last.pt")

# ----------------------------------------------------------------------------------------------
# 14. Experiment tracking (--report_to, the Hugging Face Trainer's convention): params once, metrics per
# evaluation, results and predictions as artifacts. Each backend is an optional package.

REPORT_BACKENDS = ("tensorboard", "mlflow")
REPORT_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def report_backends(report_to):
    """The installed backends a --report_to value names ('none': none). One the user typed is checked before
    training (validate_args); the default's is skipped with a note."""
    available = []
    for name in [] if "none" in report_to else dict.fromkeys(report_to):
        missing = backend_missing(name)
        if missing:
            logger.info(f"{missing}: not reporting to {name}.")
        else:
            available.append(name)
    return available


def backend_missing(name):
    """None when the backend's package imports, else the one-line message saying how to get it."""
    module, package = REPORT_PACKAGES[name]
    try:
        __import__(module)
    except ImportError:
        return f"--report_to {name} needs the {package} package: pip install {package} (or leave {name} out of --report_to)"
    return mlflow_store_problem() if name == "mlflow" else None


def mlflow_store_problem():
    """None when MLflow's tracking store (MLFLOW_TRACKING_URI, else MLflow's default) opens, else one line
    that names the URI and the fix."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - MLflow raises many kinds; each means "cannot track there"
        return (f"--report_to mlflow: MLflow {mlflow.__version__} refuses the tracking URI {uri} "
                f"({first_line(error)[:140]}...); set MLFLOW_TRACKING_URI=sqlite:///mlflow.db (MLflow 3's default "
                "store; it needs SQLAlchemy, which the full package brings: pip install mlflow)")
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

    def log(self, record, step):
        """Numeric values of one evaluation's record, at step `step` (the epoch)."""
        metrics = {k: float(v) for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        for name, (client, _) in self.backends.items():
            if name == "tensorboard":
                for key, value in metrics.items():
                    client.add_scalar(key, value, step)
                client.flush()
            else:
                client.log_metrics(metrics, step=step)

    def finish(self, results, artifacts):
        """Final scores and the output files (those that exist) as artifacts; closes every run."""
        finals = {f"best_{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}
        files = [str(path) for path in artifacts if Path(path).is_file()]
        for name, (client, _) in self.backends.items():
            if name == "tensorboard":
                client.add_text("results", json.dumps(results, indent=2))
                client.close()
            else:
                client.log_metrics(finals)
                for path in files:
                    client.log_artifact(path)
                client.end_run()
        self.backends = {}


# ----------------------------------------------------------------------------------------------
# 15. Modes: --check (the guide's Cell 3), --predict, --demo


def describe_decoder(name, target_lang):
    """The decoder's family, width and target language, from its config and tokenizer (not its weights)."""
    config = read_decoder_config(name)
    language = target_language(load_tokenizer(name, "--t5_model"), target_lang, name)
    return (f"{config.model_type}, d_model {config.d_model}" + (f", target language {language[0]}" if language else "")
            + (" (local folder)" if Path(name).is_dir() else " (hub: downloaded on first use, then cached)"))


def run_check(args):
    """Verify every path and clip; report per split; exit code 0 only when training can start."""
    ok, encoder_dim = True, None
    print("Checking the files a training run needs:")
    try:
        if args.sonar_checkpoint is None:
            print("  ok  no sentence encoder (--sonar_checkpoint none): frames alone, the frames' width from the "
                  "training clips; a summary learned from them takes the embedding's place")
        else:
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
            dataset = load_split(args, split, manifest, features, encoder_dim)
        except UserError as error:
            ok = False
            print(f"  ERR {error}")
            continue
        encoder_dim = encoder_dim or dataset.feature_dim   # frames alone: every split at the training clips' width
        usable = dataset.lost_share() <= args.max_skip_share     # the rule training stops on
        ok = ok and usable
        dims = ", ".join(f"{d}-d x{n}" for d, n in sorted(dataset.dim_counts.items()))
        print(f"  {'ok ' if usable else 'ERR'} {split}: {dataset.manifest_rows()} manifest rows -> "
              f"{len(dataset)} usable clips "
              f"(feature dims: {dims}; {int(dataset.lengths.min())}-{dataset.max_frames} frames)")
        for line in dataset.reading():
            print(f"      {line}")
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
    # decode as the run chose after training (else as it trained) unless this command says otherwise
    saved = {**contents.get("args", {}), **model.decoding}
    decoding = {name: saved[name] if name not in given and name in saved else getattr(args, name)
                for name in DECODING_DEFAULTS}
    precision = resolve_precision(args.precision, device)[0]
    dataset = load_split(args, "predict", args.manifest, args.features, model.config.frame_width,
                         require_text=args.manifest is not None)
    report_dataset(dataset, args.manifest or args.features)
    batches = length_sorted_batches(dataset, range(len(dataset)), args.eval_batch_size)
    if args.sweep:
        return run_sweep(model, clip_batches(dataset, batches), decoding, parse_sweep(args.sweep),
                         precision, checkpoint.parent / "sweep.json")
    predictions, _, _ = translate(model, clip_batches(dataset, batches), generation_kwargs(decoding),
                                  precision, with_loss=False, progress=True)
    predictions.sort(key=lambda p: p.index)
    out = Path(args.predictions_file or checkpoint.parent / "predictions.tsv")
    atomic_write_text(out, "id\tprediction\n" + "".join(f"{clean(p.id)}\t{clean(p.prediction)}\n"
                                                        for p in predictions))
    logger.info(f"Wrote {len(predictions)} translations to {out}")
    if args.manifest is not None:
        scores = score_predictions(predictions)
        logger.info(f"{describe_scores(scores)} | {scores['signature']}")
    return 0


SWEEP_SETTINGS = ("num_beams", "max_new_tokens", "length_penalty", "repetition_penalty", "no_repeat_ngram_size")


def parse_sweep(text, flag="--sweep"):
    """--sweep "num_beams=1,4,5 length_penalty=1.0,1.5": {setting: [values]} (deterministic settings only);
    'none': {}."""
    grid = {}
    for item in ([] if text.strip().lower() == "none" else text.split()):
        name, _, values = item.partition("=")
        try:
            if name not in SWEEP_SETTINGS:
                raise ValueError
            grid[name] = [type(DECODING_DEFAULTS[name])(value) for value in values.split(",")]
        except ValueError:
            raise UserError(f"{flag}: '{item}' is not SETTING=V1,V2,... with SETTING one of "
                            f"{', '.join(SWEEP_SETTINGS)}") from None
    return grid


@torch.no_grad()
def sweep_rows(model, batches, decoding, grid, precision, gather=lambda part: [part]):
    """Every combination of the grid's settings (each over `decoding`) on the same clips, each batch's decoder memory
    (encoder output and frame memory) computed once and reused by every setting; with `gather`, every process's
    share: [{"settings", "scores", "predictions"}], in the grid's order."""
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    outputs = [[] for _ in settings]
    model.eval()
    for batch in tqdm(batches, desc=f"decoding with {len(settings)} settings", leave=False):
        if not all(batch["text"]):
            raise UserError("--sweep scores every setting: give --manifest with the clips' sentences")
        with autocast_for(model.device, precision):
            memory, mask = model.decoder_memory(batch)
            for predictions, setting in zip(outputs, settings):
                sentences = model.decoder.generate(memory, mask, **generation_kwargs({**decoding, **setting}))
                predictions += map(Prediction._make, zip(batch["index"].tolist(), batch["id"], batch["text"], sentences))
    parts = gather(outputs)
    outputs = [in_dataset_order(part[k] for part in parts) for k in range(len(settings))]
    return [{"settings": setting, "scores": score_predictions(predictions), "predictions": predictions}
            for setting, predictions in zip(settings, outputs)]


def log_sweep_table(grid, rows):
    """One line per setting ({"settings", "scores"}), in the order given: BLEU, chrF, repeats, length ratio."""
    logger.info("| " + " | ".join(grid) + " | BLEU | chrF | repeat a 4-gram | length ratio |")
    for row in rows:
        scores = row["scores"]
        logger.info("| " + " | ".join(f"{row['settings'][name]:g}" for name in grid) + f" | {scores['bleu']:.2f} | "
                    f"{scores['chrf']:.2f} | {scores['repeat_4gram_share']:.1%} | {scores['length_ratio']:.3f} |")


def run_sweep(model, batches, decoding, grid, precision, path):
    """--predict --sweep: every combination of the grid's settings on the same clips (sweep_rows); a table of
    BLEU, chrF, repeated 4-grams and length ratio per setting, the best first, and sweep.json."""
    rows = sorted(sweep_rows(model, batches, decoding, grid, precision), key=lambda row: -row["scores"]["bleu"])
    log_sweep_table(grid, rows)
    atomic_write_text(path, json.dumps([{"settings": row["settings"], **score_record(row["scores"], prefix="")}
                                        for row in rows], indent=2) + "\n")
    logger.info(f"Wrote {path}: {len(rows)} settings on {len(rows[0]['predictions'])} clips; the best: {rows[0]['settings']}")
    return 0


def read_run(folder, predictions_name):
    """(results.json, [{"id", "reference", "prediction"}]) of a finished run folder."""
    results_path, predictions_path = Path(folder) / "results.json", Path(folder) / predictions_name
    for path in (results_path, predictions_path):
        if not path.is_file():
            raise UserError(f"--compare: {path} not found: give run folders that finished training"
                            + (" with a test split (--test_manifest)" if "test" in predictions_name else ""))
    with open(predictions_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return json.loads(results_path.read_text()), rows


SEED_FREE = ("seed", "output_dir", "log_file", "resume")    # flags that may differ within a group of seeds


def run_compare(args):
    """--compare RUN_DIR ...: each run's scores recomputed from its prediction file, BLEU with its 95%
    confidence interval and the paired bootstrap p-value against the first run (sacreBLEU's own test,
    1,000 resamples, its fixed seed), chrF, ROUGE-L; runs differing only in --seed summarised as a group."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    split = args.compare_split
    runs = [(str(folder), *read_run(folder, "best_predictions.tsv" if split == "val" else "test_predictions.tsv"))
            for folder in args.compare]
    first_name, first_results, first_rows = runs[0]
    ids = [row["id"] for row in first_rows]
    fingerprint = first_results.get("data_fingerprints", {}).get(split)
    systems = []
    for name, results, rows in runs:
        own = results.get("data_fingerprints", {}).get(split)
        same = own == fingerprint is not None
        if not same and not args.compare_any_data:
            raise UserError(f"--compare: {name} " + (f"was scored on other {split} data than {first_name} (data "
                            "fingerprints differ)" if own and fingerprint else "records no data fingerprint (trained by an "
                            "earlier version)") + ": its scores cannot be compared; add --compare_any_data to compare "
                            "them anyway")
        by_id = {row["id"]: row for row in rows}
        if set(by_id) != set(ids):
            raise UserError(f"--compare: {name} and {first_name} predicted different {split} clips "
                            f"({len(set(by_id) ^ set(ids))} ids differ): a paired comparison needs the same clips")
        systems.append((name, [by_id[clip_id]["prediction"] for clip_id in ids], same))
    references = [row["reference"] for row in first_rows]
    os.environ.setdefault("SACREBLEU_SEED", "12345")
    signatures, scores = PairedTest([(name, hypotheses) for name, hypotheses, _ in systems],
                                    {"BLEU": BLEU(), "chrF": CHRF()}, [references], test_type="bs", n_samples=1000)()
    bleu, chrf = (next(v for k, v in scores.items() if k.lower().startswith(m)) for m in ("bleu", "chrf"))
    records = [{"run": name, "clips": len(ids), "bleu": float(b.score), "bleu_ci_low": float(b.mean - b.ci),
                "bleu_ci_high": float(b.mean + b.ci), "chrf": float(c.score), "rouge_l": rouge_l(hypotheses, references),
                "p_value": float(b.p_value) if i else None,
                "same_data": same, "seed": results.get("args", {}).get("seed")}
               for i, ((name, hypotheses, same), b, c, (_, results, _)) in enumerate(zip(systems, bleu, chrf, runs))]
    groups = defaultdict(list)
    for record, (_, results, _) in zip(records, runs):
        if "args" in results:
            groups[json.dumps({k: v for k, v in results["args"].items() if k not in SEED_FREE}, sort_keys=True)].append(record)
    print(f"{split} scores recomputed from the prediction files ({len(ids)} clips; paired bootstrap against the first run):")
    print("| run | BLEU | 95% CI | chrF | ROUGE-L | p (vs first) | same data as the first |")
    for r in records:
        rouge = "-" if r["rouge_l"] is None else f"{r['rouge_l']:.2f}"
        print(f"| {r['run']} | {r['bleu']:.2f} | [{r['bleu_ci_low']:.2f}, {r['bleu_ci_high']:.2f}] | {r['chrf']:.2f} | "
              f"{rouge} | {'-' if r['p_value'] is None else format(r['p_value'], '.4f')} | {'yes' if r['same_data'] else 'NO'} |")
    for members in (m for m in groups.values() if len({r["seed"] for r in m}) > 1):
        values = [r["bleu"] for r in members]
        summary = {"runs": len(members), "bleu_mean": statistics.mean(values), "bleu_std": statistics.stdev(values)}
        for r in members:
            r["seed_group"] = summary
        print(f"seeds {', '.join(str(r['seed']) for r in members)} of the same flags: BLEU {summary['bleu_mean']:.2f} "
              f"± {summary['bleu_std']:.2f} (mean ± standard deviation of {len(members)} runs)")
    for metric, signature in signatures.items():
        print(f"{metric} signature: {signature}")
    if args.compare_json:
        atomic_write_text(args.compare_json, json.dumps(records, indent=2) + "\n")
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


def build_tiny_t5(tokenizer, folder, d_model=128, layers=2, heads=4, seed=0, vocab_size=None):
    """A randomly initialised T5 (+ tokenizer) saved in `folder`; vocab_size defaults to the tokenizer's."""
    from transformers import T5Config

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size or len(tokenizer), d_model=d_model, d_ff=4 * d_model, d_kv=d_model // heads,
                      num_heads=heads, num_layers=layers, num_decoder_layers=layers, dropout_rate=0.1,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    save_export(decoder_from_config(json.loads(config.to_json_string())), tokenizer, folder, weights=True)
    return folder


def make_demo_data(root, num_train=2200, num_val=200, feature_dim=256, seed=0, t5_folder="t5-tiny", messy=True,
                   sentences=None):
    """Write a How2Sign-shaped project: features/{train,val}/<id>.npy, manifests/{train,val}.tsv,
    data/How2Sign_val.json, an encoder checkpoint in the users' format, and a tiny T5 + tokenizer.

    Each word has a "sign" (a random vector shown over 2-4 noisy frames); every frame also carries a
    large component shared by all clips, scaled until the frozen encoder's embeddings of different
    clips reach a mean pairwise cosine >= 0.99, as the users' real encoder does. `messy`: the train
    manifest also has a row with an empty id and one whose clip is missing, as real ones do.
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
    encoder = SentenceEncoder((feature_dim, 512, 512, 1024))
    encoder.eval()
    probe = torch.stack([torch.from_numpy(c.mean(0)) for c in clips[:200]])
    scale = 1.0
    with torch.no_grad():  # grow the shared component until the encoder barely tells clips apart
        while mean_pairwise_cosine(encoder(probe + scale * torch.from_numpy(shared))) < 0.99:
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
            "encoder_cosine": cosine, "vocabulary": len(vocabulary), "sentences": sentences,
            "clips": [clip + scale * shared for clip in clips], "rest_frame": scale * shared, "rng": rng}


DEMO_SETTINGS = dict(epochs=30, batch_size=32, learning_rate=1e-3, warmup_steps=100, eval_every=5)


def demo_defaults(output_dir):
    """--demo's flag defaults: the generated data under <output_dir>/demo_data and faster settings."""
    root = Path(output_dir) / "demo_data"
    return {"sonar_checkpoint": str(root / "checkpoints" / "sonar_encoder_finetuned" / "best_encoder.pt"),
            "t5_model": str(root / "t5-tiny"), **DEMO_SETTINGS,
            **{f"{split}_{kind}": str(root / folder / split) + suffix for split in ("train", "val")
               for kind, folder, suffix in (("features", "features", ""), ("manifest", "manifests", ".tsv"))}}


def prepare_demo(output_dir, world):
    """--demo: generate the data once under <output_dir>/demo_data (torchrun's other processes wait for it)."""
    root = Path(output_dir) / "demo_data"
    ready = root / "READY"
    if not ready.is_file() and world.is_main:
        logger.info(f"Generating the demo dataset in {root} (offline, about a minute)...")
        info = make_demo_data(root)
        logger.info(f"  {info['vocabulary']} words; frozen embeddings' mean pairwise cosine "
                    f"{info['encoder_cosine']:.4f} (like the users' encoder)")
    for _ in range(600):
        if ready.is_file():
            break
        time.sleep(1)


# ----------------------------------------------------------------------------------------------
# 16. Command line


def add_config_flags(group, section):
    """The flags of ModelConfig's fields of one section, with their defaults and help."""
    for f in dataclasses.fields(ModelConfig):
        if f.metadata.get("group") == section:
            kind = f.type.split(" | ")[0]
            options = (dict(action=argparse.BooleanOptionalAction) if kind == "bool" else
                       dict(type={"int": int, "float": float, "str": str}[kind], choices=f.metadata["choices"]))
            group.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"], **options)


def build_parser():
    p = argparse.ArgumentParser(
        description="Train T5 to translate sign-language clips through a frozen SONAR-style encoder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model paths (the guide's flags)")
    g.add_argument("--sonar_checkpoint", default="checkpoints/sonar_encoder_finetuned/best_encoder.pt",
                   type=lambda value: None if value.lower() == "none" else value,
                   help="fine-tuned encoder checkpoint (state dict; encoder_/model_state_dict; 'encoder.' prefix ok), "
                        "or 'none': frames alone, no sentence encoder (a summary learned from the frames takes its place)")
    g.add_argument("--train_features", default="features/train",
                   help="folder of clips: <id>.npy / <id>.pt features, <id>.pose files or How2Sign's keypoint folders")
    g.add_argument("--train_manifest", default="manifests/train.tsv",
                   help="TSV (id, duration, text), How2Sign CSV, JSON or JSONL")
    g.add_argument("--val_features", default="features/val", help="folder of validation clips")
    g.add_argument("--val_manifest", default="manifests/val.tsv", help="validation manifest")
    g.add_argument("--test_features", default=None, help="folder of test clips (with --test_manifest)")
    g.add_argument("--test_manifest", default=None,
                   help="a test split (any manifest format, e.g. How2Sign's how2sign_realigned_test.csv): scored once "
                        "after training with the best model; it never picks a checkpoint or stops training")
    g.add_argument("--output_dir", default=None,
                   help="where checkpoints, predictions, metrics and logs go (default checkpoints/sonar_t5, "
                        "demo_output with --demo)")
    add_config_flags(g, "paths")
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
    g.add_argument("--cache_dir", default=None,
                   help=f"where frame stores live (default ${CACHE_ENV}, else ~/.cache/train_sonar_with_t5: on "
                        "Colab the VM's local disk, not Drive): the clip files are read once into a memory-mapped "
                        "store, which later runs, --resume, --predict and every torchrun process read instead")

    for group, title in (("bridge", "bridge (the guide's troubleshooting knobs)"), ("frames", "frames"),
                         ("decoder", "decoder (--t5_model)")):
        add_config_flags(p.add_argument_group(title), group)

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20, help="training epochs")
    g.add_argument("--batch_size", type=int, default=16, help="clips per step and process")
    g.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=5e-5, help="peak learning rate of T5")
    g.add_argument("--bridge_learning_rate", type=float, default=DEFAULT_BRIDGE_LR,
                   help="peak learning rate of the (randomly initialised) bridge, whatever --learning_rate is")
    g.add_argument("--encoder_lr_scale", type=float, default=0.1,
                   help="encoder learning rate = learning_rate x this (with --no-freeze_encoder)")
    g.add_argument("--warmup_steps", type=int, default=500, help="linear warm-up steps")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--label_smoothing", type=float, default=0.1, help="label smoothing of the training loss")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--max_target_length", type=int, default=128, help="target tokens kept per sentence")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:N or cpu (cuda falls back to CPU with a warning)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 on GPUs that run it natively (compute capability 8.0+: A100, L4, H100), else "
                        "fp32 (a T4 only emulates bf16, slower than fp32); fp16 uses a GradScaler (T5 overflows in it)")
    g.add_argument("--trim_zero_frames", action=argparse.BooleanOptionalAction, default=True,
                   help="drop all-zero frames padded at the end of clip files before the mean")

    g = p.add_argument_group("evaluation and decoding")
    g.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (and after the last)")
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
    g.add_argument("--decoding_grid", default=DECODING_GRID, metavar='"SETTING=V1,V2 ..."',
                   help="after training, the best model's decoding is chosen on the validation clips from every "
                        "combination of these settings (those typed on the command line kept as typed): the highest BLEU "
                        "of those whose predictions loop (repeat a 4-gram) in at most a tenth of the clips; the test "
                        "split and --predict use it. 'none': decode as trained")

    g.add_argument("--patience", type=int, default=0,
                   help="early stopping: stop after this many evaluations without improvement of "
                        "--early_stopping_metric (0: never)")
    g.add_argument("--early_stopping_metric", choices=("bleu", "chrf", "loss"), default="bleu",
                   help="what picks best_model.pt and counts for --patience (a tie is no improvement)")
    g.add_argument("--early_stopping_threshold", type=float, default=0.0,
                   help="an evaluation improves on the best only by more than this (BLEU / chrF points, or loss)")
    g.add_argument("--report_to", nargs="+", choices=("tensorboard", "mlflow", "none"),
                   default=["tensorboard"],
                   help="experiment trackers (Hugging Face Trainer's convention): params once, metrics per "
                        "evaluation, results and predictions as artifacts. mlflow follows MLFLOW_TRACKING_URI "
                        "and MLFLOW_EXPERIMENT_NAME")

    g = p.add_argument_group("reliability")
    g.add_argument("--resume", action="store_true", help="continue from <output_dir>/last.pt")
    g.add_argument("--init_from", default=None, metavar="CHECKPOINT",
                   help="start a new run (epoch 1, new optimizer, schedule and data) from a trained model's weights "
                        "(best_model.pt), e.g. pretrained on a large set, then fine-tuned here; the flags that shape "
                        "the model come from it")
    g.add_argument("--save_every_steps", type=int, default=0, help="also save last.pt every N steps")
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
    g.add_argument("--sweep", default=None, metavar='"SETTING=V1,V2 ..."',
                   help="--predict: decode the clips with every combination of these settings (of "
                        f"{', '.join(SWEEP_SETTINGS)}), each clip encoded once; a table and sweep.json beside the checkpoint")
    g.add_argument("--compare", nargs="+", default=None, metavar="RUN_DIR",
                   help="compare finished runs: scores from their prediction files, BLEU's 95%% confidence interval, the "
                        "paired bootstrap p-value against the first run, and mean ± sd over runs that differ only in --seed")
    g.add_argument("--compare_split", choices=("val", "test"), default="val",
                   help="--compare: best_predictions.tsv (val) or test_predictions.tsv (test)")
    g.add_argument("--compare_any_data", action="store_true",
                   help="--compare runs whose data fingerprints differ (refused otherwise)")
    g.add_argument("--compare_json", default=None, metavar="FILE", help="--compare: also write the records as JSON")
    return p


def explicit_flags(argv):
    """The flags given on the command line (not defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv):
    """(the flags, the names of those typed): --output_dir's default, and under --demo the demo's defaults
    (its generated data, faster settings), are set before parsing, so nothing changes the flags after it."""
    parser = build_parser()
    first = parser.parse_args(argv)
    output_dir = first.output_dir or ("demo_output" if first.demo else "checkpoints/sonar_t5")
    parser.set_defaults(output_dir=output_dir, **(demo_defaults(output_dir) if first.demo else {}))
    return parser.parse_args(argv), explicit_flags(argv)


RULES = {"at least 1": lambda v: v >= 1, "0 or more": lambda v: v >= 0, "positive": lambda v: v > 0,
         "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1]": lambda v: 0 <= v <= 1}
FLAG_RULES = {  # (ModelConfig's flags carry their own rule)
    **dict.fromkeys(("epochs", "batch_size", "grad_accum_steps", "eval_every", "eval_batch_size", "num_beams",
                     "max_new_tokens", "max_target_length", "max_bad_steps", "max_samples"), "at least 1"),
    **dict.fromkeys(("warmup_steps", "save_every_steps", "patience",
                     "no_repeat_ngram_size", "early_stopping_threshold"), "0 or more"),
    **dict.fromkeys(("learning_rate", "encoder_lr_scale", "max_grad_norm", "repetition_penalty",
                     "length_penalty", "bridge_learning_rate", "feature_fps"), "positive"),
    "label_smoothing": "in [0, 1)", "max_skip_share": "in [0, 1]"}


def validate_args(args):
    """Every problem with the flags at once, before any work starts."""
    problems = []
    rules = {**FLAG_RULES, **{f.name: f.metadata["rule"] for f in dataclasses.fields(ModelConfig) if f.metadata.get("rule")}}
    for name, rule in rules.items():
        value = getattr(args, name)
        if value is not None and not RULES[rule](value):
            problems.append(f"--{name} must be {rule} (got {value})")
    if args.frame_kernel < args.frame_stride:
        problems.append(f"--frame_kernel {args.frame_kernel} must be at least --frame_stride {args.frame_stride} "
                        "(frames between windows would be skipped)")
    if args.sonar_checkpoint is None and not args.freeze_encoder:
        problems.append("--no-freeze_encoder with --sonar_checkpoint none: there is no sentence encoder to train")
    if args.lora_rank and not args.check and not args.predict and importlib.util.find_spec("peft") is None:
        problems.append("--lora_rank needs the peft package: pip install peft")
    if not args.check and not args.predict and not args.compare:
        explicit = [name for name in dict.fromkeys(args.report_to) if name in REPORT_BACKENDS]
        problems += [message for message in map(backend_missing, explicit) if message]
    try:
        resolve_device(args.device)
    except UserError as error:
        problems.append(str(error))
    if sum([args.check, args.predict, args.demo, bool(args.compare)]) > 1:
        problems.append("--check, --predict, --demo and --compare are separate modes: use one")
    if args.resume and args.init_from:
        problems.append("--resume and --init_from: --resume continues this --output_dir's run, --init_from starts a "
                        "new one from another model; use one of them")
    if args.sweep and not args.predict:
        problems.append("--sweep goes with --predict (and --manifest): it decodes a trained model's clips")
    for flag in ("sweep", "decoding_grid"):
        try:
            parse_sweep(getattr(args, flag) or "none", f"--{flag}")
        except UserError as error:
            problems.append(str(error))
    folders = []
    if args.predict:
        if not args.features and not args.manifest:
            problems.append("--predict needs --features (a folder of clips) or --manifest")
        folders = [("features", args.features)] if args.features else []
    elif not args.check and not args.demo and not args.compare:
        folders = [("train_features", args.train_features), ("val_features", args.val_features),
                   *([("test_features", args.test_features)] if args.test_features else [])]
        for flag in ("train_manifest", "val_manifest", "sonar_checkpoint", "test_manifest"):
            if getattr(args, flag) is not None and not Path(getattr(args, flag)).is_file():
                problems.append(f"--{flag} file not found: {getattr(args, flag)}")
        if args.test_features and not args.test_manifest:
            problems.append("--test_features needs --test_manifest (the test split's sentences)")
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
    if retired := retired_flag(argv):
        setup_logging(None, World.env_rank() == 0)
        logger.error(f"error: {retired}")
        return 2
    args, given = parse_args(argv)
    log_file = None if (args.check or args.predict or args.compare) else (args.log_file or Path(args.output_dir) / "train.log")
    setup_logging(log_file, World.env_rank() == 0)
    try:
        validate_args(args)
        if args.check:
            return run_check(args)
        if args.predict:
            return run_predict(args, given)
        if args.compare:
            return run_compare(args)
        world = setup_world(args.device)
        if args.demo:
            prepare_demo(args.output_dir, world)
        trainer = Trainer(args, world, given)
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
