"""Other decoders through --t5_model: BART, NLLB-style (M2M100 with language codes), mT5; frozen, LoRA."""

import csv
import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch

import tiny
from conftest import ROOT, SUBPROCESS_ENV, quick_flags, tsw

FAMILIES = ("nllb", "bart", "mt5", "mbart")
TARGET_LANG = {"nllb": ["--target_lang", "eng_Latn"], "bart": [], "mt5": [], "mbart": ["--target_lang", "en_XX"]}
HAS_PEFT = importlib.util.find_spec("peft") is not None


@pytest.fixture(scope="session")
def decoders(project_template, tmp_path_factory):
    """Tiny randomly initialised models of each family, with the project's tokenizer (+ language codes)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("decoders")
    tokenizer = AutoTokenizer.from_pretrained(project_template["root"] / "t5-small")
    paths = {family: tiny.build_tiny_seq2seq(tokenizer, folder / family, family, d_model=64) for family in FAMILIES}
    paths["nllb_other"] = tiny.build_tiny_seq2seq(tokenizer, folder / "nllb_other", "nllb", d_model=64, seed=1)
    return paths


def run(*argv):
    return tsw.main([str(a) for a in argv])


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def weights(folder):
    model, _ = tsw.load_decoder(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_predicts_resumes_and_exports(project, decoders, family):
    from transformers import AutoModelForSeq2SeqLM

    out = project / f"out_{family}"
    flags = quick_flags(project, out, "--t5_model", decoders[family], "--report_to", "none", *TARGET_LANG[family])
    assert run(*flags, "--epochs", "1") == 0
    assert run(*flags, "--epochs", "2", "--resume") == 0
    assert [m["epoch"] for m in tsw.read_jsonl(out / "metrics.jsonl")] == [1, 2]

    model = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt")
    assert type(model.decoder.seq2seq).__name__ == {"nllb": "M2M100ForConditionalGeneration", "bart":
                                                  "BartForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
                                                  "mbart": "MBartForConditionalGeneration"}[family]
    if family in ("nllb", "mbart"):   # targets start with the language code; generation is forced to it, drops it
        code = model.tokenizer.convert_tokens_to_ids(TARGET_LANG[family][1])
        assert model.decoder.target_lang_id == code and model.target_ids(["Hi there."])[0][0] == code
    best = read_tsv(out / "best_predictions.tsv")
    assert not any(code in row["prediction"] for row in best for code in ("_Latn", "_XX", "_DE"))
    assert run("--predict", "--checkpoint", out / "best_model.pt", "--features", project / "features/val",
               "--device", "cpu") == 0
    assert [(r["id"], r["prediction"]) for r in read_tsv(out / "predictions.tsv")] == \
           [(r["id"], r["prediction"]) for r in best]

    exported = AutoModelForSeq2SeqLM.from_pretrained(out / "t5_export")
    trained = {k[len("decoder.t5."):]: v for k, v in model.state_dict().items() if k.startswith("decoder.t5.")}
    shared = [k for k in exported.state_dict() if k in trained]
    assert len(shared) >= 0.9 * len(exported.state_dict())
    assert all(torch.equal(exported.state_dict()[k], trained[k]) for k in shared)


@pytest.mark.parametrize("family", ["nllb", "bart", "t5"])
def test_loss_is_the_decoders_own(project, decoders, family):
    """The loss that trains the bridge equals the model's own loss on the same inputs (T5's faster path too):
    its inputs_embeds (BART, NLLB: frames read by its encoder) or its encoder_outputs (T5: frames beside them)."""
    folder = project / "t5-small" if family == "t5" else decoders[family]
    t5, tokenizer = tsw.load_decoder(folder)
    model = tsw.SONARwithT5(None, str(folder), device="cpu", decoder=t5, tokenizer=tokenizer, encoder_dims=(64, 128, 128, 256),
                            feature_dim=64).eval()
    route = model.config.route
    batch = model.batch_from_features(torch.randn(3, 20, 64))
    batch["labels"] = model.labels_from_texts(["Make sure you cut the onion.", "Hi.", "Next we fold the paper."])
    loss, tokens = model.loss(batch)
    if route == "encoder":
        inputs_embeds, mask = model.encoder_inputs(batch)[:2]
        own = model.t5(inputs_embeds=inputs_embeds, attention_mask=mask, labels=batch["labels"]).loss
    else:
        memory, mask = model.decoder_memory(batch)
        own = model.t5(encoder_outputs=tsw.encoder_output(memory), attention_mask=mask, labels=batch["labels"]).loss
    assert torch.allclose(loss, own, atol=1e-5) and int(tokens) == int((batch["labels"] != -100).sum())


def test_the_frame_route_follows_the_decoder_family(project, decoders):
    """Frames beside the encoder output for T5, in the encoder for BART and M2M100 / NLLB (which learned far worse
    beside it, docs/benchmarks/quality.md); a checkpoint of a route its family does not take is refused."""
    for family, resolved in (("t5", "cross_attention"), ("nllb", "encoder"), ("bart", "encoder")):
        folder = project / "t5-small" if family == "t5" else decoders[family]
        t5, tokenizer = tsw.load_decoder(folder)
        model = tsw.SONARwithT5(None, str(folder), device="cpu", decoder=t5, tokenizer=tokenizer,
                                encoder_dims=(64, 128, 128, 256), feature_dim=64)
        assert model.config.route == resolved
        assert (model.bridge.frame_memory is not None) == (resolved == "cross_attention")
        config = model.config.to_dict()
        assert tsw.retired_option({**config, "frame_route": resolved}) is None           # what auto chose
        other = "encoder" if resolved == "cross_attention" else "cross_attention"
        assert tsw.retired_option({**config, "frame_route": other})[0] == f"--frame_route {other}"


def test_bridge_output_matches_the_scale_of_the_encoders_own_tokens(decoders):
    """NLLB multiplies token embeddings by sqrt(d_model) inside its embedding; inputs_embeds are not scaled."""
    t5, tokenizer = tsw.load_decoder(decoders["nllb"])
    ids = torch.arange(len(tokenizer))
    with torch.no_grad():
        own = float(t5.get_encoder().embed_tokens(ids).pow(2).mean().sqrt())
    rows = float(t5.get_input_embeddings().weight.pow(2).mean().sqrt())
    assert tsw.embedding_scale(t5) == pytest.approx(own, rel=0.05)
    assert own == pytest.approx(rows * 64 ** 0.5, rel=0.05)
    model = tsw.SONARwithT5(None, "nllb", device="cpu", decoder=t5, tokenizer=tokenizer, encoder_dims=(64, 128, 128, 256))
    assert float(model.bridge.output_scale) == pytest.approx(own, rel=0.05)
    # frames beside the encoder's output start at the scale of that output (here ~1, after its LayerNorm)
    sentence = tokenizer(["Next we fold the paper and cut along the line."], return_tensors="pt")
    with torch.no_grad():
        output = float(t5.get_encoder()(**sentence)[0].pow(2).mean().sqrt())
    assert tsw.encoder_output_scale(t5) == pytest.approx(output, rel=0.2)


def test_target_language_errors_are_one_line(project, decoders, capsys):
    flags = quick_flags(project, project / "out", "--epochs", "1", "--report_to", "none")
    assert run(*flags, "--t5_model", decoders["nllb"], "--target_lang", "xx_YY") == 2
    error = capsys.readouterr().out.strip().splitlines()[-1]
    assert "xx_YY" in error and "deu_Latn, eng_Latn, fra_Latn" in error
    assert run(*flags, "--t5_model", decoders["bart"], "--target_lang", "eng_Latn") == 2
    assert "has no language codes" in capsys.readouterr().out


def test_a_model_that_is_not_an_encoder_decoder_is_refused(project, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    assert run(*quick_flags(project, project / "out", "--t5_model", tmp_path / "gpt2", "--report_to", "none")) == 2
    assert "is a gpt2 model, not an encoder-decoder" in capsys.readouterr().out


def test_lora_decoder_checkpoints_hold_only_the_trained_parts(project, decoders, capsys):
    out = project / "lora"
    flags = quick_flags(project, out, "--t5_model", decoders["nllb"], "--lora_rank", "4", "--gradient_checkpointing",
                        "--report_to", "none")
    assert run(*flags, "--epochs", "2") == 0
    before = weights(decoders["nllb"])
    model = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt")
    assert model.config.prefix_width == tsw.ADAPTER_PREFIX_DIM == model.bridge.prefix_mlp[0].out_features
    after = {k.replace(".base_layer", ""): v for k, v in model.decoder.seq2seq.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)   # base unchanged
    saved = torch.load(out / "best_model.pt")["model_state_dict"]
    assert all("lora_" in k for k in saved if k.startswith("decoder."))
    trained = sum(v.numel() * v.element_size() for k, v in saved.items() if torch.is_tensor(v))
    assert (out / "best_model.pt").stat().st_size < trained * 1.05 + 200_000    # no decoder weights in the file
    assert model.config.decoder_fingerprint == tsw.weights_fingerprint(tsw.load_decoder(decoders["nllb"])[0])

    assert run("--predict", "--checkpoint", out / "best_model.pt", "--features", project / "features/val",
               "--device", "cpu") == 0
    assert [r["prediction"] for r in read_tsv(out / "predictions.tsv")] == \
           [r["prediction"] for r in read_tsv(out / "best_predictions.tsv")]
    capsys.readouterr()
    assert run("--predict", "--checkpoint", out / "best_model.pt", "--features", project / "features/val",
               "--device", "cpu", "--t5_model", decoders["nllb_other"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert "has other weights" in lines[-1] and "Traceback" not in "".join(lines)
    # --resume checks the base too, and continues
    assert run(*flags, "--epochs", "3", "--resume") == 0
    assert len(tsw.read_jsonl(out / "metrics.jsonl")) == 3


def test_guide_cell7_rebuilds_any_decoder_from_its_checkpoint(project, decoders):
    """Cell 7 builds a default (t5-small) model and loads best_model.pt: a LoRA NLLB-style checkpoint
    brings its decoder (by name) and its bridge width along."""
    out = project / "lora"
    assert run(*quick_flags(project, out, "--t5_model", decoders["nllb"], "--lora_rank", "4", "--epochs", "1",
                            "--report_to", "none")) == 0
    model = tsw.SONARwithT5(sonar_checkpoint="checkpoints/sonar_encoder_finetuned/best_encoder.pt", device="cpu")
    assert type(model.decoder.seq2seq).__name__ == "T5ForConditionalGeneration"
    model.load_state_dict(torch.load(out / "best_model.pt")["model_state_dict"])
    reference = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt")
    assert type(model.decoder.seq2seq).__name__ == "M2M100ForConditionalGeneration"
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, reference.state_dict()[k]) if torch.is_tensor(a) else a == reference.state_dict()[k]
               for k, a in model.state_dict().items())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(project, decoders):
    def step(checkpointing):
        torch.manual_seed(0)
        t5, tokenizer = tsw.load_decoder(decoders["bart"])
        model = tsw.SONARwithT5(None, "bart", device="cpu", decoder=t5, tokenizer=tokenizer, encoder_dims=(64, 128, 128, 256),
                                feature_dim=64, lora_rank=4, gradient_checkpointing=checkpointing).train()
        assert model.decoder.seq2seq.model.encoder.gradient_checkpointing == checkpointing
        batch = model.batch_from_features(torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1)))
        batch["labels"] = model.labels_from_texts(["Cut the onion.", "Fold the paper twice."])
        torch.manual_seed(2)
        loss = model.loss(batch)[0]
        loss.backward()
        assert all(p.grad is None for name, p in model.t5.named_parameters() if "lora_" not in name)
        return loss.detach(), model.bridge.expander.grad.clone()

    plain, checkpointed = step(False), step(True)
    assert torch.allclose(plain[0], checkpointed[0]) and torch.allclose(plain[1], checkpointed[1], atol=1e-6)


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed (tests/requirements.txt installs it)")
@pytest.mark.parametrize("family", ["t5", "nllb"])
def test_lora_adapters_train_the_attention_and_export_merged(project, decoders, family):
    from transformers import AutoModelForSeq2SeqLM

    out = project / "lora"
    folder = project / "t5-small" if family == "t5" else decoders[family]
    assert run(*quick_flags(project, out, "--t5_model", folder, "--lora_rank", "4", "--epochs", "2",
                            "--report_to", "none")) == 0
    saved = torch.load(out / "best_model.pt")["model_state_dict"]
    lora = [k for k in saved if k.startswith("decoder.")]
    assert lora and all("lora_" in k for k in lora)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora} == ({"q", "v"} if family == "t5" else {"q_proj", "v_proj"})
    assert any(saved[k].abs().sum() > 0 for k in lora if "lora_B" in k)      # B starts at zero: it trained
    model = tsw.SONARwithT5.from_checkpoint(out / "best_model.pt")
    base = weights(folder)
    merged = AutoModelForSeq2SeqLM.from_pretrained(out / "t5_export").eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert not all(torch.equal(v, base[k]) for k, v in merged.state_dict().items() if k in base)
    model.eval()
    batch = model.batch_from_features(torch.randn(2, 12, 64))
    inputs_embeds, mask = model.encoder_inputs(batch)[:2]
    labels = model.labels_from_texts(["Cut the onion.", "Fold it."])
    with torch.no_grad():
        assert torch.allclose(model.t5(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels).logits,
                              merged(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels).logits, atol=1e-4)
    assert run("--predict", "--checkpoint", out / "best_model.pt", "--features", project / "features/val",
               "--device", "cpu") == 0
    assert [r["prediction"] for r in read_tsv(out / "predictions.tsv")] == \
           [r["prediction"] for r in read_tsv(out / "best_predictions.tsv")]


def test_lora_without_peft_is_one_line(project, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    assert run(*quick_flags(project, project / "out", "--lora_rank", "4", "--report_to", "none")) == 2
    assert "--lora_rank needs the peft package: pip install peft" in capsys.readouterr().out
    assert not (project / "out" / "last.pt").exists()


def test_torchrun_trains_a_lora_nllb_style_decoder(project, decoders):
    out = project / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train_sonar_with_t5.py"), *map(str, quick_flags(
                   project, out, "--t5_model", decoders["nllb"], "--lora_rank", "4", "--epochs", "1", "--report_to", "none"))]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert all("lora_" in k for k in torch.load(out / "best_model.pt")["model_state_dict"] if k.startswith("decoder."))
    assert len(read_tsv(out / "best_predictions.tsv")) == 12


def test_check_reports_the_decoder_and_its_target_language(project, decoders, capsys):
    assert tsw.main(["--check", "--t5_model", str(decoders["nllb"])]) == 0
    assert "m2m_100, d_model 64, target language eng_Latn (local folder)" in capsys.readouterr().out
    assert tsw.main(["--check", "--t5_model", str(decoders["nllb"]), "--target_lang", "en_XX"]) == 1
    assert "ERR --target_lang en_XX is not a language code of" in capsys.readouterr().out


def test_weights_that_do_not_fit_the_config_are_refused(project, decoders, tmp_path, capsys):
    """A T5 config beside BART weights: before, a random T5 was built and trained in silence."""
    folder = tmp_path / "mixed"
    shutil.copytree(decoders["bart"], folder)
    shutil.copy(project / "t5-small" / "config.json", folder / "config.json")
    assert run(*quick_flags(project, project / "out", "--t5_model", folder, "--report_to", "none")) == 2
    assert "weights are not in its files" in capsys.readouterr().out
