"""A drop-in for the original module: its call signatures, T5 v1.1 (untied head), one-line errors."""

import errno
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import tiny
from conftest import quick_flags, tsw


def demo_model(project_template, **options):
    return tsw.SONARwithT5(project_template["encoder"], str(project_template["t5"]), True, "cpu", **options)


# -- 1. the original call signatures ---------------------------------------------------------


def test_original_forward_signatures(project_template):
    """model(features, target_texts) -> loss; model(features) -> sentences; zero frames stay out of the mean."""
    torch.manual_seed(0)          # an untrained model: whether its sentences are empty depends on its weights
    model = demo_model(project_template)
    dataset = tsw.How2SignDataset(project_template["root"] / "manifests/val.tsv",
                                  project_template["root"] / "features/val")
    frames = [dataset.frames(i) for i in range(4)]
    texts = dataset.texts[:4]
    padded = torch.stack([F.pad(f, (0, 0, 0, 300 - len(f))) for f in frames])     # the original collate
    model.eval()
    loss = model(padded, texts)
    assert loss.dim() == 0 and loss > 0
    unpadded = tsw.collate_clips([dataset[i] for i in range(4)])            # the trainer's batch dict
    encoded = model.tokenizer(texts, max_length=128, truncation=True, padding=True, return_tensors="pt")
    unpadded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    assert torch.allclose(loss, model(unpadded)[0], atol=1e-5)              # same loss as the batch path
    model.train()
    model(padded, texts).backward()
    assert model.expander.grad is not None and model.expander.grad.abs().sum() > 0
    model.eval()
    sentences = model(padded)
    assert isinstance(sentences, list) and len(sentences) == 4 and all(isinstance(s, str) for s in sentences)
    short = model(padded, max_length=2)
    assert all(len(s.split()) <= 2 for s in short) and short != sentences   # at most 2 new tokens
    assert model(padded[:, :200]) == sentences                               # cut padding: same clips


def test_original_constructor_order_and_max_samples(project_template):
    root = project_template["root"]
    ours = tsw.How2SignDataset(root / "manifests/val.tsv", root / "features/val")
    original = tsw.How2SignDataset(root / "features/val", root / "manifests/val.tsv")   # features first
    assert original.ids == ours.ids and torch.equal(original.clip_means, ours.clip_means)
    assert tsw.How2SignDataset(str(root / "features/val"), str(root / "manifests/val.tsv"), max_samples=5).ids \
        == ours.ids[:5]
    batch = next(iter(DataLoader(original, batch_size=3, collate_fn=tsw.collate_fn)))   # the original batches
    assert set(batch) == {"video_ids", "features", "texts"}
    assert batch["features"].shape == (3, 300, 64) and batch["video_ids"] == ours.ids[:3]
    assert torch.allclose(batch["features"][0, : int(ours.lengths[0])].mean(0), ours.clip_means[0], atol=1e-3)
    assert (batch["features"][0, int(ours.lengths[0]):] == 0).all()


# -- 2. T5 v1.1 / flan-t5: an output head of its own -----------------------------------------


@pytest.fixture(scope="module")
def untied_project(project_template, tmp_path_factory):
    """The demo project with a tiny T5 v1.1-style model (gated-GELU, untied lm_head) as ./t5-small."""
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("untied") / "project"
    shutil.copytree(project_template["root"], root)
    shutil.rmtree(root / "t5-small")
    tiny.build_untied_t5(AutoTokenizer.from_pretrained(project_template["t5"]), root / "t5-small")
    return root


def test_untied_t5_stays_untied(untied_project):
    t5, _ = tsw.load_decoder(untied_project / "t5-small")
    assert tsw.is_untied(t5) and not tsw.scales_decoder_output(t5.config)
    assert t5.config.feed_forward_proj == "gated-gelu"
    assert not torch.equal(t5.lm_head.weight, t5.shared.weight)
    config = tsw.portable_config(t5)
    # a config written by transformers 4.x (tie_word_embeddings False) and one by 5.x (tied + no scaling)
    for saved in ({**config, "tie_word_embeddings": False, "scale_decoder_outputs": None},
                  {**config, "tie_word_embeddings": True, "scale_decoder_outputs": False}):
        saved = {k: v for k, v in saved.items() if v is not None}
        rebuilt = tsw.decoder_from_config(saved)
        assert tsw.is_untied(rebuilt) and not tsw.scales_decoder_output(rebuilt.config)


