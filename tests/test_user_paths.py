"""The paths users hit, not stand-ins: the default beam search for every decoder family, a frame-store build
killed by SIGKILL, a disk that fills while the store is written, and bf16 autocast."""

import csv
import errno
import importlib.util
import signal
import subprocess
import sys
import time

import pytest
import torch

import tiny
from conftest import ROOT, SUBPROCESS_ENV, quick_flags, tsw

FAMILIES = {"t5": [], "nllb": ["--target_lang", "eng_Latn"], "bart": [], "mt5": [], "mbart": ["--target_lang", "en_XX"]}


def read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def without_beam_flag(flags):
    """quick_flags decodes greedily; the default beam search (4 beams) instead."""
    i = flags.index("--num_beams")
    return flags[:i] + flags[i + 2:]


@pytest.fixture(scope="module")
def family_decoders(project_template, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("families")
    tokenizer = AutoTokenizer.from_pretrained(project_template["root"] / "t5-small")
    return {family: tiny.build_tiny_seq2seq(tokenizer, folder / family, family, d_model=64) for family in FAMILIES}


@pytest.mark.parametrize("family,lora", [*((f, False) for f in FAMILIES), ("bart", True)])
def test_predict_reproduces_training_with_the_default_beam_search(project, family_decoders, family, lora):
    if lora and importlib.util.find_spec("peft") is None:
        pytest.skip("LoRA needs peft (in tests/requirements.txt)")
    out = project / f"{family}{'_lora' if lora else ''}"
    flags = without_beam_flag(quick_flags(project, out, "--t5_model", str(family_decoders[family]), "--epochs", "1",
                                          "--report_to", "none", *FAMILIES[family], *(["--lora_rank", "4"] if lora else [])))
    assert tsw.main(flags) == 0
    assert torch.load(out / "best_model.pt")["args"]["num_beams"] == 4 == tsw.DECODING_DEFAULTS["num_beams"]
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features", str(project / "features/val"),
                     "--device", "cpu"]) == 0
    assert [(r["id"], r["prediction"]) for r in read_tsv(out / "predictions.tsv")] == \
           [(r["id"], r["prediction"]) for r in read_tsv(out / "best_predictions.tsv")]


BUILDER = """
import sys, time
sys.path.insert(0, {root!r})
import train_sonar_with_t5 as tsw
real = tsw.scan_file
def slow(*args, **kwargs):
    time.sleep(0.2)                      # a slow Drive: the kill lands in the middle of the build
    return real(*args, **kwargs)
tsw.scan_file = slow
tsw.How2SignDataset({manifest!r}, {features!r}, cache_dir={cache!r}, io_threads=1)
"""


def test_a_store_build_killed_by_sigkill_is_cleared_and_rebuilt(project, tmp_path):
    cache = tmp_path / "cache"
    script = BUILDER.format(root=str(ROOT), manifest=str(project / "manifests/train.tsv"),
                            features=str(project / "features/train"), cache=str(cache))
    process = subprocess.Popen([sys.executable, "-c", script], env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        building = list((cache / "frames").glob(".*.building-*")) if (cache / "frames").is_dir() else []
        if building and (building[0] / "frames.f16").is_file() and (building[0] / "frames.f16").stat().st_size:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    left = list((cache / "frames").iterdir())
    assert any(".building-" in p.name for p in left)                     # what the kill left behind ...
    assert not any((p / "meta.json").is_file() for p in left)             # ... looks like no store
    rebuilt = tsw.How2SignDataset(project / "manifests/train.tsv", project / "features/train", cache_dir=cache)
    assert len(rebuilt) == 48 and rebuilt.store is not None
    left = list((cache / "frames").iterdir())
    assert not any(".building-" in p.name for p in left)                  # the leftover cleared
    assert sum((p / "meta.json").is_file() for p in left) == 1


def test_a_disk_that_fills_while_the_store_is_written_is_one_line(project, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')                  # an earlier run's output
    real, written = tsw.FrameStoreBuilder.keep, []

    def fills(self, *args):
        written.append(1)
        if len(written) == 20:           # the up-front check passed; the disk fills during the build
            self.handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return real(self, *args)

    monkeypatch.setattr(tsw.FrameStoreBuilder, "keep", fills)
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--cache_dir", str(tmp_path / "cache"))) == 2
    printed = capsys.readouterr().out
    errors = [line for line in printed.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disk full while building the frame store" in errors[0] and "--cache_dir" in errors[0]
    assert "Traceback" not in printed and (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert not [p for p in (tmp_path / "cache" / "frames").iterdir() if p.is_dir()]   # nothing half-built left


def test_training_evaluation_and_predict_under_bf16_autocast(project, monkeypatch):
    """What --precision auto picks on an A100 (bf16 autocast), on the CPU: a dtype mismatch in our own
    modules shows here too."""
    monkeypatch.setattr(tsw, "autocast_for", lambda device, precision: torch.autocast("cpu", dtype=torch.bfloat16))
    out = project / "bf16"
    assert tsw.main(quick_flags(project, out, "--epochs", "1")) == 0
    assert len(read_tsv(out / "best_predictions.tsv")) == 12
    assert tsw.main(["--predict", "--checkpoint", str(out / "best_model.pt"), "--features", str(project / "features/val"),
                     "--device", "cpu"]) == 0
    assert len(read_tsv(out / "predictions.tsv")) == 12


@pytest.mark.parametrize("gpu, capability, asked, chosen, warns", [
    ("Tesla T4", (7, 5), "auto", "fp32", None),                 # Colab's free GPU: bf16 only by emulation
    ("NVIDIA A100-SXM4-40GB", (8, 0), "auto", "bf16", None),
    ("NVIDIA H100 80GB HBM3", (9, 0), "auto", "bf16", None),
    ("Tesla T4", (7, 5), "bf16", "bf16", "bf16 is emulated there and runs slower than fp32"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16", "bf16", None),
    ("Tesla T4", (7, 5), "fp32", "fp32", None),
])
def test_precision_follows_what_the_gpu_runs_natively(monkeypatch, caplog, gpu, capability, asked, chosen, warns):
    """--precision by the device's reported compute capability, not by torch.cuda.is_bf16_supported(), which
    says yes on a T4 (emulation)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    tsw.logger.propagate = True
    with caplog.at_level("WARNING", logger=tsw.logger.name):
        precision, why = tsw.resolve_precision(asked, torch.device("cuda"))
    assert precision == chosen and gpu in why and f"{capability[0]}.{capability[1]}" in why
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert (warns in warnings[0] and len(warnings) == 1) if warns else not warnings


def test_fp16_with_a_t5_decoder_warns_once_before_training_and_the_guard_names_it(project, monkeypatch, capsys):
    monkeypatch.setattr(tsw, "resolve_precision", lambda precision, device: ("fp16", "--precision fp16 on a GPU"))
    out = project / "fp16"
    assert tsw.main(quick_flags(project, out, "--epochs", "1", "--precision", "fp16")) == 0
    log = (out / "train.log").read_text()
    assert log.count("--precision fp16 with a T5-family decoder") == 1 and "Precision: fp16" in log
    assert log.index("T5-family decoder") < log.index("Training 1 epochs")       # before training starts
    monkeypatch.setattr(tsw.Trainer, "optimizer_step", lambda self: False)    # every step non-finite
    capsys.readouterr()
    assert tsw.main(quick_flags(project, project / "diverged", "--epochs", "1", "--precision", "fp16",
                                "--batch_size", "1", "--max_bad_steps", "1")) == 2      # fp16 allows 10x the bad steps
    error = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "fp16 overflows easily" in error[0] and "bf16" in error[0]
