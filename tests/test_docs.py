"""The docs say what the tool does: docs/flags.md is the parser's, every flag of --help is in it, and
the README opens with the two commands CI runs."""

import re
import subprocess
import sys

from conftest import ROOT, SUBPROCESS_ENV, tsw

sys.path.insert(0, str(ROOT / "docs"))
import make_flags  # noqa: E402


def test_flags_page_is_generated_from_the_parser():
    """docs/flags.md equals what docs/make_flags.py writes now: a flag added, removed or given another
    default without rerunning it fails here."""
    assert (ROOT / "docs" / "flags.md").read_text() == make_flags.render(), "rerun: python docs/make_flags.py"


def test_every_flag_of_help_is_on_the_flags_page_with_its_default():
    printed = subprocess.run([sys.executable, str(ROOT / "train_sonar_with_t5.py"), "--help"], env=SUBPROCESS_ENV,
                             capture_output=True, text=True, timeout=120).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])", printed)) - {"--help"}
    page = (ROOT / "docs" / "flags.md").read_text()
    documented = dict(re.findall(r"^\| `(--[a-z0-9_]+)`[^|]*\| `([^`]*)` \|", page, flags=re.M))
    missing = sorted(flag for flag in flags if f"`{flag}`" not in page)
    assert len(flags) > 60 and not missing, missing
    for action in tsw.build_parser()._actions:
        for name in action.option_strings:
            if name in documented:
                assert documented[name] == make_flags.default_text(action), name


def test_readme_opens_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```\n(.*?)\n```", readme, flags=re.S | re.M)
    assert blocks[0].startswith("python3 -m venv .venv") and blocks[0].endswith("python train_sonar_with_t5.py --demo")
    assert "\n" not in blocks[0] and "\n" not in blocks[1]
    assert blocks[1] in (ROOT / ".ci" / "run").read_text()          # CI runs the README's test command
    assert len(readme.splitlines()) <= 250


def test_user_docs_speak_of_the_tool_not_of_our_work():
    words = re.compile(r"\b(this|last|previous|next|earlier) (round|session|stop)\b|\bthis round\b", re.I)
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [f"{page.name}: {match.group(0)}" for page in pages for match in words.finditer(page.read_text())]
    assert not found, found
