"""Manifests, datasets, collation and bad-data handling."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import Payload, tsw


def write_clips(folder, clips):
    folder.mkdir(parents=True, exist_ok=True)
    for clip_id, array in clips.items():
        np.save(folder / f"{clip_id}.npy", array)


@pytest.fixture
def clips(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"clip{i}": rng.normal(size=(5 + i, 8)).astype(np.float32) for i in range(3)}
    write_clips(tmp_path / "features", arrays)
    return arrays


TEXTS = ["Hello there.", "Cut the onion slowly with the sharp knife.", "Fold the paper."]


def test_every_manifest_format_gives_the_same_clips(tmp_path, clips):
    (tmp_path / "m.tsv").write_text("id\tduration\ttext\n" + "".join(
        f"clip{i}\t1.0\t{t}\n" for i, t in enumerate(TEXTS)))
    (tmp_path / "how2sign_realigned_val.csv").write_text(
        "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE\n" + "".join(
            f"v{i}\tv{i}-1\ts{i}\tclip{i}\t0.0\t1.0\t{t}\n" for i, t in enumerate(TEXTS)))
    records = [{"id": f"clip{i}", "text": t, "features": f"features/clip{i}.npy"} for i, t in enumerate(TEXTS)]
    (tmp_path / "m.json").write_text(json.dumps(records))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    datasets = [tsw.How2SignDataset(tmp_path / "m.tsv", tmp_path / "features"),
                tsw.How2SignDataset(tmp_path / "how2sign_realigned_val.csv", tmp_path / "features"),
                tsw.How2SignDataset(tmp_path / "m.json"), tsw.How2SignDataset(tmp_path / "m.jsonl")]
    for dataset in datasets:
        assert dataset.ids == ["clip0", "clip1", "clip2"]
        assert dataset.texts == TEXTS
        assert dataset.feature_dim == 8
        assert dataset.lengths.tolist() == [5, 6, 7]
        assert torch.allclose(dataset.clip_means[2], torch.from_numpy(clips["clip2"].mean(0)), atol=1e-6)


def test_unknown_manifest_header_is_one_clear_error(tmp_path, clips):
    (tmp_path / "m.tsv").write_text("name\tsentence\nclip0\tHi\n")
    with pytest.raises(tsw.UserError, match="unknown manifest header"):
        tsw.How2SignDataset(tmp_path / "m.tsv", tmp_path / "features")


def test_items_batch_with_default_collate_and_padding_stays_out_of_the_mean(tmp_path, clips):
    (tmp_path / "m.tsv").write_text("id\tduration\ttext\n" + "".join(
        f"clip{i}\t1.0\t{t}\n" for i, t in enumerate(TEXTS)))
    dataset = tsw.How2SignDataset(tmp_path / "m.tsv", tmp_path / "features")
    batch = next(iter(DataLoader(dataset, batch_size=3, shuffle=False)))   # no collate_fn: Cell 7
    assert batch["features"].shape == (3, 7, 8)
    assert batch["id"] == ["clip0", "clip1", "clip2"]
    # The masked mean of the zero-padded batch equals each clip's own mean (up to the store's fp16 residuals;
    # counting the padding would be off by ~0.1).
    pooled = tsw.masked_mean(batch["features"], batch["length"])
    for i in range(3):
        assert torch.allclose(pooled[i], torch.from_numpy(clips[f"clip{i}"].mean(0)), atol=2e-3)
    encoder = tsw.SentenceEncoder((8, 16, 16, 32)).eval()
    assert torch.allclose(encoder(pooled[:1]), encoder(torch.from_numpy(clips["clip0"]).mean(0, keepdim=True)),
                          atol=2e-3)


def test_zero_frames_padded_in_the_file_do_not_change_the_embedding(tmp_path, clips):
    padded = np.concatenate([clips["clip0"], np.zeros((300 - 5, 8), np.float32)])
    write_clips(tmp_path / "padded", {"clip0": padded})
    (tmp_path / "m.tsv").write_text("id\tduration\ttext\nclip0\t1.0\tHi\n")
    trimmed = tsw.How2SignDataset(tmp_path / "m.tsv", tmp_path / "padded")
    plain = tsw.How2SignDataset(tmp_path / "m.tsv", tmp_path / "features")
    assert trimmed.lengths.tolist() == [5]
    assert torch.allclose(trimmed.clip_means, plain.clip_means, atol=1e-6)
    kept = tsw.How2SignDataset(tmp_path / "m.tsv", tmp_path / "padded", trim_zero_frames=False)
    assert kept.lengths.tolist() == [300]


def test_every_bad_clip_and_row_is_skipped_with_its_reason(tmp_path, caplog):
    rng = np.random.default_rng(1)
    folder = tmp_path / "features"
    good = rng.normal(size=(4, 8)).astype(np.float32)
    write_clips(folder, {"good": good, "good2": good + 1, "empty": np.zeros((0, 8), np.float32),
                         "nan": np.full((3, 8), np.nan, np.float32), "wide": rng.normal(size=(3, 12)).astype(np.float32),
                         "shared": good})
    (folder / "garbage.npy").write_bytes(b"this is not numpy")
    marker = tmp_path / "pwned"
    torch.save({"features": Payload(marker)}, folder / "evil.pt")
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    manifest = ("id\tduration\ttext\ngood\t1\tA good clip.\ngood2\t1\tAnother good clip.\nmissing\t1\tNo file.\n"
                "garbage\t1\tBytes.\nempty\t1\tNo frames.\nnan\t1\tNaN.\nwide\t1\tWide.\nevil\t1\tEvil.\n"
                "objects\t1\tObjects.\n\t1\tNo id.\ngood2\t1\t\nshared\t1\tOne.\nshared\t1\tTwo.\n"
                "good\t1\tA good clip.\n")
    (tmp_path / "m.tsv").write_text(manifest)
    dataset = tsw.How2SignDataset(tmp_path / "m.tsv", folder)
    assert dataset.ids == ["good", "good2"]
    reasons = dict(dataset.skipped)
    assert reasons["missing"].startswith("missing feature file")
    assert reasons["garbage"].startswith("unreadable feature file")
    assert reasons["evil"].startswith("unreadable feature file")
    assert reasons["objects"].startswith("unreadable feature file")
    assert reasons["empty"] == "empty clip (no frames)"
    assert reasons["nan"] == "clip has NaN/Inf values"
    assert reasons["wide"].startswith("wrong feature dimension (12, expected 8)")
    assert reasons["<line 11>"] == "empty id in manifest"
    assert reasons["good2"] == "empty text in manifest"
    assert reasons["shared"] == "id shared by 2 different texts"
    assert reasons["good"] == "duplicate manifest row"
    assert not marker.exists(), "a pickled payload in a feature file ran"
    with caplog.at_level("WARNING", logger=tsw.logger.name):
        tsw.report_dataset(dataset, tmp_path / "m.tsv")
    summary = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(summary) == 1 and summary[0].startswith("data: skipped 12 rows/clips") and "1 missing feature file" in summary[0]


def test_collate_pads_labels_with_minus_100(tmp_path, clips):
    (tmp_path / "m.tsv").write_text("id\tduration\ttext\n" + "".join(
        f"clip{i}\t1.0\t{t}\n" for i, t in enumerate(TEXTS)))
    dataset = tsw.How2SignDataset(tmp_path / "m.tsv", tmp_path / "features")
    tokenizer = tsw.build_tokenizer(TEXTS * 5, vocab_size=40)
    dataset.tokenize(tokenizer, 32)
    batch = tsw.collate_clips([dataset[0], dataset[1]])
    lengths = dataset.label_lengths[:2].tolist()
    assert min(lengths) < max(lengths) <= dataset.label_ids.shape[1]
    assert batch["labels"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths):] == -100).all()
    assert (batch["labels"][short, :min(lengths)] >= 0).all()
    assert batch["labels"][0, lengths[0] - 1] == tokenizer.eos_token_id


def test_pt_clips_load_as_a_tensor_or_a_features_dict(tmp_path, clips):
    folder = tmp_path / "pt"
    folder.mkdir()
    torch.save(torch.from_numpy(clips["clip0"]), folder / "clip0.pt")
    torch.save({"features": torch.from_numpy(clips["clip1"]), "fps": 24}, folder / "clip1.pt")
    torch.save({"something_else": torch.zeros(3, 8)}, folder / "clip2.pt")
    (tmp_path / "m.tsv").write_text("id\tduration\ttext\n" + "".join(
        f"clip{i}\t1.0\t{t}\n" for i, t in enumerate(TEXTS)))
    dataset = tsw.How2SignDataset(tmp_path / "m.tsv", folder)
    assert dataset.ids == ["clip0", "clip1"]
    assert torch.allclose(dataset.clip_means[1], torch.from_numpy(clips["clip1"].mean(0)), atol=1e-6)
    assert dict(dataset.skipped)["clip2"].startswith("unreadable feature file (expected a tensor")
