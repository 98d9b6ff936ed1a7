"""Translation quality on realistic data: real English, frozen embeddings at cosine 0.99, two decoders.

    python bench/quality.py                                # every row, 2 seeds (about 2 hours on 2 CPU cores)
    python bench/quality.py --rows pretrained_cell6 --seeds 1,2,3
    python bench/quality.py --rows random_lr1e-3 --extra "--label_smoothing 0.2"   # a candidate, same data

Data (built once under --out, then reused):
  sentences  the Vim user manual (/usr/share/vim/vim*/doc/usr_*.txt, Debian's vim-runtime): instructional
             prose written by others, 4-30 words, letters and plain punctuation only; 2,100 train / 250 val.
  features   the demo's recipe (`make_demo_data`): each word a random 256-d "sign" shown over 2-4 noisy
             frames, plus a large component shared by every frame, scaled until the frozen encoder's
             embeddings of different clips have mean pairwise cosine >= 0.99, as the users' encoder does.
  decoders   a tiny T5 (d_model 128, 2+2 layers) and its tokenizer, trained only on OTHER English text:
             the docstrings of Python's standard library (this interpreter's). `t5-random` is it freshly
             initialised; `t5-pretrained` is the same model pretrained here as a denoising autoencoder on
             that text (spans masked, words dropped; the decoder rewrites the whole sentence), cached.

Rows (flags as a user types them; the defaults of train_sonar_with_t5.py do the rest):
  random_lr1e-3      random T5, 30 epochs, batch 32, LR 1e-3, warm-up 100 (the issue's held-out setting)
  pretrained_cell5   pretrained T5 at the guide's Cell 5 flags (2 epochs, batch 16, LR 5e-5, warm-up 100)
  pretrained_cell6   pretrained T5 at the guide's Cell 6 flags (20 epochs, batch 16, LR 5e-5, warm-up 500)
  pretrained_lr1e-3  pretrained T5 at the random row's flags
  bart_lr1e-3, nllb_lr1e-3, mt5_lr1e-3
                     random_lr1e-3 with a random tiny decoder of another family (BART; M2M100 with language
                     codes, NLLB-200's architecture, --target_lang eng_Latn; mT5-shaped), same size and tokenizer
  lora_lr1e-3        pretrained T5 at the random row's flags with LoRA adapters of rank 8 on its attention, the
                     base frozen (--lora_rank 8, needs peft)
The embedding-only rows (--no-frame_attention) and the frozen row (--freeze_t5) ran here until 2026-12-07, when
those flags were retired; their numbers stay in docs/benchmarks/quality.md.
Each row runs once per seed (--seed: bridge initialisation, batch order, dropout); the table gives the
mean and the spread (min-max) of BLEU (sacreBLEU, 13a), chrF and the share of distinct predictions on
the 250 validation sentences, decoded once after the last epoch. Prints the table, then one JSON line.
"""

import argparse
import ast
import glob
import json
import os
import re
import shlex
import statistics
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train_sonar_with_t5 as tsw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402

NUM_TRAIN, NUM_VAL = 2100, 250
HIGH_LR = ["--epochs", "30", "--batch_size", "32", "--learning_rate", "1e-3", "--warmup_steps", "100"]
CELL5 = ["--epochs", "2", "--batch_size", "16", "--learning_rate", "5e-5", "--warmup_steps", "100"]
CELL6 = ["--epochs", "20", "--batch_size", "16", "--learning_rate", "5e-5", "--warmup_steps", "500"]
ROWS = {
    "random_lr1e-3": ("t5-random", HIGH_LR),
    "pretrained_cell5": ("t5-pretrained", CELL5),
    "pretrained_cell6": ("t5-pretrained", CELL6),
    "pretrained_lr1e-3": ("t5-pretrained", HIGH_LR),
    # other decoder families (random, same size as t5-random, same tokenizer + language codes) and the
    # pretrained T5 adapted with LoRA
    "bart_lr1e-3": ("bart-random", HIGH_LR),
    "nllb_lr1e-3": ("nllb-random", HIGH_LR + ["--target_lang", "eng_Latn"]),
    "mt5_lr1e-3": ("mt5-random", HIGH_LR),
    "lora_lr1e-3": ("t5-pretrained", HIGH_LR + ["--lora_rank", "8"]),
}
FAMILY_DECODERS = {"bart-random": "bart", "nllb-random": "nllb", "mt5-random": "mt5"}
SENTENCE = re.compile(r"^[A-Z][A-Za-z0-9 ,.;'?!\-]*[.?!]$")
PRETRAIN = dict(vocab_size=4000, d_model=128, layers=2, heads=4, steps=4000, batch_size=32, learning_rate=1e-3,
                warmup=200, mask_share=0.3, seed=0)


