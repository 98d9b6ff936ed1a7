"""Which on-disk format for the frame store: a flat fp16 np.memmap + offsets, or Hugging Face datasets (Arrow).

    python bench/store_format.py                    # 3,000 clips of (100-150, 768)
    python bench/store_format.py --clips 10000

Writes the same clips both ways (fp16 frames; Arrow: one row per clip, a flat float16 list column plus
its length, saved with `Dataset.save_to_disk` and memory-mapped back by `load_from_disk`), then
measures: build time, size on disk, time to open, and random-access reads of whole clips (the
training loop's access pattern: a shuffled batch of 32 clips) as clips/s, warm (files in the page
cache). Also the frame store of train_sonar_with_t5.py itself (FrameStoreBuilder/FrameStore).
Needs the `datasets` package (the guide's Cell 2 installs it). Prints a table and one JSON line.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_sonar_with_t5 as tsw  # noqa: E402


def clips(count, dim, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(100, 151)), dim), dtype=np.float32) for _ in range(count)]


def timed_reads(read, count, batches=200, batch=32, seed=1):
    order = np.random.default_rng(seed).integers(count, size=(batches, batch))
    started = time.perf_counter()
    for indices in order:
        for i in indices:
            read(int(i))
    return batches * batch / (time.perf_counter() - started)


def folder_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def measure_memmap(root, data):
    started = time.perf_counter()
    builder = tsw.FrameStoreBuilder(root / "store", needed_bytes=0)
    scans = []
    for frames in data:
        tensor = torch.from_numpy(frames)
        mean = tensor.double().mean(0).float()
        row = builder.keep(tensor, mean, 0)
        scans.append([tsw.ClipScan(mean, 0, len(frames), frames.shape[1], row)])
    store = builder.finish({f"clip{i}": None for i in range(len(data))}, scans)
    build = time.perf_counter() - started
    started = time.perf_counter()
    store = tsw.FrameStore(root / "store")
    opened = time.perf_counter() - started
    means = [s[0].mean for s in scans]
    read = lambda i: store.residual(i).float() + means[i]  # noqa: E731  (what How2SignDataset.frames does)
    timed_reads(read, len(data), batches=20)               # warm the page cache
    return {"build_s": build, "open_s": opened, "gb": folder_size(root / "store") / 2 ** 30,
            "clips_per_s": timed_reads(read, len(data))}


def measure_arrow(root, data):
    import datasets

    started = time.perf_counter()

    def rows():
        for frames in data:
            yield {"frames": frames.astype(np.float16).reshape(-1), "length": len(frames)}

    features = datasets.Features({"frames": datasets.Sequence(datasets.Value("float16")),
                                  "length": datasets.Value("int32")})
    dataset = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(root / "hf_cache"))
    dataset.save_to_disk(str(root / "arrow"))
    build = time.perf_counter() - started
    started = time.perf_counter()
    dataset = datasets.load_from_disk(str(root / "arrow")).with_format("numpy")
    opened = time.perf_counter() - started
    dim = data[0].shape[1]
    read = lambda i: torch.from_numpy(dataset[i]["frames"].astype(np.float32)).view(-1, dim)  # noqa: E731
    timed_reads(read, len(data), batches=20)
    return {"build_s": build, "open_s": opened, "gb": folder_size(root / "arrow") / 2 ** 30,
            "clips_per_s": timed_reads(read, len(data))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=768)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = clips(args.clips, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {"memmap": measure_memmap(root, data), "arrow": measure_arrow(root, data)}
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.clips} clips of (100-150, {args.dim}), fp16 on disk; reads: 200 shuffled batches of 32 whole clips")
    print("| format | build (s) | size (GB) | open (s) | random clip reads/s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['build_s']:.1f} | {r['gb']:.2f} | {r['open_s']:.3f} | {r['clips_per_s']:.0f} |")
    print(json.dumps({"clips": args.clips, "dim": args.dim, **results}))


if __name__ == "__main__":
    main()
