"""The command line itself: --help."""

import sys

from conftest import REPO, run_command


def test_help_lists_the_flags_and_every_recipe():
    result = run_command([sys.executable, "-m", "dailymae_jax.main", "--help"], timeout=120, check=False)
    assert result.returncode in (0, 1), result.stderr[-2000:]  # absl exits 1 after printing the help
    for flag in ("--config", "--workdir"):
        assert flag in result.stdout
    recipes = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py")
    assert recipes and all(name in result.stdout for name in recipes), recipes