@pytest.mark.parametrize("untied", [False, True])
def test_loss_equals_t5s_own_loss(project_template, untied_project, untied):
    """Our loss (vocabulary head only on target positions) equals T5's own cross-entropy, tied or not."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration
    folder = untied_project / "t5-small" if untied else project_template["t5"]
    model = tsw.SONARwithT5(project_template["encoder"], device="cpu",
                            decoder=T5ForConditionalGeneration.from_pretrained(folder),
                            tokenizer=AutoTokenizer.from_pretrained(folder)).eval()
    assert tsw.is_untied(model.t5) == untied
    dataset = tsw.How2SignDataset(project_template["root"] / "manifests/val.tsv",
                                  project_template["root"] / "features/val")
    dataset.tokenize(model.tokenizer, 32)
    batch = tsw.collate_clips([dataset[i] for i in range(5)])
    assert (batch["labels"] == -100).any()              # padding present
    ours, tokens = model(batch)
    memory, mask = model.decoder_memory(batch)      # the encoder's output, then the frames beside it
    reference = model.t5(encoder_outputs=tsw.encoder_output(memory), attention_mask=mask, labels=batch["labels"]).loss
    assert torch.allclose(ours, reference, atol=1e-5)
    assert tokens == (batch["labels"] != -100).sum()


def test_untied_model_predicts_from_its_checkpoint_alone(untied_project, tmp_path):
    out = untied_project / "run"
    assert tsw.main(quick_flags(untied_project, out, "--epochs", "3")) == 0
    saved = torch.load(out / "best_model.pt")
    head, embedding = saved["model_state_dict"]["decoder.t5.lm_head.weight"], saved["model_state_dict"]["decoder.t5.shared.weight"]
    assert not torch.equal(head, embedding)
    exported = json.loads((out / "t5_export/config.json").read_text())
    assert exported["tie_word_embeddings"] is False                     # 4.x reads this one
    tokenizer_class = json.loads((out / "t5_export/tokenizer_config.json").read_text()).get("tokenizer_class")
    assert tokenizer_class != "TokenizersBackend"                       # a 5.x-only name 4.x cannot load
    model = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt")
    assert tsw.is_untied(model.t5) and torch.equal(model.t5.lm_head.weight, head)
    moved = tmp_path / "laptop"
    shutil.copytree(out, moved)
    hidden = untied_project / "t5-hidden"
    (untied_project / "t5-small").rename(hidden)
    try:
        assert tsw.main(["--predict", "--checkpoint", str(moved / "best_model.pt"), "--features",
                         str(untied_project / "features/val"), "--device", "cpu"]) == 0
    finally:
        hidden.rename(untied_project / "t5-small")
    predicted = dict(line.split("\t") for line in (moved / "predictions.tsv").read_text().splitlines()[1:])
    evaluated = {r.split("\t")[0]: r.split("\t")[2] for r in (out / "best_predictions.tsv").read_text().splitlines()[1:]}
    assert predicted == evaluated


# -- 3. one line, never a traceback ----------------------------------------------------------


def one_error_line(capsys):
    printed = capsys.readouterr().out
    errors = [line for line in printed.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in printed, printed[-2000:]
    return errors[0]


def test_excel_manifests_are_read(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "features").mkdir()
    for name in ("a", "b", "c"):
        np.save(tmp_path / "features" / f"{name}.npy", rng.normal(size=(4, 8)).astype(np.float32))
    (tmp_path / "bom.tsv").write_bytes("id\tduration\ttext\r\na\t1.0\tFirst one.\r\nb\t1.0\tSecond one.\r\n"
                                       .encode("utf-8-sig"))
    dataset = tsw.How2SignDataset(tmp_path / "bom.tsv", tmp_path / "features")
    assert dataset.ids == ["a", "b"] and dataset.texts == ["First one.", "Second one."]
    (tmp_path / "latin1.tsv").write_bytes("id\tduration\ttext\na\t1.0\tUn café crème.\nb\t1.0\tNaïve.\n"
                                          "c\t1.0\tPlain.\n".encode("latin-1"))
    messages = []
    handler = tsw.logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    tsw.logger.addHandler(handler)
    try:
        dataset = tsw.How2SignDataset(tmp_path / "latin1.tsv", tmp_path / "features")
    finally:
        tsw.logger.removeHandler(handler)
    assert dataset.texts == ["Un café crème.", "Naïve.", "Plain."]
    assert any("2 line(s) are not UTF-8 (line 2, 3)" in m and "latin1.tsv" in m for m in messages)


def test_a_cut_metrics_line_does_not_stop_resume(project, capsys):
    out = project / "run"
    flags = quick_flags(project, out, "--epochs", "2")
    assert tsw.main(flags) == 0
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 3, "train_loss": 1.2')              # a kill in the middle of a line
    capsys.readouterr()
    flags[flags.index("--epochs") + 1] = "3"
    assert tsw.main(flags + ["--resume"]) == 0
    assert "line 3 is not complete JSON" in capsys.readouterr().out
    assert [m["epoch"] for m in tsw.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_foreign_checkpoints_are_one_line(project, tmp_path, capsys):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert tsw.main(["--predict", "--checkpoint", str(tmp_path / "foreign.pt"), "--features", "features/val"]) == 2
    assert "not a model checkpoint of this tool" in one_error_line(capsys)
    out = project / "run"
    flags = quick_flags(project, out, "--epochs", "1")
    assert tsw.main(flags) == 0
    last = torch.load(out / "last.pt")
    del last["scheduler_state_dict"]
    torch.save(last, out / "last.pt")
    assert tsw.main(flags + ["--resume"]) == 2
    assert "lacks scheduler_state_dict" in one_error_line(capsys)
    newer = torch.load(out / "best_model.pt")
    newer["model_state_dict"]["_extra_state"]["format"] = tsw.CHECKPOINT_FORMAT + 1
    torch.save(newer, tmp_path / "newer.pt")
    assert tsw.main(["--predict", "--checkpoint", str(tmp_path / "newer.pt"), "--features", "features/val"]) == 2
    assert "saved by a newer version" in one_error_line(capsys)


def test_checkpoints_of_an_earlier_version_are_refused_in_one_line(project, tmp_path, capsys):
    """A state dict without this version's configuration (the previous format: options in uint8 buffers,
    no `_extra_state`) is refused by its format number: by --predict, --resume and Cell 7's load_state_dict."""
    out = project / "run"
    flags = quick_flags(project, out, "--epochs", "1")
    assert tsw.main(flags) == 0
    for name in ("best_model.pt", "last.pt"):       # as the previous version wrote them
        checkpoint = torch.load(out / name)
        state = checkpoint["model_state_dict"]
        del state["_extra_state"]
        state["model_spec"] = state["decoder_spec"] = torch.zeros(3, dtype=torch.uint8)
        torch.save({**checkpoint, "format": 2}, out / name)
    capsys.readouterr()
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features", "features/val"]) == 2
    line = one_error_line(capsys)
    assert "best_model.pt: saved by an earlier version of this tool; retrain with this one" in line
    assert tsw.main(flags + ["--epochs", "2", "--resume"]) == 2
    assert "last.pt: saved by an earlier version of this tool" in one_error_line(capsys)
    model = tsw.SONARwithT5(str(project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
                            str(project / "t5-small"), device="cpu")
    with pytest.raises(tsw.UserError, match="saved by an earlier version of this tool"):
        model.load_state_dict(torch.load(out / "best_model.pt")["model_state_dict"])


@pytest.mark.parametrize("flags, says", [
    (["--bridge", "guide"], "--bridge was retired: the bridge is always prefix_memory (the guide's single-key bridge collapsed"),
    (["--bridge=prefix"], "--bridge=prefix was retired: the bridge is always prefix_memory"),
    (["--no-frame_attention"], "--no-frame_attention was retired: the model always reads the clip's frames"),
    (["--no-bridge_layernorm"], "--no-bridge_layernorm was retired: the bridge's output is always LayerNorm-scaled"),
    (["--freeze_t5"], "--freeze_t5 was retired: train LoRA adapters instead, which keep the base frozen: --lora_rank 8"),
    (["--frame_summary", "mean"], "--frame_summary was retired: frames alone always learn the attention summary"),
    (["--no-frame_store"], "--no-frame_store was retired: clips are always read once into the frame store"),
    (["--frame_cache_gb", "2"], "--frame_cache_gb was retired: clips are always read once into the frame store"),
    (["--bridge_lr_scale", "10"], "--bridge_lr_scale was retired: set the bridge's rate itself with --bridge_learning_rate"),
    (["--frame_centering"], "--frame_centering was retired: it lost on bench/quality.py"),
    (["--strict"], "--strict was retired: --max_skip_share 0 stops before training on any unusable row or clip"),
    (["--num_workers", "2"], "--num_workers was retired: items come from the memory-mapped frame store"),
    (["--no-group_by_length"], "--no-group_by_length was retired: training batches are always of clips of similar length"),
    (["--bleurt", "lucadiliello/BLEURT-20-D12"], "--bleurt was retired: it was never measured or tested here"),
    (["--max_eval_clips", "100"], "--max_eval_clips was retired: every evaluation decodes every validation clip"),
    (["--word_loss", "1.0"], "--word_loss was retired: every form screened lost BLEU (up to 8.5) on bench/quality.py's"),
])
def test_a_retired_flag_is_one_line_naming_what_replaced_it(project, capsys, flags, says):
    assert tsw.main(quick_flags(project, project / "run", "--epochs", "1", *flags)) == 2
    assert says in one_error_line(capsys)
    assert not (project / "run" / "train.log").exists()           # refused before anything starts


@pytest.mark.parametrize("option, value", [("bridge", "memory"), ("bridge", "guide"), ("frame_summary", "mean"),
                                           ("frame_centering", True), ("frame_attention", False), ("freeze_t5", True),
                                           ("word_loss", 1.0)])
def test_a_checkpoint_of_a_retired_option_is_refused_in_one_line(project, capsys, option, value):
    out = project / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "1")) == 0
    checkpoint = torch.load(out / "best_model.pt")
    checkpoint["model_state_dict"]["_extra_state"]["config"][option] = value   # as that version saved it
    torch.save(checkpoint, out / "best_model.pt")
    capsys.readouterr()
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features",
                     str(project / "features/val"), "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert f"trained with --{option} {value}, which this version no longer has" in line and "retrain" in line
    model = tsw.SONARwithT5(str(project / "checkpoints/sonar_encoder_finetuned/best_encoder.pt"),
                            str(project / "t5-small"), device="cpu")
    with pytest.raises(tsw.UserError, match=f"--{option} {value}, which this version no longer has"):
        model.load_state_dict(checkpoint["model_state_dict"])        # the guide's Cell 7


