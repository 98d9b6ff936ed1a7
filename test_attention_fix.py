"""The guide's Cell 4: check that the bridge can carry per-clip information before training.

    python test_attention_fix.py                       # the guide's paths, from its project folder
    python test_attention_fix.py --t5_model path/to/t5 --sonar_checkpoint enc.pt --features DIR --manifest M

Builds SONARwithT5 and checks, on a few real clips (or synthetic ones shaped like them):
shapes, that gradients reach the bridge but not the frozen encoder, that a training step and
generation run, that gradients reach the path that reads the clip's frames, and that the bridge's
outputs differ across clips and across query positions. Exit code 0 only if every check holds. The guide's
model as written (its queries attending to ONE key) failed the last check: that was the bug; its bridge was
retired (docs/benchmarks/collapse.md). Clips that are all alike (a broken extractor) fail "across clips".
"""

import argparse
import sys
from pathlib import Path

import torch

import train_sonar_with_t5 as tsw

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sonar_checkpoint", default="checkpoints/sonar_encoder_finetuned/best_encoder.pt",
                   help="encoder checkpoint")
    p.add_argument("--t5_model", default=tsw.DEFAULT_T5, help="hub name or local folder")
    p.add_argument("--features", default="features/train", help="folder of clips to probe with (optional)")
    p.add_argument("--manifest", default="manifests/train.tsv", help="manifest of those clips (optional)")
    p.add_argument("--num_queries", type=int, default=tsw.ModelConfig.num_queries, help="queries")
    p.add_argument("--clips", type=int, default=8, help="clips to probe with")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    return p.parse_args(argv)


def probe_batch(args, model):
    """A batch of real clips when the guide's data is there, else synthetic clips with cosine ~0.99."""
    manifest, features = Path(args.manifest), Path(args.features)
    if manifest.is_file() and features.is_dir():
        try:
            dataset = tsw.How2SignDataset(manifest, features, feature_dim=model.config.frame_width)
            source = f"{min(args.clips, len(dataset))} clips from {manifest}"
            indices = range(min(args.clips, len(dataset)))
            dataset.tokenize(model.tokenizer, 64)
            return tsw.collate_clips([dataset[i] for i in indices]), source, dataset
        except tsw.UserError as error:
            print(f"  (could not read the clips: {error}; using synthetic ones)")
    generator = torch.Generator().manual_seed(0)
    dim = model.sonar_encoder.input_dim
    shared = 10 * torch.randn(dim, generator=generator)
    frames = shared + torch.randn(args.clips, 10, dim, generator=generator)
    texts = [f"This is test sentence number {i}." for i in range(args.clips)]
    labels = model.labels_from_texts(texts)
    batch = {"clip_mean": frames.mean(dim=1), "features": frames, "length": torch.full((args.clips,), 10),
             "text": texts, "labels": labels, "id": [f"synthetic{i}" for i in range(args.clips)]}
    return batch, f"{args.clips} synthetic clips", None


def run_checks(args):
    results = []

    def check(name, passed, detail=""):
        results.append(passed)
        print(f"  {'PASS' if passed else 'FAIL'}  {name}" + (f": {detail}" if detail else ""))

    device = tsw.resolve_device(args.device)
    print(f"Building SONARwithT5 (T5 '{args.t5_model}') on {device}...")
    model = tsw.SONARwithT5(args.sonar_checkpoint, args.t5_model, device=device, num_queries=args.num_queries)
    batch, source, dataset = probe_batch(args, model)
    print(f"Probing with {source} and their frames.")
    with torch.no_grad():
        embeddings = model.sentence_embedding(batch)
    frames = batch["features"].flatten(0, 1)     # padding included: a probe, not training statistics
    model.set_statistics(embeddings, frames.mean(dim=0), tsw.whitening_matrix(frames.T.cov()))
    batch["sentence_embedding"] = embeddings.cpu()
    d_model = model.t5.config.d_model

    model.eval()
    with torch.no_grad():
        tokens = model.bridge_tokens(batch).float()
    check("bridge output shape", tuple(tokens.shape) == (len(batch["text"]), args.num_queries, d_model),
          f"{tuple(tokens.shape)}, expected (B, {args.num_queries}, {d_model})")
    across_clips, across_positions = tsw.bridge_spreads(tokens)   # the trainer's own diagnostics
    print(f"  (frozen embeddings' mean pairwise cosine: {tsw.mean_pairwise_cosine(embeddings):.4f})")

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss, _ = model(batch)
    loss.backward()
    bridge_grads = [p.grad for n, p in model.named_parameters()
                    if not n.startswith(("decoder.", "sonar_encoder.")) and p.requires_grad]
    check("gradients reach the bridge", bool(bridge_grads) and all(
        g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in bridge_grads if g is not None)
        and model.expander.grad is not None and model.expander.grad.abs().sum() > 0)
    projection = model.bridge.frame_encoder.frame_projection.weight.grad
    check("gradients reach the frame path", projection is not None and projection.abs().sum() > 0)
    if model.bridge.frame_memory is not None:      # frames beside T5's encoder output (T5-family decoders)
        scale = model.bridge.frame_memory.scale.grad
        check("gradients reach the frames' cross-attention memory", scale is not None and scale.abs() > 0)
    check("frozen encoder gets no gradient",
          all(p.grad is None and not p.requires_grad for p in model.sonar_encoder.parameters()))
    before = model.expander.detach().clone()
    optimizer.step()
    check("a training step runs", bool(torch.isfinite(loss)) and not torch.equal(before, model.expander.detach()),
          f"loss {float(loss.detach()):.3f}")
    model.eval()
    predictions = model.generate(batch, max_new_tokens=16, num_beams=1)
    check("generation runs", len(predictions) == len(batch["text"]), repr(predictions[0])[:60])
    check("bridge outputs differ across clips", across_clips > tsw.FLAT_SPREAD, f"relative spread {across_clips:.4f}"
          + (" (are the clips alike? see --check)" if across_clips <= tsw.FLAT_SPREAD else ""))
    check("bridge outputs differ across query positions", across_positions > tsw.FLAT_SPREAD,
          f"relative spread {across_positions:.4f}")
    return all(results)


def main(argv=None):
    args = parse_args(argv)
    try:
        ok = run_checks(args)
    except tsw.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("All checks passed: the bridge can carry per-clip information." if ok else
          "Some checks failed: training this model would collapse or not learn (see above).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
