"""Training and evaluation throughput: our loop vs bare T5 vs the original per-step pipeline.

    python bench/throughput.py                                  # CPU: tiny and t5-small shapes
    python bench/throughput.py --device cuda --shapes t5-small  # GPU (bf16 autocast)
    python bench/throughput.py --frames --shapes tiny            # frames: from the frame store vs read each step
    python bench/throughput.py --decoder_training --shapes t5-small   # full vs LoRA: speed, memory, checkpoint
    python bench/throughput.py --checkpoint_sizes                # LoRA checkpoints of real decoder shapes
    python bench/throughput.py --shapes t5-small --extra "--frame_memory_layers 2"   # a candidate's flags for ours
    python bench/throughput.py --flops_by_module --shapes t5-small   # where our forward pass's FLOPs go
    python bench/throughput.py --long_clips --shapes t5-small    # Tarres-shaped clips (100-700, 1024) by stride

Same process, same generated How2Sign-shaped clips ((T, 256) float32 .npy files, T in 60..300), same
real-English targets, same batch size. Ours runs two epochs and keeps its best rate (without frames, retired
on 2026-12-07, was a column until then); in a third epoch of ours bare T5 takes a step after each
of ours, on the same batch, and the overhead is bare's rate over ours in that epoch (pairs see the same
machine: its speed drifts by 10% and more over minutes, which made best-of-two runs of bare and ours
differ by that much between runs; interleaved, both run a little slower than alone). The median of the
pairs' ratios is printed beside it, and the FLOP ratio (ours over bare, a forward + backward of each on every
batch timed in that epoch, summed; counted by torch's FlopCounterMode after the timing), which does not move
with the machine.
  ours      Trainer.train_epoch of train_sonar_with_t5.py as users run it, default flags (frames read by
            T5 and the bridge, from the frame store; cached frozen-encoder
            embeddings, targets tokenised once, dynamic padding, default bridge, label smoothing,
            clipping, scheduler). Timed by its optimizer steps.
  bare      T5 forward + backward + AdamW alone, on the same label batches, inputs_embeds as long as
            what ours gives T5's encoder (B, 32 queries [+ frame tokens], d_model) and as many extra
            cross-attention memory tokens as ours (the frame tokens, beside T5's encoder output):
            the floor for any bridge-to-T5 model.
  seed      our re-implementation of the original script's per-step work, from its description:
            each clip file read every step, padded to 300 frames, the frozen encoder run on the
            padded batch, targets tokenised every step with padding="max_length" (128) and pad ids
            kept as labels, our bridge over the embedding alone (the guide's was retired), fp32. `seed_longest` is the same with targets padded
            only to the batch's longest (in case the original did that): both are reported.
Evaluation: the whole validation set, beam 4, every sentence decoded to exactly 64 tokens (how long an
untrained model's sentences are is chance). MFU: bare's mean FLOPs per step (counted with torch's FlopCounterMode) x our steps/s, over a matmul peak
measured here (fp32 on CPU, bf16 on GPU). Prints a table, then one JSON object as the last line.
"""

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import train_sonar_with_t5 as tsw  # noqa: E402

SHAPES = {
    "tiny": dict(d_model=128, layers=2, heads=4, vocab=None, batch=32, steps=40),
    "t5-small": dict(d_model=512, layers=6, heads=8, vocab=32128, batch=16, steps=20),
}
WARMUP_STEPS = 2       # steps excluded from every timing (allocator and kernel warm-up)
SEED_FRAMES = 300
SEED_TARGET_LENGTH = 128


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(step_times, batch):
    """Samples/s over the steps after warm-up, from the wall-clock times at which steps ended."""
    times = step_times[WARMUP_STEPS:]
    return (len(times) - 1) * batch / (times[-1] - times[0])


def duration_rate(durations, batch):
    """Samples/s over the steps after warm-up, from each step's duration."""
    return len(durations[WARMUP_STEPS:]) * batch / sum(durations[WARMUP_STEPS:])


