"""The frame store: clip files read once into a memory-mapped store on local disk, never stale."""

import csv
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import quick_flags, tsw


@pytest.fixture
def opens(monkeypatch):
    """Counts, per file name, every read of a clip file by the tool."""
    counts = Counter()
    real = tsw.load_clip_features

    def counting(path):
        counts[os.path.basename(path)] += 1
        return real(path)

    monkeypatch.setattr(tsw, "load_clip_features", counting)
    return counts


def dataset(root, cache, split="val", **kwargs):
    return tsw.How2SignDataset(root / f"manifests/{split}.tsv", root / f"features/{split}", cache_dir=cache, **kwargs)


def test_second_dataset_reads_the_store_and_its_frames_are_the_files(project, tmp_path, opens):
    cache = tmp_path / "cache"
    first = dataset(project, cache)
    assert sum(opens.values()) == 12 and set(opens.values()) == {1}        # every clip file read once
    stores = [p for p in (cache / "frames").iterdir() if p.is_dir()]
    assert len(stores) == 1 and (stores[0] / "meta.json").is_file()
    assert (stores[0] / "frames.f16").stat().st_size == 2 * int(first.lengths.sum()) * first.feature_dim
    opens.clear()
    second = dataset(project, cache)
    assert sum(opens.values()) == 0                                         # no clip file opened
    assert second.ids == first.ids and torch.equal(second.lengths, first.lengths)
    assert torch.equal(second.clip_means, first.clip_means)
    for i in range(len(second)):
        exact = tsw.load_clip_features(project / f"features/val/{second.ids[i]}.npy")
        assert torch.allclose(second.frames(i), exact, atol=2e-3 * exact.abs().max())   # fp16 residuals
        assert torch.equal(second.frames(i), first.frames(i))


def test_a_rewritten_clip_file_is_read_again(project, tmp_path, opens):
    cache = tmp_path / "cache"
    before = dataset(project, cache)
    path = project / "features/val" / f"{before.ids[3]}.npy"
    values = np.load(path)
    np.save(path, values + 1.0)                                             # other values, same shape
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))   # even on a coarse clock
    opens.clear()
    after = dataset(project, cache)
    assert sum(opens.values()) == 12                                        # a new store, every file read
    assert torch.allclose(after.clip_means[3], before.clip_means[3] + 1.0, atol=1e-5)
    assert torch.allclose(after.frames(3), torch.from_numpy(values + 1.0), atol=2e-3 * (np.abs(values).max() + 1))


def test_trimming_and_fps_are_part_of_the_fingerprint(project, tmp_path, opens):
    cache = tmp_path / "cache"
    dataset(project, cache)
    opens.clear()
    dataset(project, cache, trim_zero_frames=False)
    assert sum(opens.values()) == 12


