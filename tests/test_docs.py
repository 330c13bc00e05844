"""The user documentation stays usable: every repository path that README.md and docs/*.md name exists, and
docs/PERFORMANCE.md stays short. Pure file reading, no imports of the package."""

import fnmatch
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dailymae_jax"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MAX_PERFORMANCE_LINES = 250

# Where a reference is looked for: paths from the repository root, or module paths inside the package as
# docs/DESIGN.md writes them (`data/loader.py`, `train/`).
ROOT_DIRS = ("docs", "tools", "configs", "tests", "examples", "dailymae_jax", ".ci")
PACKAGE_DIRS = tuple(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
SOURCE_SUFFIXES = (".py", ".md", ".c", ".h", ".sh", ".ipynb", ".toml")
# What .gitignore keeps for the tools' and the build's outputs: top-level folders (data/sample/, runs/demo/, build/)
# and file patterns (*.beton, *.so). A reference to one names an output, not a file of the repository, unless it
# names source code.
IGNORED = [line.strip() for line in (REPO / ".gitignore").read_text().splitlines()]
OUTPUT_DIRS = tuple(line.strip("/") for line in IGNORED if line.startswith("/") and line.endswith("/"))
OUTPUT_PATTERNS = tuple(line for line in IGNORED if line.startswith("*") and "/" not in line)


def repository_basenames() -> set[str]:
    """Names of the files and folders under the repository's own top-level folders, and its top-level files."""
    names = {p.name for p in REPO.iterdir() if p.is_file()}
    for top in ROOT_DIRS:
        names |= {p.name for p in (REPO / top).rglob("*") if "__pycache__" not in p.parts}
    return names


def candidates(text: str) -> list[str]:
    """Words of the text that name a repository path: under a top-level or package folder, or a source file."""
    found = [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)\)", text)  # markdown links
             if not m.group(1).startswith(("http://", "https://", "#", "mailto:"))]
    for word in re.split(r"[\s`]+", text):
        word = word.split("=")[-1].split("::")[0].split("#")[0]
        word = word.strip("\"'()[]{}<>,;:!?*|").rstrip(".").strip("\"'()[]{}<>,;:!?*|")
        if not word or word.startswith(("/", "~", "$", "http", "-")):
            continue
        first = word.split("/")[0]
        if "/" in word and (first in ROOT_DIRS or first in PACKAGE_DIRS):
            found.append(word)
        elif word.endswith(SOURCE_SUFFIXES) and re.fullmatch(r"[\w./-]+", word):
            found.append(word)
    return found


def resolves(reference: str, basenames: set[str]) -> bool:
    path = reference.rstrip("/")
    if any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern) for pattern in OUTPUT_PATTERNS):
        return True
    if "/" not in reference:
        return path in basenames
    options = [REPO / path, PACKAGE / path]
    if not path.endswith(SOURCE_SUFFIXES):  # `train/loop.TrainLoop`: a module and a name in it
        head, _, tail = path.rpartition("/")
        options.append(PACKAGE / head / (tail.split(".")[0] + ".py"))
        options.append(REPO / head / (tail.split(".")[0] + ".py"))
    if any(option.exists() for option in options):
        return True
    # An output folder's contents (data/sample/train.beton) are not in the repository; its source files are.
    return path.split("/")[0] in OUTPUT_DIRS and not path.endswith(SOURCE_SUFFIXES)


def test_every_path_the_docs_name_exists():
    basenames = repository_basenames()
    missing = [f"{doc.relative_to(REPO)}: {ref}" for doc in DOCS for ref in candidates(doc.read_text())
               if not resolves(ref, basenames)]
    assert not missing, "paths named in the docs that are not in the repository:\n" + "\n".join(missing)


def test_the_checker_catches_a_missing_path():
    basenames = repository_basenames()
    refs = candidates("see `docs/nowhere/` and docs/MISSING.md, [x](tools/nope.py), `--config=configs/mae_demo.py`, "
                      "`data/loader.py`, data/sample/train.beton, `util/absent.py`")
    assert [r for r in refs if not resolves(r, basenames)] == [
        "tools/nope.py", "docs/nowhere/", "docs/MISSING.md", "util/absent.py"]


def test_performance_doc_is_short():
    lines = len((REPO / "docs" / "PERFORMANCE.md").read_text().splitlines())
    assert lines <= MAX_PERFORMANCE_LINES, f"docs/PERFORMANCE.md has {lines} lines (at most {MAX_PERFORMANCE_LINES})"
