"""Writes docs/flags.md from train_sonar_with_t5.py's own parser: every flag, grouped as --help groups them,
with its default and help. Rerun it after changing a flag (tests/test_docs.py fails until then):

    python docs/make_flags.py
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_sonar_with_t5 as tsw  # noqa: E402


def default_text(action):
    """The default as a command line would give it."""
    if action.dest == "device":
        return "cuda where available, else cpu"
    if isinstance(action, argparse._StoreTrueAction) or action.default is None:
        return "off" if isinstance(action, argparse._StoreTrueAction) else "none"
    if isinstance(action.default, bool):
        return "on" if action.default else "off"
    if isinstance(action.default, list):
        return " ".join(map(str, action.default))
    return str(action.default)


def flag_rows(parser):
    """(group title, [(flags, default, help), ...]) in the parser's order."""
    for group in parser._action_groups:
        rows = []
        for action in group._group_actions:
            if action.help == argparse.SUPPRESS or "--help" in action.option_strings:
                continue
            names = " / ".join(f"`{name}`" for name in action.option_strings)
            help_text = (action.help or "") % {"default": action.default, "prog": parser.prog}
            choices = f" (one of: {', '.join(map(str, action.choices))})" if action.choices else ""
            text = (help_text + choices).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            rows.append((names, default_text(action), text))
        if rows:
            yield group.title, rows


def render():
    parser = tsw.build_parser()
    lines = ["# Flags", "", "Every flag of `python train_sonar_with_t5.py --help`, grouped as `--help` groups them, with its",
             "default. Generated from the parser by `python docs/make_flags.py`: do not edit by hand.", ""]
    for title, rows in flag_rows(parser):
        lines += [f"## {title}", "", "| flag | default | what it does |", "|---|---|---|"]
        lines += [f"| {names} | `{default}` | {text} |" for names, default, text in rows]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    (ROOT / "docs" / "flags.md").write_text(render())
    print(f"wrote {ROOT / 'docs' / 'flags.md'}")