def make_data(root, shape, num_clips, feature_dim=256, seed=0, frames=(60, 300)):
    rng = np.random.default_rng(seed)
    sentences = tsw.demo_sentences(num_clips, rng)
    (root / "features").mkdir(parents=True)
    lines = ["id\tduration\ttext"]
    for i, sentence in enumerate(sentences):
        np.save(root / "features" / f"c{i:05d}.npy", rng.normal(size=(rng.integers(frames[0], frames[1] + 1), feature_dim))
                .astype(np.float32))
        lines.append(f"c{i:05d}\t3.0\t{sentence}")
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    val_clips = 64 if shape["d_model"] <= 128 else 32                    # evaluation throughput
    (root / "val.tsv").write_text("\n".join(lines[: val_clips + 1]) + "\n")
    torch.manual_seed(seed)
    torch.save(tsw.SentenceEncoder((feature_dim, 512, 512, 1024)).state_dict(), root / "encoder.pt")
    tokenizer = tsw.build_tokenizer(sentences)
    tsw.build_tiny_t5(tokenizer, root / "t5", d_model=shape["d_model"], layers=shape["layers"], heads=shape["heads"],
                      seed=seed, vocab_size=shape["vocab"])


def build_trainer(root, shape, device, precision, *extra):
    """Our Trainer on the generated data, set up (every clip read once, encoded, tokenised)."""
    args = tsw.build_parser().parse_args([
        "--sonar_checkpoint", str(root / "encoder.pt"), "--train_features", str(root / "features"),
        "--train_manifest", str(root / "train.tsv"), "--val_features", str(root / "features"),
        "--val_manifest", str(root / "val.tsv"), "--t5_model", str(root / "t5"), "--output_dir", str(root / "run"),
        "--batch_size", str(shape["batch"]), "--epochs", "1", "--warmup_steps", "0", "--device", str(device),
        "--precision", precision, "--eval_batch_size", "32", "--cache_dir", str(root / "cache"), *extra])
    tsw.setup_logging(None, is_main=False)
    trainer = tsw.Trainer(args, tsw.World(device=device))
    trainer.setup()
    return trainer


def measure_ours(root, shape, device, precision, *extra):
    """Our training (samples/s, one epoch) and set-up time with these flags, and the trainer."""
    started = time.perf_counter()
    trainer = build_trainer(root, shape, device, precision, *extra)
    setup_s = time.perf_counter() - started
    return time_epoch(trainer, 0, shape, device), setup_s, trainer


