"""How2Sign at full size: start-up, memory and speed of the default (frames) path, cold and warm.

    python bench/scale.py                          # 31,000 clips of (100-150, 768) fp32 (~12 GB of .npy)
    python bench/scale.py --clips 3000             # a quick run
    python bench/scale.py --read_delay_ms 20       # each clip read (and stat) delayed, as on Google Drive
    python bench/scale.py --layout tarres          # Tarres et al.'s release: 31,000 x (100-700, 1024), no encoder
    python bench/scale.py --layout keypoints --read_delay_ms 0 --steps 50   # How2Sign's OpenPose keypoint folders

Builds, once under --root, a How2Sign-sized training set: --clips clips of SignHiera-shaped features
(768-d, 100-150 frames each, float32 .npy files), a 64-clip validation set, the users' encoder (768 ->
1024) and a tiny T5 (the measurement is about the data path, not the decoder). --layout tarres instead
lays the clips out as Tarres et al. 2023's I3D release does (`<split>/<SENTENCE_NAME>.npy` of (100-700,
1024), one row per video frame; manifests cvpr23.fairseq.i3d.<split>.how2sign.tsv) and trains on frames
alone (--sonar_checkpoint none): its users have no sentence encoder. Its 31,000 x ~400 x 1024 float32
files would be 51 GB, which with their 25 GB fp16 store does not fit a 64 GB disk, so --distinct_files
files are written and the others are hard links to them (each clip keeps its own name, manifest row and
store entry; the cold run's reads of a linked file come from the page cache, so its start-up is a lower
bound; warm runs read no clip file). --layout keypoints lays the clips out as How2Sign's 2D keypoint release
unpacks (`<split>/openpose_output/json/<SENTENCE_NAME>/<SENTENCE_NAME>_<12-digit frame>_keypoints.json`, one
OpenPose JSON of 137 points per frame, 100-200 frames a clip: ~4.7 million files for 31,000 clips; manifests
how2sign_realigned_<split>.csv) and trains on the poses alone; its cold run reads every JSON file into the store
(in processes; --read_delay_ms does not apply: unpack the release on local disk). Then trains with the default flags, each run for one epoch (or
--steps optimizer steps), in fresh processes:
  cold          no frame store yet: every clip file read (with the delay) and written into the store
  warm          a second run on the same data (another --output_dir): the store is opened, no clip read
  warm_local    the same, without the delay (what local reads give)
  warm_torchrun the warm run as 2 torchrun processes (gloo, 1 thread each), the same samples in all
                (each process takes half the steps), so the same part of the store is read
Reported per run: seconds from process start to the first optimizer step; samples/s over the steps
after the first 5 (all processes); the machine's used memory: the sum over the run's processes of their proportional
set size (PSS: a page shared by two processes, such as the memory-mapped frame store, counts half in
each), sampled every 0.2 s, peak. Prints a table, then one JSON line.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


LAYOUTS = {   # layout -> (feature width, frames per clip (min, max), distinct files by default)
    "ours": (768, (100, 150), 0),
    "tarres": (1024, (100, 700), 1000),
    "keypoints": (154, (100, 200), 0),         # 154: the prepared width (77 points x, y)
}
CSV_HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE"
TARRES_HEADER = ("id\tsigns_file\tsigns_offset\tsigns_length\tsigns_type\tsigns_lang\ttranslation\t"
                 "translation_lang\tglosses\ttopic\tsigner_id")


def manifest_path(root, layout, split):
    return root / {"tarres": f"cvpr23.fairseq.i3d.{split}.how2sign.tsv",
                   "keypoints": f"how2sign_realigned_{split}.csv"}.get(layout, f"{split}.tsv")


def write_keypoint_clips(job):
    """One worker's share of keypoint folders, (folder, name, frames, seed) each: one OpenPose JSON per frame."""
    import numpy as np

    for folder, name, frames, seed in job:
        rng = np.random.default_rng(seed)
        clip = Path(folder) / name
        clip.mkdir(parents=True, exist_ok=True)
        base = rng.uniform(200, 900, (137, 2))
        drift = np.cumsum(rng.normal(0, 2.0, (8, 137, 2)), axis=0)
        points = np.concatenate([base + drift, rng.uniform(0.3, 0.95, (8, 137, 1))], -1).reshape(8, -1)
        bounds = (0, 75, 285, 348, 411)
        texts = []        # 8 poses a clip, cycled: the files' size and parsing are real, writing them is fast
        for frame in points:
            values = ["[" + ",".join(f"{v:.3f}" for v in frame[a:b]) + "]" for a, b in zip(bounds, bounds[1:])]
            texts.append('{"version":1.3,"people":[{"person_id":[-1],"pose_keypoints_2d":%s,"face_keypoints_2d":%s,'
                         '"hand_left_keypoints_2d":%s,"hand_right_keypoints_2d":%s,"pose_keypoints_3d":[],'
                         '"face_keypoints_3d":[],"hand_left_keypoints_3d":[],"hand_right_keypoints_3d":[]}]}'
                         % tuple(values))
        for number in range(frames):
            (clip / f"{name}_{number:012d}_keypoints.json").write_text(texts[number % 8])