# ----------------------------------------------------------------------------------------------
# Text


def prose_sentences(text):
    """Sentences of plain prose paragraphs (indented code and tables skipped), 4-30 words."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        if not paragraph.strip() or paragraph.startswith(("\t", "    ")):
            continue
        joined = re.sub(r"\s+", " ", paragraph).strip()
        for sentence in re.split(r"(?<=[.?!])\s+(?=[A-Z])", joined):
            # one-letter words other than "a" and "I" are key names or variables: not prose
            if (4 <= len(sentence.split()) <= 30 and SENTENCE.match(sentence)
                    and not re.search(r"\b(?![aAI]\b)[A-Za-z]\b", sentence)):
                sentences.append(sentence)
    return sentences


def vim_manual_sentences():
    files = sorted(glob.glob("/usr/share/vim/vim*/doc/usr_*.txt"))
    if not files:
        raise SystemExit("The Vim user manual is not installed (/usr/share/vim/vim*/doc/usr_*.txt): "
                         "apt-get install vim-runtime")
    sentences = []
    for path in files:
        sentences += prose_sentences(Path(path).read_text(encoding="utf-8", errors="replace"))
    return list(dict.fromkeys(sentences))


def python_docstring_sentences():
    """Sentences from the docstrings of this interpreter's standard library (tests excluded)."""
    sentences = []
    for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True)):
        if "/test" in path or "site-packages" in path:
            continue
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    sentences += prose_sentences(docstring)
    return list(dict.fromkeys(sentences))


# ----------------------------------------------------------------------------------------------
# Data and decoders


def prepare(root):
    """Features, manifests and encoder (the demo's recipe) for the Vim sentences; both decoders."""
    if (root / "READY").is_file():
        return json.loads((root / "READY").read_text())
    sentences = vim_manual_sentences()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(sentences))
    if len(order) < NUM_TRAIN + NUM_VAL:
        raise SystemExit(f"only {len(order)} sentences found; need {NUM_TRAIN + NUM_VAL}")
    chosen = [sentences[i] for i in order[: NUM_TRAIN + NUM_VAL]]
    info = tsw.make_demo_data(root / "data", num_train=NUM_TRAIN, num_val=NUM_VAL, sentences=chosen,
                              t5_folder=None, messy=False)
    corpus = python_docstring_sentences()
    overlap = len(set(corpus) & set(chosen))
    tokenizer = tsw.build_tokenizer(corpus, vocab_size=PRETRAIN["vocab_size"])
    tsw.build_tiny_t5(tokenizer, root / "t5-random", d_model=PRETRAIN["d_model"], layers=PRETRAIN["layers"],
                      heads=PRETRAIN["heads"], seed=PRETRAIN["seed"])
    seconds = pretrain(root / "t5-random", root / "t5-pretrained", corpus)
    words = {w for s in chosen for w in re.findall(r"[\w']+", s.lower())}
    summary = {"sentences_found": len(sentences), "train": NUM_TRAIN, "val": NUM_VAL, "vocabulary": len(words),
               "encoder_cosine": info["encoder_cosine"], "pretraining_sentences": len(corpus),
               "pretraining_overlap": overlap, "pretraining_seconds": round(seconds), **PRETRAIN}
    (root / "READY").write_text(json.dumps(summary))
    return summary


def corrupt(ids, rng, mask_id, share):
    """Denoising input: ~share of the tokens masked in spans (one <unk> per span) or dropped."""
    body, eos, out, i = list(ids[:-1]), ids[-1], [], 0
    while i < len(body):
        if rng.random() < share / 3:               # a span of 1-5 tokens starts here (mean 3)
            span = int(rng.integers(1, 6))
            if rng.random() < 0.8:
                out.append(mask_id)
            i += span
        else:
            out.append(body[i])
            i += 1
    return out + [eos]


