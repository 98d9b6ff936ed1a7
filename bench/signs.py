"""Translation quality where sign language is hard: clips with sign language's structure, not words in signs.

    python bench/signs.py                                    # both rows and their gloss-text limits, seeds 1 and 2
    python bench/signs.py --rows random --seeds 1 --extra "--label_smoothing 0.2"   # one screen, same data
    python bench/signs.py --limits none --rows random,pretrained                     # the frames' rows only
    python bench/signs.py --nuisance 0.4 --out bench/results/signs_n0.4              # the walk at the signs' variance
    python bench/signs.py --probe --nuisance 0.4      # how readable the signs are, given their time spans
    python bench/signs.py --rows random --seeds 1 --lowercase   # screen: lowercased targets, truecased output

bench/quality.py makes one sign per English word, in English order, from a few clean frames: a model that reads
words off the frames scores 30-40 BLEU there. Here the clips are made from facts of ASL and of video features:

  sentences  real English prose: Vim's reference manual (/usr/share/vim/vim*/doc/*.txt; not its user manual,
             usr_*.txt, which bench/quality.py uses), 4-30 words: 4,000 train / 300 validation / 300 test.
  glosses    what a signer signs for each sentence: no articles, copulas, auxiliaries or most prepositions;
             inflection invisible (one sign for go / goes / going / went); time words first, wh-words last, a
             quarter of the sentences with their last two signs (the object) fronted as a topic; one sign for
             several English words (a fifth of the signs are shared by two or three words); words seen fewer
             than 3 times in training fingerspelled letter by letter (so every word of the held-out splits is
             signed or spelled).
  frames     each sign a motion through 3 poses over 0.3-0.7 s (a letter: 0.12-0.2 s), in one of two variants;
             neighbouring signs blend into each other (co-articulation); clips begin and end at rest; 12 signers,
             each with their own speed, size, style (a linear distortion) and position; then an extractor:
             30 poses/s smoothed over 8 (a 0.27 s window), 15 rows/s kept, a fixed random network to 512-d, plus
             a slow random walk along 4 directions shared by every clip and a shift per signer (together 5.88
             times the signs' own variance; --nuisance scales both: 0.4 gives 0.94 times) and noise.
  decoders   bench/quality.py's tiny T5 (d_model 128, 2+2 layers, its tokenizer), random (`random`) or pretrained
             there on Python's docstrings (`pretrained`): built under its --out when missing.

Rows run train_sonar_with_t5.py as a user types it, frames alone (`--sonar_checkpoint none`: no sentence encoder
exists for such data), `--epochs 20 --batch_size 32 --learning_rate 1e-3`, the test split given with
--test_manifest (it picks nothing). Each row's limit (`--limits`): the same decoder, schedule and decoding
trained on the gloss text itself instead of the frames (perfect sign recognition). The headline is frames' test
BLEU as a share of that limit. Prints a table, then one JSON line.
"""

import glob
import itertools
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import quality  # noqa: E402
import train_sonar_with_t5 as tsw  # noqa: E402

SPLITS = {"train": 4000, "val": 300, "test": 300}
ROWS = {"random": "t5-random", "pretrained": "t5-pretrained"}
SCHEDULE = ["--epochs", "20", "--batch_size", "32", "--learning_rate", "1e-3"]

# -- glosses: English -> what is signed --------------------------------------------------------------------------
UNSIGNED = {"a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "am", "do", "does", "did", "of", "to",
            "for", "at", "by", "from", "as", "into", "onto", "than", "that", "it's", "there's"}
TIME_WORDS = {"now", "then", "today", "tomorrow", "yesterday", "first", "next", "later", "always", "never",
              "sometimes", "often", "already", "soon", "finally", "currently", "usually"}