def make_keypoints(root, clips, sentences, rng, workers=2):
    """How2Sign's keypoint layout and realigned CSVs for `clips` training and 64 validation clips."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, (first, count) in {"train": (0, clips), "val": (clips, 64)}.items():
        folder = root / "features" / split / "openpose_output" / "json"
        lines = [CSV_HEADER]
        for i in range(first, first + count):
            name, frames = f"clip{i:06d}_0-1-rgb_front", int(rng.integers(100, 201))
            jobs.append((str(folder), name, frames, i))
            lines.append(f"clip{i:06d}\tclip{i:06d}_0-1\t{name}\t{name}\t0.0\t{frames / 24:.2f}\t{sentences[i]}")
        manifest_path(root, "keypoints", split).write_text("\n".join(lines) + "\n")
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_keypoint_clips, [jobs[k::workers * 50] for k in range(workers * 50)]))


def make_data(root, clips, layout="ours", distinct=0, seed=0):
    """Clip files, manifests, encoder and tiny T5 (skipped when `root/READY` says they are there).
    distinct > 0: that many distinct clip files; the others are hard links to them."""
    import numpy as np
    import torch

    import train_sonar_with_t5 as tsw

    dim, (shortest, longest), _ = LAYOUTS[layout]
    ready, wanted = root / "READY", {"clips": clips, "dim": dim, "layout": layout, "distinct": distinct}
    if ready.is_file() and json.loads(ready.read_text()) == wanted:
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    sentences = tsw.demo_sentences(clips + 64, rng)
    written = []                                  # (path, frames) of the distinct files
    if layout == "keypoints":
        root.mkdir(parents=True)
        make_keypoints(root, clips, sentences, rng)
        tsw.build_tiny_t5(tsw.build_tokenizer(sentences), root / "t5")
        ready.write_text(json.dumps(wanted))
        return
    for split, (first, count) in {"train": (0, clips), "val": (clips, 64)}.items():
        folder = root / "features" / split
        folder.mkdir(parents=True)
        lines = [TARRES_HEADER if layout == "tarres" else "id\tduration\ttext"]
        for i in range(first, first + count):
            name = f"clip{i:06d}" + ("-rgb_front" if layout == "tarres" else "")
            path = folder / f"{name}.npy"
            if distinct and len(written) >= distinct and split == "train":
                source, length = written[i % distinct]
                os.link(source, path)
            else:
                length = int(rng.integers(shortest, longest + 1))
                np.save(path, rng.standard_normal((length, dim), dtype=np.float32))
                written.append((path, length))
            lines.append(f"{name}\t/mnt/cluster/i3d/{split}/{name}.npy\t0\t{length}\ti3d\tasl\t{sentences[i]}\ten\t\t"
                         f"cooking\t1" if layout == "tarres" else f"{name}\t4.0\t{sentences[i]}")
        manifest_path(root, layout, split).write_text("\n".join(lines) + "\n")
    torch.manual_seed(seed)
    torch.save({"encoder_state_dict": tsw.SentenceEncoder((dim, 512, 512, 1024)).state_dict()}, root / "encoder.pt")
    tsw.build_tiny_t5(tsw.build_tokenizer(sentences), root / "t5")
    ready.write_text(json.dumps(wanted))


def child(args):
    """One training process: the CLI's Trainer, stopped after --steps steps; prints a JSON line."""
    import torch

    import train_sonar_with_t5 as tsw

    started = float(os.environ["SCALE_STARTED"])
    delay = args.read_delay_ms / 1000
    features = str(Path(args.root) / "features")
    if delay:
        load, stat = tsw.load_clip_features, os.stat

        def slow_load(path):
            time.sleep(delay)
            return load(path)

        def slow_stat(path, *rest, **kwargs):
            if str(path).startswith(features):
                time.sleep(delay)
            return stat(path, *rest, **kwargs)

        tsw.load_clip_features, os.stat = slow_load, slow_stat
    root = Path(args.root)
    argv = ["--sonar_checkpoint", "none" if args.layout in ("tarres", "keypoints") else str(root / "encoder.pt"),
            "--train_features", str(root / "features/train"), "--train_manifest", str(manifest_path(root, args.layout, "train")),
            "--val_features", str(root / "features/val"), "--val_manifest", str(manifest_path(root, args.layout, "val")),
            "--t5_model", str(root / "t5"), "--output_dir", args.out,
            "--cache_dir", str(root / "cache"), "--device", "cpu", "--batch_size", "32", "--epochs", "1",
            "--report_to", "none"]
    cli = tsw.build_parser().parse_args(argv)
    tsw.setup_logging(None, is_main=int(os.environ.get("RANK", "0")) == 0)
    world = tsw.setup_world("cpu")
    trainer = tsw.Trainer(cli, world)
    trainer.setup()
    times, step = [], trainer.scheduler.step

    class Enough(Exception):
        pass

    steps = args.steps // world.size          # the same samples in all, however many processes share them

    def timed_step():
        step()
        times.append(time.time())
        if len(times) == steps:               # --steps 0: the whole epoch
            raise Enough

    trainer.scheduler.step = timed_step
    try:
        trainer.train_epoch(0)
    except Enough:
        pass
    if world.is_main:
        rate = (len(times) - 6) * 32 * world.size / (times[-1] - times[5])
        print("RESULT " + json.dumps({"first_step_s": times[0] - started, "samples_per_s": rate}), flush=True)
    if world.size > 1:
        torch.distributed.destroy_process_group()