def test_a_killed_build_leaves_no_store_that_looks_complete(project, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real, calls = tsw.scan_file, []

    def dies_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tsw, "scan_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        dataset(project, cache, io_threads=1)
    assert not [p for p in (cache / "frames").iterdir() if (p / "meta.json").exists()]
    assert not [p for p in (cache / "frames").iterdir() if ".building-" in p.name]     # cleaned up
    monkeypatch.setattr(tsw, "scan_file", real)
    rebuilt = dataset(project, cache)
    assert len(rebuilt) == 12


def test_not_enough_disk_is_one_line_and_outputs_stay(project, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    monkeypatch.setattr(tsw.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    code = tsw.main(quick_flags(project, out, "--epochs", "1", "--cache_dir", str(tmp_path / "cache")))
    printed = capsys.readouterr().out
    assert code == 2
    line = [l for l in printed.splitlines() if l.startswith("error:")][0]
    assert "not enough disk space for the frame store in" in line and str(tmp_path / "cache") in line
    assert "GB" in line and "--cache_dir" in line
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_default_run_then_another_run_and_predict_open_no_clip_file(project, tmp_path, opens):
    cache = str(tmp_path / "cache")
    first = tmp_path / "first"
    assert tsw.main(quick_flags(project, first, "--epochs", "1", "--cache_dir", cache)) == 0
    assert len(opens) == 48 + 12 and set(opens.values()) == {1}   # every train and val clip read once
    config = tsw.SONARwithT5.from_checkpoint(first / "best_model.pt").config
    assert config.frame_stride == tsw.ModelConfig.frame_stride
    opens.clear()
    assert tsw.main(quick_flags(project, tmp_path / "second", "--epochs", "1", "--cache_dir", cache)) == 0
    assert sum(opens.values()) == 0
    assert tsw.main(["--predict", "--checkpoint", str(first / "best_model.pt"), "--features",
                     str(project / "features/val"), "--manifest", str(project / "manifests/val.tsv"),
                     "--cache_dir", cache, "--device", "cpu"]) == 0
    assert sum(opens.values()) == 0
    assert json.loads((first / "results.json").read_text())["val_clips"] == 12


def test_a_default_model_loads_a_checkpoint_with_another_stride_and_prefix_width(project, tmp_path):
    """Cell 7's default model takes the frame window and the prefix MLP's width from the configuration
    the state dict carries."""
    out = tmp_path / "stride2"
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--frame_stride", "3", "--frame_kernel", "5",
                                "--bridge_ff_dim", "40", "--cache_dir", str(tmp_path / "cache"))) == 0
    state = torch.load(out / "best_model.pt")["model_state_dict"]
    model = tsw.SONARwithT5(str(project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
                            str(project / "t5-small"), device="cpu")
    model.load_state_dict(state)
    assert (model.bridge.frame_encoder.stride, model.bridge.frame_encoder.kernel) == (3, 5)
    assert model.config.frame_stride == 3 and model.config.frame_kernel == 5
    assert torch.equal(model.bridge.frame_encoder.frame_projection.weight,
                       state["bridge.frame_encoder.frame_projection.weight"])
    assert model.bridge.prefix_mlp[0].out_features == 40 == model.config.prefix_width
    assert all(torch.equal(v, state[k]) if torch.is_tensor(v) else v == state[k] for k, v in model.state_dict().items())


def test_a_default_model_rebuilds_the_bridge_its_checkpoint_records(project, tmp_path, capsys):
    """The state dict carries the bridge's options: Cell 7's default model rebuilds a bridge of another
    depth, query count, memory size and head count (which no weight's shape tells) and predicts as the trained model;
    --resume refuses, in one line, a last.pt whose bridge is not the one its flags build."""
    out = tmp_path / "bridge"
    flags = quick_flags(project, out, "--epochs", "1", "--cache_dir", str(tmp_path / "cache"),
                        "--num_heads", "2", "--num_queries", "12", "--memory_tokens", "3", "--bridge_layers", "2")
    assert tsw.main(flags) == 0
    state = torch.load(out / "best_model.pt")["model_state_dict"]
    model = tsw.SONARwithT5(str(project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
                            str(project / "t5-small"), device="cpu").eval()
    model.load_state_dict(state)
    assert len(model.bridge.blocks) == 2 and model.bridge.memory_positions.shape[0] == 3
    assert model.attention_bridge.num_heads == 2 and model.expander.shape[0] == 12
    reference = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt").eval()
    assert model.config == reference.config
    frames = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert torch.equal(model.encoder_inputs(model.batch_from_features(frames))[0],
                           reference.encoder_inputs(reference.batch_from_features(frames))[0])
    last = torch.load(out / "last.pt")
    last["model_state_dict"]["_extra_state"]["config"]["num_heads"] = 4
    torch.save(last, out / "last.pt")
    capsys.readouterr()
    assert tsw.main([f if f != "1" else "2" for f in flags] + ["--resume"]) == 2
    printed = capsys.readouterr().out
    assert "it was trained with --num_heads 4 (now 2)" in printed and "Traceback" not in printed


def test_frame_windows_follow_the_clip_and_ignore_padding():
    """Each token is a window of `kernel` frames every `stride` frames; frames past a clip's end are
    zeros inside its last window, so padding the batch further changes nothing."""
    torch.manual_seed(0)
    encoder = tsw.FrameEncoder(3, 8, stride=2, kernel=4).eval()
    frames = torch.randn(1, 7, 3)
    tokens, padding = encoder(frames, torch.tensor([7]))
    assert tokens.shape == (1, 4, 8) and padding.tolist() == [[False] * 4]          # ceil(7 / 2) windows
    window = torch.cat([frames[0, 2:6], torch.zeros(0, 3)]).reshape(-1)             # token 1: frames 2..5
    expected = encoder.frame_projection(window) + tsw.sinusoidal_positions(4, 8, "cpu")[1]
    assert torch.allclose(tokens[0, 1], encoder.frame_norm(expected), atol=1e-5)
    longer, longer_padding = encoder(torch.cat([frames, torch.randn(1, 5, 3)], dim=1), torch.tensor([7]))
    assert torch.allclose(longer[0, :4], tokens[0], atol=1e-5) and longer_padding[0].tolist() == [False] * 4 + [True] * 2


@pytest.mark.parametrize("layers", [0, 1])
def test_cross_attention_route_reads_frames_beside_the_encoder_output(project, tmp_path, layers):
    """T5's frame route: its encoder reads only the bridge's queries; the decoder's cross-attention reads its
    output and then the frame memory. A run trains, --predict reproduces its predictions, and Cell 7's model of
    another depth rebuilds it from the state dict."""
    out = tmp_path / "cross"
    route = ["--frame_memory_layers", str(layers)]
    assert tsw.main(quick_flags(project, out, "--epochs", "2", "--cache_dir", str(tmp_path / "cache"), *route)) == 0
    model = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt").eval()
    assert model.config.route == "cross_attention" and len(model.bridge.frame_memory.layers) == layers
    frames = torch.randn(3, 11, 64)
    frames[2, 7:] = 0                                                       # clip 2: 7 frames, then padding
    batch = model.batch_from_features(frames)
    queries = model.config.num_queries
    with torch.no_grad():
        inputs_embeds, inputs_mask = model.encoder_inputs(batch)[:2]
        memory, mask = model.decoder_memory(batch)
        encoded = model.t5.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=inputs_mask)[0]
    assert inputs_embeds.shape[1] == queries                                # no frame token in the encoder
    assert memory.shape[1] == queries + 6 and torch.allclose(memory[:, :queries], encoded, atol=1e-5)  # ceil(11 / 2)
    assert mask[:, queries:].tolist() == [[1] * 6, [1] * 6, [1] * 4 + [0] * 2]
    batch["labels"] = model.labels_from_texts(["Cut the onion.", "Fold the paper twice.", "Hi."])
    with torch.no_grad():
        own = model.t5(encoder_outputs=tsw.encoder_output(memory), attention_mask=mask, labels=batch["labels"]).loss
        assert torch.allclose(model.loss(batch)[0], own, atol=1e-5)
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features", str(project / "features/val"),
                     "--manifest", str(project / "manifests/val.tsv"), "--cache_dir", str(tmp_path / "cache"),
                     "--device", "cpu", "--num_beams", "1", "--max_new_tokens", "24"]) == 0
    predictions, best = (list(csv.DictReader((out / name).open(), delimiter="\t"))
                         for name in ("predictions.tsv", "best_predictions.tsv"))
    assert [(r["id"], r["prediction"]) for r in predictions] == [(r["id"], r["prediction"]) for r in best]
    state = torch.load(out / "best_model.pt")["model_state_dict"]
    for built in (dict(frame_memory_layers=2 - layers), dict(frame_memory_layers=layers + 2)):
        cell7 = tsw.SONARwithT5(str(project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
                                str(project / "t5-small"), device="cpu", **built)
        cell7.load_state_dict(state)
        assert cell7.config.route == "cross_attention" and cell7.config.frame_memory_layers == layers
        assert cell7.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(v, state[k]) if torch.is_tensor(v) else v == state[k]
                   for k, v in cell7.state_dict().items() if k in state)