WH_WORDS = {"what", "where", "when", "why", "who", "which", "how", "whether"}
IRREGULAR = {"went": "go", "gone": "go", "goes": "go", "has": "have", "had": "have", "having": "have", "made": "make",
             "got": "get", "found": "find", "given": "give", "gave": "give", "taken": "take", "took": "take",
             "written": "write", "wrote": "write", "left": "leave", "kept": "keep", "shown": "show", "known": "know",
             "knew": "know", "saw": "see", "seen": "see", "said": "say", "says": "say", "came": "come", "began": "begin",
             "begun": "begin", "used": "use", "children": "child", "men": "man", "women": "woman", "ran": "run", "sent": "send",
             "built": "build", "held": "hold", "meant": "mean", "chose": "choose", "chosen": "choose", "lost": "lose",
             "better": "good", "best": "good", "worse": "bad", "worst": "bad", "won't": "will", "can't": "can",
             "cannot": "can", "its": "it", "their": "they", "them": "they", "his": "he", "him": "he", "her": "she",
             "your": "you", "my": "i", "me": "i", "our": "we", "us": "we"}
VOWELS = set("aeiou")


def lemma(word):
    """One sign for every form of a word: irregular forms by table, regular ones by their endings."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    for ending, keep in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if not word.endswith(ending) or len(word) - len(ending) < 3:
            continue
        stem = word[: -len(ending)] + keep
        if ending == "s" and word.endswith(("ss", "us", "is")):
            return word
        if ending == "es" and not word.endswith(("ses", "xes", "ches", "shes", "zzes")):
            stem = word[:-1]
        if ending in ("ing", "ed") and len(stem) > 2 and stem[-1] == stem[-2] and stem[-1] not in "ls":
            stem = stem[:-1]                                   # running -> run, stopped -> stop
        elif ending in ("ing", "ed") and stem[-1] not in VOWELS and stem[-2] in VOWELS and stem[-3] not in VOWELS \
                and not stem.endswith(("w", "x", "y")):
            stem += "e"                                        # making -> make, used -> use
        return stem
    return word


def signed_words(sentence):
    """The words a signer signs, in English order: lemmas, negation kept as NOT, function words dropped."""
    words = []
    for word in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", sentence.lower()):
        negated = word.endswith("n't")
        if negated:
            word = {"ca": "can", "wo": "will"}.get(word[:-3], word[:-3])
        elif "'" in word:
            word = word.split("'")[0]
        if word not in UNSIGNED:
            words.append(lemma(word))
        if negated:
            words.append("not")
    return words


def asl_order(words, rng):
    """Time words first, wh-words last, and in a quarter of sentences the object (last two signs) as a topic."""
    time_words = [w for w in words if w in TIME_WORDS]
    wh = [w for w in words if w in WH_WORDS]
    rest = [w for w in words if w not in TIME_WORDS and w not in WH_WORDS]
    if len(rest) >= 4 and rng.random() < 0.25:
        rest = rest[-2:] + rest[:-2]
    return time_words + rest + wh


class SignLexicon:
    """Signs for the training text's words: frequent lemmas get a sign (a fifth of the signs shared by two or
    three lemmas: ambiguity), the rest are fingerspelled, letter by letter."""

    def __init__(self, train_words, rng, min_count=3):
        counts = Counter(w for words in train_words for w in words)
        lemmas = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        self.sign_of, names = {}, []
        order = list(rng.permutation(len(lemmas)))
        while order:
            group = [lemmas[order.pop()] for _ in range(min(len(order), 1 if rng.random() < 0.8 else rng.integers(2, 4)))]
            name = min(group, key=lambda w: (-counts[w], w))     # the gloss of a shared sign: its commonest word
            for word in group:
                self.sign_of[word] = name
            names.append(name)
        self.letters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789"))
        self.signs = sorted(names)

    def gloss(self, words):
        """Sign names: a word's sign, else its letters ('f-i-l-e' as f, i, l, e, each marked as spelled)."""
        out = []
        for word in words:
            if word in self.sign_of:
                out.append(self.sign_of[word])
            else:
                out += [f"#{letter}" for letter in word if letter in self.letters]
        return out


def gloss_text(signs):
    """The gloss as text for the limit: signs as their words, a spelled word as its letters joined by hyphens."""
    parts, spelled = [], []
    for sign in signs + [""]:
        if sign.startswith("#"):
            spelled.append(sign[1:])
            continue
        if spelled:
            parts.append("-".join(spelled))
            spelled = []
        if sign:
            parts.append(sign)
    return " ".join(parts)


