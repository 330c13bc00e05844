"""tools/bench_step_ab.py: its argument errors, its medians and ratios, and both sides' steps built in-process.

The interleaved run itself (one worker process per side) is what docs/PERFORMANCE.md quotes; here the parts it
is made of run on a tiny model.
"""

import pytest

from tools import bench_step_ab

TINY = ["--config.model.size=tiny", "--config.model.depth=1", "--config.model.decoder_width=32",
        "--config.model.decoder_depth=1", "--config.model.decoder_heads=2", "--config.model.dtype=float32"]


@pytest.mark.parametrize("argv, message", [
    (["--sides", "ours", "tf"], "--sides 'tf': allowed: ours, ours@DIR, torch"),
    (["--sides", "torch@/tmp"], "--sides 'torch@/tmp': allowed"),
    (["--sides", "ours", "ours"], "a side is named twice"),
    (["--rounds", "0"], "--rounds 0: must be ≥ 1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_name_the_culprit(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_step_ab.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_checkout_without_our_package_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_step_ab.parse_args(["--sides", "torch", f"ours@{tmp_path}"])
    assert f"{tmp_path} holds no dailymae_jax package" in capsys.readouterr().err


def test_medians_and_ratios_to_the_first_side():
    times = {"ours": {"wall_s": [2.0, 1.0, 9.0], "cpu_s": [4.0, 3.0, 5.0]},
             "torch": {"wall_s": [1.0, 1.0, 1.5], "cpu_s": [2.0, 2.5, 3.0]}}
    summary = bench_step_ab.summarize(["torch", "ours"], times)
    assert summary["median"]["ours"] == {"wall_s": 2.0, "cpu_s": 4.0}
    assert summary["ratio_to_first"]["ours"] == {"wall_s": 2.0, "cpu_s": 4.0 / 2.5}
    assert summary["ratio_to_first"]["torch"] == {"wall_s": 1.0, "cpu_s": 1.0}


@pytest.mark.slow  # two compiled steps: seconds on a quiet machine, minutes on a loaded 2-core one
def test_both_sides_take_timed_steps():
    """Each side's step runs on the batches it built, and every step gets a wall and a CPU time."""
    torch = pytest.importorskip("torch")
    from dailymae_jax.config import load_config_file

    config = load_config_file(str(bench_step_ab.REPO / "configs" / "mae_b16.py"), TINY)
    threads = torch.get_num_threads()
    try:
        sides = [bench_step_ab.build_ours(config, 32, 2, 10),
                 bench_step_ab.build_torch(config, 32, 2, 10, compile=False, threads=1)]
    finally:
        torch.set_num_threads(threads)
    for run in sides:
        times = bench_step_ab.timed_steps(run, 0, 2)
        assert len(times["wall_s"]) == len(times["cpu_s"]) == 2
        assert all(t > 0 for t in times["wall_s"])