def pss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid):
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children + [d for c in children for d in descendants(c)]


def run(args, name, delay, processes):
    """A fresh process (or torchrun with `processes`), its result and peak memory."""
    out = Path(args.root) / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    child_args = [__file__, "--child", "--root", args.root, "--out", str(out), "--steps", str(args.steps),
                  "--read_delay_ms", str(delay), "--layout", args.layout]
    command = ([sys.executable, *child_args] if processes == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                *child_args])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads // processes or 1), "SCALE_STARTED": str(time.time()),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, lines = 0, []
    import threading
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        trainers = [p for p in [process.pid, *descendants(process.pid)]]
        peak = max(peak, sum(pss_kb(p) for p in trainers))
        time.sleep(0.2)
    reader.join()
    results = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    if process.returncode != 0 or not results:
        raise SystemExit(f"{name} failed:\n" + "".join(lines[-30:]))
    return {**results[0], "memory_gb": peak / 2 ** 20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=31000, help="training clips (How2Sign train: ~31k)")
    parser.add_argument("--layout", default="ours", choices=list(LAYOUTS),
                        help="ours: (100-150, 768) clips and the users' encoder; tarres: Tarres et al.'s release, "
                             "(100-700, 1024) clips, frames alone; keypoints: How2Sign's OpenPose folders, poses alone")
    parser.add_argument("--distinct_files", type=int, default=None,
                        help="distinct clip files, the others hard links to them (default: 1000 for tarres, all for ours)")
    parser.add_argument("--root", default=None, help="data, store and runs go here (default: bench/results/scale[_tarres])")
    parser.add_argument("--steps", type=int, default=0,
                        help="optimizer steps per run, shared by its processes (0: a whole epoch, so every clip's "
                             "frames are read once)")
    parser.add_argument("--read_delay_ms", type=float, default=20, help="simulated Drive latency per read/stat")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (split among processes)")
    parser.add_argument("--runs", default="cold,warm,warm_local,warm_torchrun", help="which runs, comma-separated")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    args.root = args.root or ("bench/results/scale" + ("" if args.layout == "ours" else f"_{args.layout}"))
    distinct = LAYOUTS[args.layout][2] if args.distinct_files is None else args.distinct_files
    root = Path(args.root)
    started = time.time()
    make_data(root, args.clips, args.layout, distinct)
    data_s = time.time() - started
    runs = {"cold": (args.read_delay_ms, 1), "warm": (args.read_delay_ms, 1), "warm_local": (0, 1),
            "warm_torchrun": (args.read_delay_ms, 2)}
    chosen = args.runs.split(",")
    if "cold" in chosen:
        shutil.rmtree(root / "cache", ignore_errors=True)      # cold: no store
    results = {name: run(args, name, *runs[name]) for name in runs if name in chosen}
    store = sum(f.stat().st_size for f in (root / "cache").rglob("frames.f16"))
    files = sum(f.stat().st_size for f in (root / "features").rglob("*.npy" if args.layout != "keypoints" else "*.json"))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads"
    dim, (shortest, longest), _ = LAYOUTS[args.layout]
    print(f"\n{args.clips} clips, layout {args.layout} ({dim}-d, {shortest}-{longest} frames; {files / 2 ** 30:.1f} GB "
          f"of {'JSON' if args.layout == 'keypoints' else '.npy'}{f', {distinct} distinct files' if distinct else ''}; frame store {store / 2 ** 30:.1f} GB), reads "
          f"+{args.read_delay_ms:g} ms; {machine}; data built in {data_s:.0f} s")
    print("| run | start-up to first step (s) | samples/s | used memory (GB, PSS) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['first_step_s']:.1f} | {r['samples_per_s']:.1f} | {r['memory_gb']:.2f} |")
    print(json.dumps({"clips": args.clips, "layout": args.layout, "distinct_files": distinct,
                      "read_delay_ms": args.read_delay_ms, "store_gb": store / 2 ** 30,
                      "files_gb": files / 2 ** 30, "machine": machine, "runs": results}))


if __name__ == "__main__":
    main()