def pretrain(random_folder, folder, corpus):
    """The random tiny T5, trained as a denoising autoencoder on `corpus`; saved in `folder`."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration, get_linear_schedule_with_warmup

    torch.manual_seed(PRETRAIN["seed"])
    rng = np.random.default_rng(PRETRAIN["seed"])
    tokenizer = AutoTokenizer.from_pretrained(random_folder)
    model = T5ForConditionalGeneration.from_pretrained(random_folder).train()
    encoded = tokenizer(corpus, max_length=64, truncation=True)["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["learning_rate"], weight_decay=0.01, fused=True)
    schedule = get_linear_schedule_with_warmup(optimizer, PRETRAIN["warmup"], PRETRAIN["steps"])
    started = time.time()
    for step in range(PRETRAIN["steps"]):
        chosen = rng.integers(len(encoded), size=PRETRAIN["batch_size"])
        inputs = [corrupt(encoded[i], rng, tokenizer.unk_token_id, PRETRAIN["mask_share"]) for i in chosen]
        targets = [encoded[i] for i in chosen]
        input_ids = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
        labels = torch.full((len(targets), max(map(len, targets))), -100, dtype=torch.long)
        for row, (source, target) in enumerate(zip(inputs, targets)):
            input_ids[row, : len(source)] = torch.tensor(source)
            labels[row, : len(target)] = torch.tensor(target)
        loss = model(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == PRETRAIN["steps"] - 1:
            print(f"pretraining step {step}: loss {float(loss.detach()):.3f} ({time.time() - started:.0f} s)", flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return time.time() - started


# ----------------------------------------------------------------------------------------------
# Runs


def family_decoder(root, name):
    """A random tiny decoder of another family, built once beside t5-random with its tokenizer."""
    folder = root / name
    if name in FAMILY_DECODERS and not (folder / "config.json").is_file():
        from transformers import AutoTokenizer
        tiny.build_tiny_seq2seq(AutoTokenizer.from_pretrained(root / "t5-random"), folder, FAMILY_DECODERS[name],
                                d_model=PRETRAIN["d_model"], layers=PRETRAIN["layers"], heads=PRETRAIN["heads"],
                                seed=PRETRAIN["seed"])
    return folder


def run(root, out, row, seed, extra):
    decoder, flags = ROWS[row]
    decoder = family_decoder(root, decoder)
    data = root / "data"
    run_dir = out / f"{row}-seed{seed}"
    argv = ["--sonar_checkpoint", str(data / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
            "--train_features", str(data / "features/train"), "--train_manifest", str(data / "manifests/train.tsv"),
            "--val_features", str(data / "features/val"), "--val_manifest", str(data / "manifests/val.tsv"),
            "--t5_model", str(decoder), "--output_dir", str(run_dir), "--device", "cpu",
            "--seed", str(seed), *flags, *extra]
    epochs = argv[argv.index("--epochs") + 1]
    argv += ["--eval_every", epochs]
    started = time.time()
    code = tsw.main(argv)
    if code != 0:
        raise SystemExit(f"{row} seed {seed} failed with exit code {code}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"row": row, "seed": seed, "bleu": results["val_bleu"], "chrf": results["val_chrf"],
            "distinct": results["distinct_share"], "seconds": round(time.time() - started),
            "flags": " ".join(flags + extra)}


def summarise(runs):
    table = {}
    for r in runs:
        table.setdefault(r["row"], []).append(r)
    lines = ["| row | flags | seeds | BLEU mean (min-max) | chrF mean | distinct mean (min) | s/run |",
             "|---|---|---|---|---|---|---|"]
    for row, rs in table.items():
        bleu = [r["bleu"] for r in rs]
        lines.append(f"| {row} | `{rs[0]['flags']}` | {len(rs)} | {statistics.mean(bleu):.2f} "
                     f"({min(bleu):.2f}-{max(bleu):.2f}) | {statistics.mean(r['chrf'] for r in rs):.1f} | "
                     f"{statistics.mean(r['distinct'] for r in rs):.1%} ({min(r['distinct'] for r in rs):.1%}) | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def bench_parser(doc, rows, out):
    """The flags of the quality benches (this one and bench/signs.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rows", default=",".join(rows), help=f"comma-separated, from {list(rows)}")
    parser.add_argument("--seeds", default="1,2", help="training seeds, comma-separated")
    parser.add_argument("--extra", default="", help='flags added to every run (a candidate to compare; one flag alone '
                                                    'is written --extra="--flag")')
    parser.add_argument("--out", default=out, help="data, decoders and runs go here")
    parser.add_argument("--tag", default="", help="subfolder for this set of runs (default: from --extra)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser


def run_rows(args, data, run_one, summarise_runs):
    """Every row of --rows with every seed of --seeds: run_one(runs_folder, row, seed, extra flags) -> a record,
    printed as it comes; then summarise_runs' table and one JSON line."""
    extra = shlex.split(args.extra)
    tag = args.tag or (re.sub(r"[^\w.=-]+", "_", args.extra).strip("_") or "defaults")
    runs = []
    for row in args.rows.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            runs.append(run_one(Path(args.out) / "runs" / tag, row, seed, extra))
            print(json.dumps(runs[-1]), flush=True)
    print()
    print(summarise_runs(runs))
    print(json.dumps({"tag": tag, "extra": args.extra, "data": data, "runs": runs}))


def main():
    args = bench_parser(__doc__, ROWS, "bench/results/quality").parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    summary = prepare(root)
    print(f"data: {json.dumps(summary)}")
    run_rows(args, summary, lambda out, row, seed, extra: run(root, out, row, seed, extra), summarise)


if __name__ == "__main__":
    main()