@pytest.mark.parametrize("where", ["generate", "encoder"])
def test_out_of_memory_outside_the_training_step_is_one_line(project, monkeypatch, capsys, where):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(*(tsw.SONARwithT5, "generate", oom) if where == "generate" else
                        (tsw.SentenceEncoder, "forward", oom))
    assert tsw.main(quick_flags(project, project / "run", "--epochs", "1")) == 2
    line = one_error_line(capsys)
    assert ("while translating: lower --eval_batch_size" if where == "generate" else "while encoding the clips") in line


def test_disk_full_while_saving_keeps_earlier_files(project, monkeypatch, capsys):
    out = project / "run"
    save = torch.save

    def save_until_full(obj, handle):               # the disk fills up while epoch 2's last.pt is written
        if isinstance(obj, dict) and obj.get("train_state", {}).get("epoch") == 2:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, handle)

    monkeypatch.setattr(tsw.torch, "save", save_until_full)
    assert tsw.main(quick_flags(project, out, "--epochs", "3")) == 2
    line = one_error_line(capsys)
    assert "disk full while writing" in line and "--resume" in line
    assert torch.load(out / "last.pt")["train_state"]["epoch"] == 1           # the earlier save is intact
    assert not list(out.glob(".*.tmp"))


def test_flag_and_path_mistakes_are_one_line(project, capsys):
    assert tsw.main(["--device", "gpu", "--output_dir", "x"]) == 2
    assert "--device 'gpu' is not a device" in capsys.readouterr().out
    assert tsw.main(["--train_features", "manifests/train.tsv", "--output_dir", "x"]) == 2
    assert "--train_features manifests/train.tsv is a file" in capsys.readouterr().out
    assert tsw.main(["--predict", "--checkpoint", "x.pt", "--features", "manifests/val.tsv"]) == 2
    assert "--features manifests/val.tsv is a file" in capsys.readouterr().out