# -- frames: signs -> motion -> extractor features ------------------------------------------------------------------
POSE_DIM, FEATURE_DIM, POSE_RATE, FEATURE_STEP, SMOOTH = 32, 512, 30, 2, 8
SIGNERS = 12


class Signing:
    """Every sign's two variants (3 poses each; letters 2), 12 signers, the extractor's fixed weights."""

    def __init__(self, lexicon, rng, nuisance=1.0):
        self.rng, self.nuisance_scale = rng, nuisance
        self.variants = {name: [rng.normal(size=(3, POSE_DIM)) for _ in range(2)] for name in lexicon.signs}
        self.variants.update({f"#{c}": [rng.normal(size=(2, POSE_DIM)) * 0.8] for c in lexicon.letters})
        self.rest = rng.normal(size=POSE_DIM) * 0.5
        self.signers = [dict(speed=rng.uniform(0.8, 1.25), size=rng.uniform(0.8, 1.2),
                             style=np.eye(POSE_DIM) + 0.3 * rng.normal(size=(POSE_DIM, POSE_DIM)) / np.sqrt(POSE_DIM),
                             position=0.5 * rng.normal(size=POSE_DIM), shift=0.5 * rng.normal(size=FEATURE_DIM))
                        for _ in range(SIGNERS)]
        self.w1 = rng.normal(size=(POSE_DIM, 256)) / np.sqrt(POSE_DIM)
        self.w2 = rng.normal(size=(256, FEATURE_DIM)) / np.sqrt(256)
        self.nuisance = rng.normal(size=(4, FEATURE_DIM))             # directions every clip moves along
        self.constant = rng.normal(size=FEATURE_DIM) * 3.0

    def poses(self, signs, signer):
        """(T, POSE_DIM) poses at POSE_RATE: rest, each sign's poses with co-articulated transitions, rest. Each
        sign's (start, end) in seconds is kept in self.spans (for --probe)."""
        rng, s = self.rng, self.signers[signer]
        times, anchors, self.spans = [0.0], [self.rest], []
        t = rng.uniform(0.3, 0.6)
        for sign in signs:
            variants = self.variants[sign]
            poses = variants[0 if len(variants) == 1 or rng.random() < 0.7 else 1]
            duration = (rng.uniform(0.12, 0.2) if sign.startswith("#") else rng.uniform(0.3, 0.7)) * s["speed"]
            t += rng.uniform(0.03, 0.12) * s["speed"]                # the transition from the last pose
            for k, pose in enumerate(poses):
                times.append(t + duration * k / (len(poses) - 1))
                anchors.append(pose + 0.15 * rng.normal(size=POSE_DIM))
            self.spans.append((t, t + duration))
            t += duration
        t += rng.uniform(0.1, 0.2)
        times += [t, t + rng.uniform(0.3, 0.6)]
        anchors += [self.rest, self.rest]
        grid = np.arange(0, times[-1], 1 / POSE_RATE)
        anchors = np.stack(anchors)
        path = np.stack([np.interp(grid, times, anchors[:, d]) for d in range(POSE_DIM)], axis=1)
        return s["size"] * path @ s["style"].T + s["position"]

    def features(self, signs, signer):
        """(rows, 512) float32: the poses smoothed over SMOOTH frames, every FEATURE_STEP-th kept, through the
        extractor, plus the shared nuisance, the signer's shift and noise."""
        rng, poses = self.rng, self.poses(signs, signer)
        kernel = np.ones(SMOOTH) / SMOOTH
        smooth = np.stack([np.convolve(np.pad(poses[:, d], (SMOOTH // 2, SMOOTH - 1 - SMOOTH // 2), mode="edge"),
                                       kernel, mode="valid") for d in range(POSE_DIM)], axis=1)[::FEATURE_STEP]
        rows = len(smooth)
        drift = np.cumsum(rng.normal(size=(rows, 4)) * 0.05, axis=0) + 0.5 * rng.normal(size=4)   # a slow random walk
        nuisance = (drift @ self.nuisance + self.signers[signer]["shift"]) * self.nuisance_scale
        signal = np.tanh(smooth @ self.w1) @ self.w2
        self.parts = (signal, nuisance)                               # (for --probe: their variances)
        features = signal + nuisance + self.constant
        features += 0.1 * rng.normal(size=features.shape)
        return features.astype(np.float32)


def reference_sentences():
    files = [p for p in sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt")) if not os.path.basename(p).startswith("usr_")]
    if not files:
        raise SystemExit("Vim's documentation is not installed (/usr/share/vim/vim*/doc): apt-get install vim-runtime")
    sentences = []
    for path in files:
        sentences += quality.prose_sentences(Path(path).read_text(encoding="utf-8", errors="replace"))
    return list(dict.fromkeys(sentences))


def generator(nuisance):
    """What prepare and probe draw from, in one order (so both make the same clips): the random generator, the
    sentences found, each split's sentences and their signed words, the lexicon, the signing."""
    rng = np.random.default_rng(0)
    sentences = reference_sentences()
    chosen = [sentences[i] for i in rng.permutation(len(sentences))[: sum(SPLITS.values())]]
    bounds = np.cumsum([0, *SPLITS.values()])
    split_sentences = {name: chosen[a:b] for name, a, b in zip(SPLITS, bounds, bounds[1:])}
    ordered = {name: [asl_order(signed_words(s), rng) for s in texts] for name, texts in split_sentences.items()}
    lexicon = SignLexicon(ordered["train"], rng)
    return rng, sentences, split_sentences, ordered, lexicon, Signing(lexicon, rng, nuisance)


def probe(nuisance, epochs=15):
    """How readable the signs are when their time spans are known: a linear classifier of each sign from three
    rows of its span (start, middle, end), trained on the training clips' signs, its accuracy on the held-out
    clips' signs. The clips are bench's own (the same generator and seed as prepare)."""
    rng, sentences, split_sentences, ordered, lexicon, signing = generator(nuisance)
    ordered = [words for split in SPLITS for words in ordered[split]]
    names = {name: i for i, name in enumerate(lexicon.signs + [f"#{c}" for c in lexicon.letters])}
    inputs, labels, train, parts = [], [], [], []
    for i, words in enumerate(ordered):
        signs = lexicon.gloss(words)
        features = signing.features(signs, int(rng.integers(SIGNERS)))
        parts.append(signing.parts)
        for sign, (start, end) in zip(signs, signing.spans):
            rows = features[int(start * POSE_RATE / FEATURE_STEP): int(np.ceil(end * POSE_RATE / FEATURE_STEP)) + 1]
            inputs.append(np.concatenate([rows[0], rows[len(rows) // 2], rows[-1]]))
            labels.append(names[sign])
            train.append(i < SPLITS["train"])
    x, y, train = torch.tensor(np.stack(inputs)), torch.tensor(labels), torch.tensor(train)
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    torch.manual_seed(0)
    classifier = torch.nn.Linear(x.shape[1], len(names))
    optimizer = torch.optim.Adam(classifier.parameters(), 1e-3, weight_decay=1e-4)
    seen = train.nonzero()[:, 0]
    for _ in range(epochs):
        for batch in seen[torch.randperm(len(seen))].split(256):
            loss = torch.nn.functional.cross_entropy(classifier(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    held_out = (~train).nonzero()[:, 0]
    with torch.no_grad():
        right = (classifier(x[held_out]).argmax(1) == y[held_out]).float()
    name_of = list(names)
    letter = torch.tensor([name_of[label].startswith("#") for label in y[held_out].tolist()])
    variance = [float(np.concatenate([p[k] for p in parts]).var(axis=0).sum()) for k in (0, 1)]
    return {"nuisance": nuisance, "nuisance_variance_over_signs": round(variance[1] / variance[0], 2), "held_out_signs": len(held_out), "accuracy": round(right.mean().item(), 3),
            "accuracy_signs": round(right[~letter].mean().item(), 3), "accuracy_letters": round(right[letter].mean().item(), 3)}


def prepare(root, nuisance=1.0):
    """The clips, manifests (TSV id / duration / text) and gloss texts of every split, once. `nuisance` scales
    the extractor's shared walk and the signers' shifts (the glosses do not change with it)."""
    if (root / "READY").is_file():
        stats = json.loads((root / "READY").read_text())
        if stats.get("nuisance", 1.0) != nuisance:
            raise SystemExit(f"{root} holds clips made with --nuisance {stats.get('nuisance', 1.0):g}: give another --out")
        return stats
    rng, sentences, split_sentences, ordered, lexicon, signing = generator(nuisance)
    stats = {"nuisance": nuisance, "sentences_found": len(sentences), "signs": len(lexicon.signs), "words_signed": len(lexicon.sign_of)}
    for split, texts in split_sentences.items():
        folder = root / "features" / split
        folder.mkdir(parents=True, exist_ok=True)
        manifest, glosses, rows, spelled, signed = ["id\tduration\ttext"], ["id\tgloss\ttext"], [], 0, 0
        for i, (text, words) in enumerate(zip(texts, ordered[split])):
            signs = lexicon.gloss(words)
            spelled += sum(sign.startswith("#") for sign in signs)
            signed += len(signs)
            features = signing.features(signs, int(rng.integers(SIGNERS)))
            clip = f"signs_{split}_{i:05d}"
            np.save(folder / f"{clip}.npy", features)
            manifest.append(f"{clip}\t{len(features) * FEATURE_STEP / POSE_RATE:.2f}\t{text}")
            glosses.append(f"{clip}\t{gloss_text(signs)}\t{text}")
            rows.append(len(features))
        (root / "manifests").mkdir(exist_ok=True)
        (root / "manifests" / f"{split}.tsv").write_text("\n".join(manifest) + "\n")
        (root / "manifests" / f"{split}_gloss.tsv").write_text("\n".join(glosses) + "\n")
        stats[split] = {"clips": len(texts), "rows_median": int(np.median(rows)), "rows_max": int(max(rows)),
                        "signs_per_clip": round(signed / len(texts), 1), "spelled_letter_share": round(spelled / signed, 3)}
    (root / "READY").write_text(json.dumps(stats))
    return stats


# -- runs -------------------------------------------------------------------------------------------------------------

def decoders(quality_root):
    """bench/quality.py's decoders, built there when missing."""
    if not (quality_root / "READY").is_file():
        quality.prepare(quality_root)
    return {row: quality_root / folder for row, folder in ROWS.items()}


def run_frames(root, decoder, out, seed, extra, lowercase=False):
    m, f = (lowercased_manifests(root) if lowercase else root / "manifests"), root / "features"
    argv = ["--sonar_checkpoint", "none", "--train_features", str(f / "train"), "--train_manifest", str(m / "train.tsv"),
            "--val_features", str(f / "val"), "--val_manifest", str(m / "val.tsv"), "--test_features", str(f / "test"),
            "--test_manifest", str(m / "test.tsv"), "--t5_model", str(decoder), "--output_dir", str(out),
            "--device", "cpu", "--report_to", "none", "--seed", str(seed), *SCHEDULE, *extra]
    started = time.time()
    if tsw.main(argv) != 0:
        raise SystemExit(f"{out} failed")
    return json.loads((out / "results.json").read_text()), time.time() - started


# -- a screen the tool has no flag for: lowercased targets, truecased output (Tarres et al., SSVP-SLT) -------------

def lowercased_manifests(root):
    """The manifests with every sentence lowercased (the model trains on and is picked by these)."""
    folder = root / "manifests_lowercase"
    folder.mkdir(exist_ok=True)
    for split in SPLITS:
        lines = (root / "manifests" / f"{split}.tsv").read_text().splitlines()
        rows = [line.rsplit("\t", 1) for line in lines[1:]]
        (folder / f"{split}.tsv").write_text("\n".join([lines[0]] + [f"{head}\t{text.lower()}" for head, text in rows]) + "\n")
    return folder


def truecaser(root):
    """A word's commonest casing in the training sentences (a sentence's first word not counted), and the first
    letter of a sentence capitalised: lowercased predictions -> cased ones."""
    counts = {}
    for line in (root / "manifests" / "train.tsv").read_text().splitlines()[1:]:
        for word in line.rsplit("\t", 1)[1].split()[1:]:
            counts.setdefault(word.lower(), Counter())[word] += 1

    def case(sentence):
        words = [counts[w].most_common(1)[0][0] if w in counts else w for w in sentence.split()]
        text = " ".join(words)
        return text[:1].upper() + text[1:]
    return case


def truecased_scores(root, out):
    """The validation (best_predictions.tsv) and test predictions truecased and scored against the original (cased)
    references: {"val_bleu", "test_bleu", ...}."""
    case = truecaser(root)
    scores = {}
    for split, name in (("val", "best_predictions.tsv"), ("test", "test_predictions.tsv")):
        cased = {row[0]: row[1].rsplit("\t", 1)[1] for row in (line.split("\t", 1) for line in
                 (root / "manifests" / f"{split}.tsv").read_text().splitlines()[1:])}
        rows = [line.split("\t") for line in (out / name).read_text().splitlines()[1:]]
        result = tsw.corpus_scores([case(row[2]) for row in rows], [cased[row[0]] for row in rows])
        scores.update({f"{split}_{key}": result[key] for key in ("bleu", "chrf", "repeat_4gram_share", "length_ratio")})
    return scores


def read_gloss_split(root, split):
    rows = [line.split("\t") for line in (root / "manifests" / f"{split}_gloss.tsv").read_text().splitlines()[1:]]
    return [gloss for _, gloss, _ in rows], [text for _, _, text in rows]


def gloss_limit(root, decoder, out, seed):
    """The limit of a row: the same decoder trained on the clips' gloss text (perfect sign recognition) with the
    tool's schedule, loss (label smoothing) and decoding: validation BLEU picks the epoch and, from the tool's
    grid, the decoding; the test split is scored once with both."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, get_linear_schedule_with_warmup

    if (out / "limit.json").is_file():
        return json.loads((out / "limit.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    flags = tsw.build_parser().parse_args(SCHEDULE)            # the tool's defaults for everything else
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(decoder)
    model = AutoModelForSeq2SeqLM.from_pretrained(decoder)
    data = {split: read_gloss_split(root, split) for split in SPLITS}

    def encode(texts, length=flags.max_target_length):
        return tokenizer(texts, max_length=length, truncation=True, padding=True, return_tensors="pt")

    def decode(split, decoding):
        model.eval()
        glosses, texts = data[split]
        predictions = []
        with torch.no_grad():
            for i in range(0, len(glosses), flags.eval_batch_size):
                batch = encode(glosses[i: i + flags.eval_batch_size])
                ids = model.generate(**batch, **tsw.generation_kwargs(decoding))
                predictions += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return tsw.corpus_scores(predictions, texts)

    optimizer = torch.optim.AdamW(model.parameters(), lr=flags.learning_rate, weight_decay=flags.weight_decay)
    steps = -(-len(data["train"][0]) // flags.batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, flags.warmup_steps, steps * flags.epochs)
    generator = torch.Generator().manual_seed(seed)
    decoding = {name: getattr(flags, name) for name in tsw.DECODING_DEFAULTS}
    best, best_state = None, None
    for epoch in range(flags.epochs):
        model.train()
        for batch_indices in torch.randperm(len(data["train"][0]), generator=generator).split(flags.batch_size):
            inputs = encode([data["train"][0][i] for i in batch_indices])
            labels = encode([data["train"][1][i] for i in batch_indices])["input_ids"]
            labels = labels.masked_fill(labels == tokenizer.pad_token_id, -100)
            logits = model(**inputs, labels=labels).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                     label_smoothing=flags.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), flags.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        bleu = decode("val", decoding)["bleu"]
        print(f"limit {out.name}: epoch {epoch + 1} val BLEU {bleu:.2f}", flush=True)
        if best is None or bleu > best[1]:
            best, best_state = (epoch + 1, bleu), {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    grid = tsw.parse_sweep(tsw.DECODING_GRID)
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    tuned = max(settings, key=lambda setting: decode("val", {**decoding, **setting})["bleu"])
    val, test = decode("val", {**decoding, **tuned}), decode("test", {**decoding, **tuned})
    result = {"best_epoch": best[0], "val_bleu_untuned": best[1], "decoding": tuned, "val_bleu": val["bleu"],
              "test_bleu": test["bleu"], "test_repeat_4gram_share": test["repeat_4gram_share"],
              "test_length_ratio": test["length_ratio"]}
    (out / "limit.json").write_text(json.dumps(result, indent=1))
    return result


def main():
    parser = quality.bench_parser(__doc__, ROWS, "bench/results/signs")
    parser.add_argument("--limits", choices=("yes", "none", "only"), default="yes",
                        help="also train each row's gloss-text limit (none: frames only; only: limits only)")
    parser.add_argument("--nuisance", type=float, default=1.0,
                        help="scale of the extractor's shared walk and the signers' shifts (1: six times the signs' variance)")
    parser.add_argument("--probe", action="store_true",
                        help="instead: how readable the signs are given their time spans (a linear classifier's accuracy)")
    parser.add_argument("--lowercase", action="store_true",
                        help="screen: train on lowercased sentences, truecase the validation and test predictions, score them cased")
    parser.add_argument("--quality_out", default="bench/results/quality", help="bench/quality.py's --out (decoders)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        return print(json.dumps(probe(args.nuisance)))
    root = Path(args.out)
    print(f"data: {json.dumps(prepare(root, args.nuisance))}", flush=True)
    folders = decoders(Path(args.quality_out))
    extra = shlex.split(args.extra)
    tag = args.tag or (re.sub(r"[^\w.=-]+", "_", args.extra).strip("_") or "defaults") + ("_lowercase" if args.lowercase else "")
    records = []
    for row in args.rows.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            record = {"row": row, "seed": seed, "extra": args.extra}
            if args.limits != "only":
                out = root / "runs" / tag / f"{row}-seed{seed}"
                results, seconds = run_frames(root, folders[row], out, seed, extra, args.lowercase)
                if args.lowercase:
                    results = {**results, **truecased_scores(root, out), "test_bleu_lowercased": results["test_bleu"]}
                record.update({key: results.get(key) for key in (
                    "test_bleu", "test_chrf", "test_repeat_4gram_share", "test_length_ratio", "val_bleu",
                    "val_repeat_4gram_share", "best_epoch")}, decoding=results.get("decoding"), seconds=round(seconds))
            if args.limits != "none":
                limit = gloss_limit(root, folders[row], root / "runs" / "limits" / f"{row}-seed{seed}", seed)
                record.update({f"limit_{key}": value for key, value in limit.items()})
            records.append(record)
            print(json.dumps(record), flush=True)
    print()
    print(summarise(records))
    print(json.dumps({"tag": tag, "extra": args.extra, "records": records}))


def summarise(records):
    def mean(key, rs):
        values = [r[key] for r in rs if r.get(key) is not None]
        return statistics.mean(values) if values else float("nan")

    lines = ["| row | seeds | test BLEU (each seed) | repeat a 4-gram | length ratio | gloss-text limit, test BLEU | share "
             "of the limit |", "|---|---|---|---|---|---|---|"]
    for row in dict.fromkeys(r["row"] for r in records):
        rs = [r for r in records if r["row"] == row]
        bleus = ", ".join(f"{r['test_bleu']:.2f}" for r in rs if r.get("test_bleu") is not None)
        limits = ", ".join(f"{r['limit_test_bleu']:.2f}" for r in rs if r.get("limit_test_bleu") is not None)
        lines.append(f"| {row} | {len(rs)} | {mean('test_bleu', rs):.2f} ({bleus}) | {mean('test_repeat_4gram_share', rs):.0%} "
                     f"| {mean('test_length_ratio', rs):.2f} | {mean('limit_test_bleu', rs):.2f} ({limits}) | "
                     f"{mean('test_bleu', rs) / mean('limit_test_bleu', rs):.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