def batch_shapes(trainer, batches):
    """Each training batch's labels and what T5 reads for it: (tokens its encoder reads, tokens its
    cross-attention reads besides the encoder's output), queries and frame tokens as ours sends them."""
    args = trainer.args
    labels = [tsw.collate_clips([trainer.train_set[i] for i in b])["labels"] for b in batches]
    frames = [-(-int(trainer.train_set.lengths[b].max()) // args.frame_stride) for b in batches]
    if trainer.raw_model.bridge.frame_memory is not None:
        return labels, [(args.num_queries, count) for count in frames]
    return labels, [(args.num_queries + count, 0) for count in frames]


def time_evaluation(trainer, device):
    """Sentences/s of an evaluation of the whole validation set (default decoding: beam 4), every sentence
    decoded to exactly 64 tokens: how long an untrained model's sentences are is chance, and would be
    timed instead of the model."""
    settings = tsw.generation_kwargs

    def fixed_length(s):
        kwargs = settings(s)
        return {**kwargs, "min_new_tokens": kwargs["max_new_tokens"]}

    tsw.generation_kwargs = fixed_length
    try:
        sync(device)
        started = time.perf_counter()
        trainer.evaluate()
        sync(device)
    finally:
        tsw.generation_kwargs = settings
    return len(trainer.val_set) / (time.perf_counter() - started)


def time_epoch(trainer, epoch, shape, device):
    """Samples/s of one epoch of our training loop, timed at its optimizer steps."""
    return time_paired(trainer, epoch, shape, device)[0]


def time_paired(trainer, epoch, shape, device, bare=None, labels=None, inputs=None):
    """One epoch of our training loop; with `bare`, bare T5 takes a step on the same batch (`labels` and
    `inputs`: batch_shapes of this epoch's batches) after each of ours, its time left out of ours. Paired
    steps see the same machine: a drift in its speed (seconds to minutes long on a shared 2-core machine)
    hits both alike. Returns (our samples/s, bare samples/s or None, the median over pairs of our step time
    over bare's or None)."""
    ours_s, bare_s, step = [], [], trainer.scheduler.step
    started = [time.perf_counter()]

    def timed_step():
        step()
        sync(device)
        ours_s.append(time.perf_counter() - started[0])
        if bare:
            i = len(ours_s) - 1
            begin = time.perf_counter()
            bare.step(labels[i], *inputs[i])
            bare_s.append(time.perf_counter() - begin)
        started[0] = time.perf_counter()

    trainer.scheduler.step = timed_step
    try:
        trainer.train_epoch(epoch)
    finally:
        trainer.scheduler.step = step
    if not bare:
        return duration_rate(ours_s, shape["batch"]), None, None
    ratios = [o / b for o, b in zip(ours_s[WARMUP_STEPS:], bare_s[WARMUP_STEPS:])]
    return duration_rate(ours_s, shape["batch"]), duration_rate(bare_s, shape["batch"]), float(np.median(ratios))


def counted_flops(run):
    """FLOPs (torch's FlopCounterMode: matrix products and attention) of `run()`."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def paired_flops(trainer, epoch, bare, labels, inputs):
    """FLOPs of a forward + backward of ours and of bare T5 on each batch time_paired timed (after warm-up),
    summed: (ours, bare). Counted after the timing, outside it; gradients dropped, weights untouched."""
    batches = trainer.epoch_batches(epoch)[WARMUP_STEPS:len(labels)]
    trainer.model.train()
    ours = bare_total = 0
    for i, batch in enumerate(tsw.clip_batches(trainer.train_set, batches), start=WARMUP_STEPS):
        ours += counted_flops(lambda: trainer.model(batch, label_smoothing=trainer.args.label_smoothing)[0].backward())
        trainer.optimizer.zero_grad(set_to_none=True)
        bare_total += counted_flops(lambda: bare.loss(labels[i], *inputs[i]).backward())
        bare.optimizer.zero_grad(set_to_none=True)
    return ours, bare_total


class BareT5:
    """T5 alone: forward + backward + AdamW on given labels, fed random inputs_embeds as long as ours were
    and random extra cross-attention memory as long as ours (frame route cross_attention)."""

    def __init__(self, root, shape, device, precision):
        from transformers import T5ForConditionalGeneration
        self.shape, self.device, self.precision = shape, device, precision
        self.t5 = T5ForConditionalGeneration.from_pretrained(root / "t5").to(device).train()
        self.optimizer = torch.optim.AdamW(self.t5.parameters(), lr=5e-5, weight_decay=0.01, fused=True)

    def loss(self, labels, length, extra):
        """The forward pass: T5's loss on `labels` from `length` input tokens and `extra` memory tokens."""
        device, d_model = self.device, self.shape["d_model"]
        labels = labels.to(device)
        inputs_embeds = torch.randn(len(labels), length, d_model, device=device)
        extra_memory = torch.randn(len(labels), extra, d_model, device=device)
        mask = torch.ones(len(labels), length + extra, dtype=torch.long, device=device)
        with tsw.autocast_for(device, self.precision):
            memory = self.t5.encoder(inputs_embeds=inputs_embeds)[0]
            return self.t5(encoder_outputs=tsw.encoder_output(torch.cat([memory, extra_memory], dim=1)),
                           attention_mask=mask, labels=labels).loss

    def step(self, labels, length, extra):
        """One training step."""
        self.loss(labels, length, extra).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)


def measure_frames(root, shape, device, precision, *flags, read_delay_ms=0):
    """Samples/s of training with frames from the frame store (the clip files' reads optionally delayed, as from a
    network drive: they are read once, into the store)."""
    trainer = build_trainer(root, shape, device, precision, *flags)
    load = tsw.load_clip_features

    def slow_load(path):
        time.sleep(read_delay_ms / 1000)
        return load(path)

    tsw.load_clip_features = slow_load
    try:
        return time_epoch(trainer, 0, shape, device)
    finally:
        tsw.load_clip_features = load


class SeedClips(Dataset):
    """The original data path: every item reads its file and pads it to 300 frames."""

    def __init__(self, manifest, folder):
        rows = tsw.read_manifest(manifest)
        self.items = [(Path(folder) / f"{r.id}.npy", r.text) for r in rows]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, text = self.items[index]
        features = torch.from_numpy(np.load(path))[:SEED_FRAMES]
        return F.pad(features, (0, 0, 0, SEED_FRAMES - features.shape[0])), text


def measure_seed(root, shape, device, steps, padding):
    model = tsw.SONARwithT5(root / "encoder.pt", str(root / "t5"), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)  # as the original
    loader = DataLoader(SeedClips(root / "train.tsv", root / "features"), batch_size=shape["batch"], shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model.train()
    step_times = []
    for i, (features, texts) in enumerate(loader):
        if i == steps:
            break
        features = features.to(device)
        embedding = model.sonar_encoder(features.mean(dim=1))   # mean over all 300 frames, padding too
        no_frames = embedding.new_zeros(len(embedding), 0, model.expander.shape[1])
        inputs_embeds = model.bridge(embedding, no_frames, torch.zeros(no_frames.shape[:2], dtype=torch.bool, device=device))
        encoded = model.tokenizer(list(texts), padding=padding, max_length=SEED_TARGET_LENGTH, truncation=True,
                                  return_tensors="pt")
        labels = encoded["input_ids"].to(device)               # pad ids kept as labels, as the original did
        mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=device)
        loss = model.t5(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        step_times.append(time.perf_counter())
    return rate(step_times, shape["batch"])


def flops_by_module(args, device, precision):
    """Our forward pass's FLOPs by module (torch's FlopCounterMode) on the batch the paired epoch times first;
    a module called inside another counts in both rows."""
    extra = shlex.split(args.extra)
    for name in args.shapes.split(","):
        shape = dict(SHAPES[name])
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_data(root, shape, shape["batch"] * ((args.steps or shape["steps"]) + WARMUP_STEPS))
            trainer = build_trainer(root, shape, device, precision, *extra)
            batch = next(iter(tsw.clip_batches(trainer.train_set, [trainer.epoch_batches(2)[WARMUP_STEPS]])))
            counter = FlopCounterMode(display=False, depth=4)
            with torch.no_grad(), counter:
                trainer.model.train()(batch, label_smoothing=trainer.args.label_smoothing)
        total = counter.get_total_flops()
        tokens = trainer.raw_model.frame_tokens(batch)[0]
        print(f"\n{name}: {total / 1e9:.1f} GFLOP forward, batch {shape['batch']}, "
              f"{0 if tokens is None else tokens.shape[1]} frame tokens\n| module | GFLOP | share |\n|---|---|---|")
        for module, counts in counter.get_flop_counts().items():
            flops = sum(counts.values())
            if module not in ("Global", "SONARwithT5") and module.count(".") <= 3 and flops >= 0.005 * total:
                print(f"| {module.removeprefix('SONARwithT5.')} | {flops / 1e9:.2f} | {flops / total:.1%} |")


def matmul_peak(device):
    """Best FLOP/s of a large matmul here: fp32 on CPU, bf16 on GPU."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        sync(device)
        started = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - started))
    return best


DECODER_TRAINING = {"full": [], "lora_r8": ["--lora_rank", "8"],
                    "lora_r8_checkpointing": ["--lora_rank", "8", "--gradient_checkpointing"]}
CLIPS = {"default": dict(feature_dim=256, frames=(60, 300)),      # the clips of every other table here
         "tarres": dict(feature_dim=1024, frames=(100, 700))}     # Tarres et al.'s I3D release: a row per video frame
FRAMES_ALONE = ["--sonar_checkpoint", "none"]
LONG_CLIPS = {   # --long_clips: name -> (clips, flags); windows overlap by half, as the default's (quality.md)
    "default": ("default", []),
    "default_frames_alone": ("default", FRAMES_ALONE),
    "tarres_stride2": ("tarres", FRAMES_ALONE),
    "tarres_stride4": ("tarres", FRAMES_ALONE + ["--frame_stride", "4", "--frame_kernel", "8"]),
    "tarres_stride8": ("tarres", FRAMES_ALONE + ["--frame_stride", "8", "--frame_kernel", "16"]),
}


def one_decoder_mode(args, device, precision):
    """One --decoder_training mode, in a process of its own (its peak memory is its own): the JSON line."""
    shape = dict(SHAPES[args.shapes])
    root = Path(args.root)
    flags = DECODER_TRAINING[args.one_mode] if args.one_mode in DECODER_TRAINING else LONG_CLIPS[args.one_mode][1]
    trainer = build_trainer(root, shape, device, precision, *flags)
    setup_rss = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rate = time_epoch(trainer, 0, shape, device)
    with tempfile.NamedTemporaryFile() as f:
        torch.save(tsw.model_checkpoint(trainer.raw_model, trainer.args), f.name)
        checkpoint_bytes = Path(f.name).stat().st_size
    base = {k: v for k, v in trainer.raw_model.decoder.seq2seq.named_parameters() if "lora_" not in k}  # tied once
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20     # KB on Linux -> GB
    stride = trainer.config.frame_stride
    print(json.dumps({"samples_per_s": rate, "peak_rss_gb": peak_rss, "training_rss_gb": peak_rss - setup_rss,
                      "frames_mean": float(trainer.train_set.lengths.float().mean()),
                      "frame_tokens_mean": float((-(-trainer.train_set.lengths // stride)).float().mean()),
                      "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
                      "trainable": sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad),
                      "checkpoint_mb": checkpoint_bytes / 2 ** 20,
                      "decoder_mb": sum(v.numel() * v.element_size() for v in base.values()) / 2 ** 20}))


def current_rss():
    """This process's resident memory now, in GB (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def in_own_process(args, mode, root, shape_name):
    """One mode (DECODER_TRAINING or LONG_CLIPS) run by one_decoder_mode in a fresh process: its JSON line."""
    done = subprocess.run([sys.executable, __file__, "--one_mode", mode, "--root", str(root), "--shapes", shape_name,
                           "--threads", str(args.threads), "--device", args.device, "--precision", args.precision],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def modes_in_own_processes(args, modes):
    """{shape: {mode: its JSON line}}: each mode (name -> the CLIPS it trains on) in a fresh process, per shape."""
    results = {}
    for name in args.shapes.split(","):
        shape, results[name] = dict(SHAPES[name]), {}
        with tempfile.TemporaryDirectory() as tmp:
            for clips in dict.fromkeys(modes.values()):
                make_data(Path(tmp) / clips, shape, shape["batch"] * ((args.steps or shape["steps"]) + WARMUP_STEPS),
                          **CLIPS[clips])
            for mode, clips in modes.items():
                results[name][mode] = in_own_process(args, mode, Path(tmp) / clips, name)
                print(f"{name} {mode}: {json.dumps(results[name][mode])}", flush=True)
    return results


def print_modes(title, results, columns, cells):
    """The table of modes_in_own_processes' results: a row per shape and mode, `cells(modes, mode, r)` its cells."""
    print(f"\n{title}")
    print("| shape | " + " | ".join(columns) + " |")   # columns: the mode's name first
    print("|---" * (len(columns) + 1) + "|")
    for name, modes in results.items():
        for mode, r in modes.items():
            print(f"| {name} | {mode} | " + " | ".join(cells(modes, mode, r)) + " |")


def decoder_training_table(args, machine):
    results = modes_in_own_processes(args, dict.fromkeys(DECODER_TRAINING, "default"))
    print_modes(f"machine: {machine}; training samples/s, memory and checkpoint size by how the decoder trains", results,
                ["decoder", "samples/s", "step cost vs full", "peak RSS GB (training part)", "peak GPU GB",
                 "trainable parameters", "checkpoint MB", "decoder weights MB"],
                lambda modes, mode, r: [f"{r['samples_per_s']:.2f}", f"{modes['full']['samples_per_s'] / r['samples_per_s']:.2f}x",
                                  f"{r['peak_rss_gb']:.2f} ({r['training_rss_gb']:.2f})",
                                  f"{r['peak_gpu_gb']:.2f}" if r["peak_gpu_gb"] is not None else "-",
                                  f"{r['trainable']:,}", f"{r['checkpoint_mb']:.1f}", f"{r['decoder_mb']:.1f}"])
    print(json.dumps({"machine": machine, "decoder_training": results}))


def long_clips_table(args, machine):
    """Training steps on Tarres-shaped clips (frames alone, by frame stride) beside the default on the
    clips of every other table, each mode in a process of its own (samples/s and peak memory)."""
    results = modes_in_own_processes(args, {mode: clips for mode, (clips, _) in LONG_CLIPS.items()})
    flags = {mode: " ".join(options) or "(defaults)" for mode, (_, options) in LONG_CLIPS.items()}
    print_modes(f"machine: {machine}; training steps by clip shape and frame stride, batch as the shape's", results,
                ["run", "frames (mean)", "frame tokens (mean)", "samples/s", "step time vs default",
                 "peak RSS GB (training part)", "flags"],
                lambda modes, mode, r: [f"{r['frames_mean']:.0f}", f"{r['frame_tokens_mean']:.0f}", f"{r['samples_per_s']:.2f}",
                                  f"{modes['default']['samples_per_s'] / r['samples_per_s']:.2f}x",
                                  f"{r['peak_rss_gb']:.2f} ({r['training_rss_gb']:.2f})", f"`{flags[mode]}`"])
    print(json.dumps({"machine": machine, "long_clips": results}))


REAL_SHAPES = {   # configs of the hub models (sizes only: weights random), the users' 768-d frames
    "t5-small": ("t5", dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
                            vocab_size=32128)),
    "google/flan-t5-base": ("t5", dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                                       num_heads=12, vocab_size=32128, feed_forward_proj="gated-gelu",
                                       tie_word_embeddings=False)),
    "facebook/nllb-200-distilled-600M": ("m2m_100", dict(d_model=1024, encoder_layers=12, decoder_layers=12,
                                                         encoder_attention_heads=16, decoder_attention_heads=16,
                                                         encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                                                         vocab_size=256206, scale_embedding=True)),
}


def checkpoint_sizes_table():
    """best_model.pt of a LoRA decoder against the decoder's own weights, default bridge flags."""
    from transformers import AutoConfig

    tokenizer = tsw.build_tokenizer(tsw.demo_sentences(200, np.random.default_rng(0)))
    rows = []
    for name, (model_type, config) in REAL_SHAPES.items():
        torch.manual_seed(0)
        decoder = tsw.decoder_from_config(json.loads(AutoConfig.for_model(model_type, **config).to_json_string()))
        decoder_mb = sum(p.numel() * p.element_size() for p in decoder.parameters()) / 2 ** 20
        for mode, options in (("lora_r8", dict(lora_rank=8)),):
            model = tsw.SONARwithT5(None, name, device="cpu", decoder=tsw.copy.deepcopy(decoder), tokenizer=tokenizer,
                                    encoder_dims=(768, 512, 512, 1024), feature_dim=768, **options)
            with tempfile.NamedTemporaryFile() as f:
                torch.save(tsw.model_checkpoint(model, argparse.Namespace()), f.name)
                size = Path(f.name).stat().st_size / 2 ** 20
            rows.append((name, mode, decoder_mb, size))
            print(f"| {name} | {mode} | {decoder_mb:.0f} | {size:.1f} | {decoder_mb / size:.1f}x |", flush=True)
        del decoder
    print(json.dumps({"checkpoint_sizes": rows}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,t5-small", help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per measurement (0: per shape)")
    parser.add_argument("--frames", action="store_true",
                        help="instead: training with frames from the frame store vs read from disk at every step")
    parser.add_argument("--read_delay_ms", type=float, default=20,
                        help="--frames: also measure reads delayed this much (a network drive)")
    parser.add_argument("--decoder_training", action="store_true",
                        help="instead: full fine-tuning vs LoRA (+ gradient checkpointing)")
    parser.add_argument("--long_clips", action="store_true",
                        help="instead: Tarres-shaped clips (100-700 frames, 1024-d, frames alone) by frame stride, "
                             "beside the default step")
    parser.add_argument("--checkpoint_sizes", action="store_true",
                        help="instead: checkpoint size of LoRA training on the hub models' shapes")
    parser.add_argument("--seed_pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the original per-step pipeline (--no-seed_pipeline: skip it)")
    parser.add_argument("--extra", default="", help="flags added to our default run (a candidate to compare)")
    parser.add_argument("--flops_by_module", action="store_true",
                        help="instead: our forward pass's FLOPs by module, one batch (with --extra: a candidate's)")
    parser.add_argument("--one_mode", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = tsw.resolve_precision(args.precision, device)[0]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()} CPU, {args.threads} threads")
    if args.one_mode:
        return one_decoder_mode(args, device, precision)
    if args.checkpoint_sizes:
        print("| decoder | training | decoder weights MB | best_model.pt MB | smaller by |\n|---|---|---|---|---|")
        return checkpoint_sizes_table()
    if args.decoder_training:
        return decoder_training_table(args, machine)
    if args.long_clips:
        return long_clips_table(args, machine)
    if args.flops_by_module:
        return flops_by_module(args, device, precision)
    peak = matmul_peak(device)
    if args.frames:
        return frames_table(args, device, precision, machine)
    results, extra = {}, shlex.split(args.extra)
    for name in args.shapes.split(","):
        shape = dict(SHAPES[name])
        steps = args.steps or shape["steps"]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_data(root, shape, shape["batch"] * (steps + WARMUP_STEPS))
            # Ours runs twice and keeps its best (the machine's speed drifts); bare T5 is timed step by step
            # beside ours, on the same batches.
            ours, setup_s, trainer = measure_ours(root, shape, device, precision, *extra)
            eval_rate = time_evaluation(trainer, device)
            ours = max(ours, time_epoch(trainer, 1, shape, device))
            labels, inputs = batch_shapes(trainer, trainer.epoch_batches(2))
            bare_t5 = BareT5(root, shape, device, precision)
            paired_ours, bare, median_ratio = time_paired(trainer, 2, shape, device, bare_t5, labels, inputs)
            flops_ours, flops_bare = paired_flops(trainer, 2, bare_t5, labels, inputs)
            flops = flops_bare / (len(labels) - WARMUP_STEPS)                # bare's mean FLOPs per step
            eval_rate = max(eval_rate, time_evaluation(trainer, device))
            seed = measure_seed(root, shape, device, len(labels), "max_length") if args.seed_pipeline else float("nan")
            seed_longest = (measure_seed(root, shape, device, len(labels), "longest") if args.seed_pipeline
                            else float("nan"))
        results[name] = {
            "train_samples_per_s": ours, "bare_samples_per_s": bare, "overhead": bare / paired_ours,
            "overhead_median_pair": median_ratio, "flops_ratio": flops_ours / flops_bare,
            "paired_train_samples_per_s": paired_ours,
            "t5_input_tokens_mean": sum(length for length, _ in inputs) / len(inputs),
            "cross_attention_extra_tokens_mean": sum(extra for _, extra in inputs) / len(inputs),
            "seed_pipeline_samples_per_s": seed, "seed_longest_samples_per_s": seed_longest,
            "speedup_vs_seed": ours / seed, "speedup_vs_seed_longest": ours / seed_longest,
            "eval_sentences_per_s": eval_rate, "setup_s": setup_s,
            "mfu": flops * ours / shape["batch"] / peak, "flops_per_step": flops, "batch_size": shape["batch"],
            "timed_steps": len(labels) - WARMUP_STEPS, "precision": precision}
    print(f"\nmachine: {machine}; matmul peak {peak / 1e9:.0f} GFLOP/s; precision {precision}")
    print("| shape | ours samples/s | bare T5, same inputs | overhead (median pair) | FLOPs ours / bare | eval "
          "sentences/s | seed samples/s (max_length / longest) | ours vs seed | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['train_samples_per_s']:.1f} | {r['bare_samples_per_s']:.1f} | {r['overhead']:.3f} "
              f"({r['overhead_median_pair']:.3f}) | {r['flops_ratio']:.3f} | {r['eval_sentences_per_s']:.1f} | "
              f"{r['seed_pipeline_samples_per_s']:.1f} / {r['seed_longest_samples_per_s']:.1f} | "
              f"{r['speedup_vs_seed']:.2f}x / {r['speedup_vs_seed_longest']:.2f}x | {r['mfu']:.1%} |")
    primary = results[list(results)[-1]]
    print(json.dumps({**primary, "shape": list(results)[-1], "extra": args.extra, "machine": machine, "peak_flops": peak,
                      "shapes": results}))


def frames_table(args, device, precision, machine):
    results = {}
    for name in args.shapes.split(","):
        shape = dict(SHAPES[name])
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_data(root, shape, shape["batch"] * ((args.steps or shape["steps"]) + WARMUP_STEPS))
            results[name] = {
                "store": measure_frames(root, shape, device, precision),
                "store_delayed": measure_frames(root, shape, device, precision, read_delay_ms=args.read_delay_ms)}
    print(f"\nmachine: {machine}; precision {precision}; training samples/s with frames")
    print(f"| shape | frame store | frame store, files +{args.read_delay_ms:g} ms a read |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['store']:.1f} | {r['store_delayed']:.1f} |")
    print(json.dumps({"machine": machine, "read_delay_ms": args.read_delay_ms, "frames": results}))


if __name__ == "__main__":
    main()