def test_predict_with_features_of_another_width(project, tmp_path, capsys):
    out = project / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "1")) == 0
    (tmp_path / "wide").mkdir()
    np.save(tmp_path / "wide" / "clip.npy", np.ones((5, 128), np.float32))
    capsys.readouterr()
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features",
                     str(tmp_path / "wide"), "--device", "cpu"]) == 2
    assert "the clips are 128-d but 64-d features are expected" in one_error_line(capsys)


# -- 4. --predict uses the decoding flags the user typed --------------------------------------


def test_predict_keeps_typed_decoding_flags(project, monkeypatch):
    out = project / "run"
    assert tsw.main(quick_flags(project, out, "--epochs", "1")) == 0          # trained with --num_beams 1
    seen = []
    generate = tsw.SONARwithT5.generate
    monkeypatch.setattr(tsw.SONARwithT5, "generate",
                        lambda self, batch, **kwargs: seen.append(kwargs) or generate(self, batch, **kwargs))
    command = ["--predict", "--checkpoint", str(out / "best_model.pt"), "--features", "features/val"]
    assert tsw.main(command) == 0
    assert {k["num_beams"] for k in seen} == {1} and {k["max_new_tokens"] for k in seen} == {24}
    seen.clear()
    assert tsw.main(command + ["--num_beams", "4"]) == 0                      # the parser's default, typed
    assert {k["num_beams"] for k in seen} == {4} and {k["max_new_tokens"] for k in seen} == {24}
