"""Frames alone (--sonar_checkpoint none): no sentence encoder; a summary learned from the frames takes the
sentence embedding's place, on every path a user takes (train, --check, --predict, Cell 7, --resume, torchrun,
frozen and LoRA decoders)."""

import importlib.util
import json

import pytest
import torch

from conftest import quick_flags, torchrun, tsw


def frames_alone_flags(project, out, *extra):
    flags = quick_flags(project, out, *extra)
    flags[flags.index("--sonar_checkpoint") + 1] = "none"
    return flags


def predictions(path):
    return [tuple(line.split("\t")[:3]) for line in path.read_text().splitlines()[1:]]


def errors_of(printed):
    return [line for line in printed.splitlines() if line.startswith("error:") or line.startswith("  --")]


def test_frames_alone_trains_predicts_as_trained_and_says_no_encoder(project, tmp_path, capsys):
    out = tmp_path / "run"
    flags = frames_alone_flags(project, out, "--epochs", "3")
    assert tsw.main(flags + ["--check"]) == 0
    assert "no sentence encoder (--sonar_checkpoint none)" in capsys.readouterr().out
    assert tsw.main(flags) == 0
    assert "No sentence encoder (--sonar_checkpoint none): frames alone, 64-d" in (out / "train.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["frames_alone"] is True and results["sentence_encoder"] is None
    assert results["args"]["sonar_checkpoint"] is None
    state = torch.load(out / "best_model.pt")["model_state_dict"]
    assert not any(key.startswith("sonar_encoder.") for key in state)
    assert any(key.startswith("frame_summary.") for key in state)
    assert state["_extra_state"]["config"]["encoder_dims"] is None
    best = predictions(out / "best_predictions.tsv")
    assert len(best) == 12 and [i for i, _, _ in best] == [f"demo_val_{n:05d}" for n in range(48, 60)]   # every clip

    # --predict from best_model.pt reproduces the run's predictions exactly
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features", str(project / "features/val"),
                     "--manifest", str(project / "manifests/val.tsv"), "--device", "cpu"]) == 0
    assert [(i, p) for i, p in (line.split("\t") for line in (out / "predictions.tsv").read_text().splitlines()[1:])] \
        == [(i, p) for i, _, p in best]

    # the guide's Cell 7: a model built with the encoder loads the frames-alone state dict and rebuilds itself
    model = tsw.SONARwithT5(sonar_checkpoint=str(project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
                            t5_model_name=str(project / "t5-small"), device="cpu")
    assert model.sonar_encoder is not None
    model.load_state_dict(torch.load(out / "best_model.pt")["model_state_dict"])
    assert model.sonar_encoder is None and isinstance(model.frame_summary, tsw.FrameSummary)
    dataset = tsw.How2SignDataset(project / "manifests/val.tsv", project / "features/val", feature_dim=64)
    batch = tsw.collate_clips([dataset[i] for i in range(4)])
    model.eval()
    again = model.generate(batch, num_beams=1, max_new_tokens=24)
    reference = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt").eval().generate(batch, num_beams=1, max_new_tokens=24)
    assert again == reference


def test_frames_alone_resumes_and_refuses_what_cannot_work(project, tmp_path, capsys):
    out = tmp_path / "run"
    assert tsw.main(frames_alone_flags(project, out, "--epochs", "1")) == 0
    assert tsw.main(frames_alone_flags(project, out, "--epochs", "2", "--resume")) == 0
    assert "Resumed from" in (out / "train.log").read_text()
    assert [m["epoch"] for m in tsw.read_jsonl(out / "metrics.jsonl")] == [1, 2]
    capsys.readouterr()
    cases = (
        (quick_flags(project, out, "--epochs", "3", "--resume"), "trained with no sentence encoder (frames alone)"),
        (quick_flags(project, tmp_path / "two", "--init_from", str(out / "best_model.pt")), "with no sentence encoder"),
        (frames_alone_flags(project, tmp_path / "bad", "--no-freeze_encoder"), "no sentence encoder to train"),
    )
    for flags, text in cases:
        assert tsw.main(flags) == 2
        printed = capsys.readouterr().out
        assert any(text in line for line in errors_of(printed)) and "Traceback" not in printed, printed[-800:]
    with pytest.raises(tsw.UserError, match="needs their width"):
        tsw.SONARwithT5(None, t5_model_name=str(project / "t5-small"), device="cpu")
    model = tsw.SONARwithT5(None, t5_model_name=str(project / "t5-small"), device="cpu", feature_dim=64)
    features = torch.randn(2, 30, 64)
    assert model(features, ["one sentence", "another one"]).requires_grad       # the original tensor API


def test_frames_alone_with_a_lora_decoder(project, tmp_path):
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed")
    out = tmp_path / "run"
    assert tsw.main(frames_alone_flags(project, out, "--epochs", "1", "--lora_rank", "4")) == 0
    model = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt")
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert "frame_summary" in trainable and "bridge" in trainable
    decoder_trainable = [name for name, p in model.named_parameters() if p.requires_grad and name.startswith("decoder.")]
    assert decoder_trainable and all("lora_" in name for name in decoder_trainable)


def test_frames_alone_under_torchrun(project):
    out = project / "ddp"
    result = torchrun(frames_alone_flags(project, out, "--epochs", "1"))
    assert "2 process(es)" in result.stdout and result.stdout.count("No sentence encoder") == 1
    assert len(predictions(out / "best_predictions.tsv")) == 12
    torchrun(frames_alone_flags(project, out, "--epochs", "2", "--resume"))
    assert [m["epoch"] for m in tsw.read_jsonl(out / "metrics.jsonl")] == [1, 2]
