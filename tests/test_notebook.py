"""colab.ipynb runs top to bottom on CPU with a tiny model (Drive, pip and magics skipped)."""

import json
import shlex

from conftest import ROOT, tsw

import test_attention_fix  # noqa: E402  (ROOT is on sys.path via conftest)


def shell_command(source):
    """The `!...` command of a cell, continuation lines joined."""
    lines = [line for line in source.replace("\\\n", " ").splitlines() if line.strip().startswith("!")]
    return shlex.split(lines[0].strip()[1:]) if lines else None


def test_notebook_cells_run_in_order(project, capsys):
    notebook = json.loads((ROOT / "colab.ipynb").read_text())
    namespace, ran, skipped = {}, [], []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        command = shell_command(source)
        if "google.colab" in source or source.lstrip().startswith("%") or (command and command[0] == "pip"):
            skipped.append(source.splitlines()[0])
        elif command and command[:2] == ["python", "train_sonar_with_t5.py"]:
            args = command[2:]
            if "--epochs" in args:                     # the same flags, one epoch
                args[args.index("--epochs") + 1] = "1"
            assert tsw.main(args) == 0, f"cell failed: {' '.join(command)}"
            ran.append(" ".join(command[:2]))
        elif command and command[:2] == ["python", "test_attention_fix.py"]:
            assert test_attention_fix.main(command[2:]) == 0
            ran.append(" ".join(command[:2]))
        else:
            assert command is None, f"unexpected shell cell: {source}"
            exec(compile(source, "notebook-cell", "exec"), namespace)
            ran.append("python")
    printed = capsys.readouterr().out
    assert ran.count("python") == 3                  # Cell 3, Cell 7, plots
    assert ran.count("python train_sonar_with_t5.py") == 5   # check, quick test, full run, frames alone, predict
    assert len(skipped) == 4                         # Drive, pip, TensorBoard, download
    assert "✓ features/train (48 feature files)" in printed
    assert "Final Results:" in printed and printed.count("Ground Truth:") == 5
    assert "BLEU-1..4" in printed
    assert (project / "logs/train_attention_final.log").is_file()
    assert (project / "checkpoints/sonar_t5_attention_final/val_predictions.tsv").is_file()
    final = tsw.SONARwithT5.from_checkpoint(project / "checkpoints/sonar_t5_attention_final/best_model.pt")
    assert final.config.uses_encoder                                        # the guide's cells: encoder and frames
    alone = tsw.SONARwithT5.from_checkpoint(project / "checkpoints/sonar_t5_frames_alone/best_model.pt")
    assert not alone.config.uses_encoder and alone.frame_summary is not None
