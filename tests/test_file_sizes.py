"""No source file grows past what a newcomer reads in one sitting: 450 lines in src/, the scripts and benchmarks/,
900 for a modeling file (one model family, as transformers' modeling_<model>.py files are)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
MAX_MODELING_LINES = 900
CHECKED = [ROOT / "src", ROOT / "benchmarks", *sorted(ROOT.glob("run_*.py"))]


def line_limit(path: Path) -> int:
    return MAX_MODELING_LINES if path.name.startswith("modeling_") else MAX_LINES


def python_files(places: list[Path]) -> list[Path]:
    files = []
    for place in places:
        files.extend([place] if place.is_file() else sorted(place.rglob("*.py")))
    return [path for path in files if "work" not in path.relative_to(ROOT).parts]


def oversized(paths: list[Path]) -> list[str]:
    """``path (lines > limit)`` for every file over its limit."""
    out = []
    for path in paths:
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > line_limit(path):
            out.append(f"{path} ({lines} > {line_limit(path)})")
    return out


def test_no_file_is_over_its_line_limit():
    files = python_files(CHECKED)
    assert len(files) > 50  # the walk found the tree
    assert not oversized(files), "split these files: " + ", ".join(oversized(files))


@pytest.mark.parametrize(
    ("name", "lines", "too_long"),
    [
        ("helpers.py", 450, False),
        ("helpers.py", 451, True),
        ("modeling_cim.py", 900, False),
        ("modeling_cim.py", 901, True),
    ],
)
def test_the_limit_catches_a_file_one_line_over(tmp_path, name, lines, too_long):
    path = tmp_path / name
    path.write_text("x = 1\n" * lines)
    assert bool(oversized([path])) is too_long
