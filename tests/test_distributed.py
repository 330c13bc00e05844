"""Multi-process runs on jax.distributed: who the processes are, the launcher's pieces, and each process's
share of the data. The runs on real processes live in tests/e2e/test_distributed_runs.py."""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs import mae_b16
from conftest import REPO, cpu_env, main_command, run_command
from dailymae_jax import distributed, rendezvous
from dailymae_jax.config import ConfigError
from tools import launch_local


def config_with(**fields) -> ml_collections.ConfigDict:
    config = mae_b16.get_config()
    with config.unlocked():
        for key, value in fields.items():
            config.distributed[key] = value
    return config


SLURM_STEP = {"SLURM_JOB_ID": "123457", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2",
              "SLURM_STEP_NODELIST": "gpu[007-008],cpu01"}


# --- Who the processes are --------------------------------------------------------------------------------

def test_a_plain_run_is_a_single_process_and_ignores_a_batch_allocation():
    assert distributed.resolve(config_with(), environ={}) == distributed.SINGLE
    # Inside an sbatch script but not launched by srun: no SLURM_STEP_NUM_TASKS, so still one process.
    batch_script = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert distributed.resolve(config_with(), environ=batch_script) == distributed.SINGLE
    assert distributed.resolve(config_with(num_processes=1), environ=SLURM_STEP) == distributed.SINGLE
    assert distributed.resolve(config_with(), environ=dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="1")).multi is False


def test_explicit_config_and_slurm_step():
    explicit = distributed.resolve(config_with(coordinator_address="10.0.0.1:1234", num_processes=3, process_id=2),
                                   environ={})
    assert explicit == distributed.Processes(3, 2, "10.0.0.1:1234", "config")
    assert explicit.multi and not explicit.is_main
    slurm = distributed.resolve(config_with(), environ=SLURM_STEP)
    assert slurm == distributed.Processes(4, 2, f"gpu007:{20000 + 123457 % 10000}", "slurm")
    # A configured address wins over the derived one; the rest still comes from Slurm.
    assert distributed.resolve(config_with(coordinator_address="head:999"),
                               environ=SLURM_STEP).coordinator_address == "head:999"


@pytest.mark.parametrize("nodelist, first", [("node001", "node001"), ("gpu[003-004,7],cpu1", "gpu003"),
                                             ("a-b[01,05-09]", "a-b01"), ("n1,n2", "n1"), ("x[2]", "x2")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert distributed.first_host(nodelist) == first


@pytest.mark.parametrize("fields, expected", [
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, "distributed.process_id 2 must lie in [0, 2)"),
    ({"num_processes": 2, "process_id": 0}, "distributed.coordinator_address '': give host:port"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h"}, "give host:port"),
    ({"num_processes": -1}, "distributed.num_processes -1 must be ≥ 0"),
    ({"heartbeat_timeout": 0}, "distributed.heartbeat_timeout 0 must be a positive"),
])
def test_impossible_values_name_the_field(fields, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        distributed.resolve(config_with(**fields), environ={})


def test_an_odd_share_per_process_is_a_config_error():
    # The crops are keyed by pairs of batch positions: each process's share must start at an even position.
    from configs import mae_demo
    from dailymae_jax.config import validate

    config = mae_demo.get_config()
    config.data.global_batch_size = 6
    validate(config, device_count=2)  # one process: any share will do
    with pytest.raises(ConfigError, match="^data.global_batch_size 6 over 2 processes gives 3 samples per process; "
                                          "allowed: multiples of 4$"):
        validate(config, device_count=2, process_count=2)
    config.data.global_batch_size = 8
    validate(config, device_count=2, process_count=2)


def test_waiting_for_process_0s_data_is_bounded(tmp_path):
    processes = distributed.Processes(2, 1, "h:1", "config")
    start = time.monotonic()
    with pytest.raises(distributed.DistributedError, match="process 1 waited 0 s for .*filesystem all processes"):
        distributed.wait_for_file(tmp_path / "train.beton", processes, timeout=0.2, poll_seconds=0.05)
    assert time.monotonic() - start < 5
    (tmp_path / "train.beton").write_bytes(b"")
    assert distributed.wait_for_file(tmp_path / "train.beton", processes, timeout=0.2) == tmp_path / "train.beton"


def test_bad_distributed_config_is_a_one_line_config_error(tmp_path, sample_beton):
    result = run_command(main_command(tmp_path / "run", f"--config.data.train_path={sample_beton}",
                                      "--config.distributed.num_processes=2", "--config.distributed.process_id=5",
                                      "--config.distributed.coordinator_address=127.0.0.1:1"),
                         check=False, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == ("config error: distributed.process_id 5 must lie in [0, 2) for "
                                                      "distributed.num_processes 2")


JOIN_ALONE = """
import sys
from configs import mae_b16
from dailymae_jax import distributed, main
config = mae_b16.get_config()
config.distributed.initialization_timeout = 3
config.distributed.heartbeat_timeout = 3
try:
    distributed.initialize(distributed.Processes(2, int(sys.argv[1]), sys.argv[2], "config"), config)
except distributed.DistributedError as error:  # what dailymae_jax.main does with it
    main._fail(f"error: {error}", 1, hard=True)
print("joined")
"""


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them; IPv4 for IPv4-mapped ones) of sockets listening
    on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, local_port = local.rsplit(":", 1)
            if state == "0A" and int(local_port, 16) == port:
                found.add(host.removeprefix("0000000000000000FFFF0000"))  # an IPv4-mapped IPv6 address
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from /proc/net")
def test_a_peer_that_never_joins_ends_each_process_with_one_line_and_exit_1():
    """Process 0 alone (its peer never starts) and process 1 alone (no coordinator): each exits 1 with one
    line, not SIGABRT; process 0 listens on the loopback address it was given, nowhere else."""
    ports = [launch_local.free_port(), launch_local.free_port()]
    children = [subprocess.Popen([sys.executable, "-c", JOIN_ALONE, str(pid), f"127.0.0.1:{port}"], cwd=REPO,
                                 env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for pid, port in zip((0, 1), ports)]
    listening = set()
    while children[0].poll() is None:
        listening |= listening_addresses(ports[0])
        time.sleep(0.05)
    assert listening == {"0100007F"}, listening  # 127.0.0.1 only, not 0.0.0.0 or [::]
    for pid, child in enumerate(children):
        out, err = child.communicate(timeout=60)
        assert child.returncode == 1 and "joined" not in out, (child.returncode, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: process {pid} of 2 could not join the run at 127.0.0.1:{ports[pid]} "
                               "within distributed.initialization_timeout=3 s"), err[-2000:]
        assert last.endswith("each with its own process id"), last
        assert ("(process 1 of 2 did not arrive within 3 s)" if pid == 0 else
                f"(no answer from process 0 at 127.0.0.1:{ports[1]} within 3 s)") in last, last


def meet_in_threads(num_processes: int, present: list[int], timeout: float) -> dict[int, str]:
    """Runs rendezvous.meet for the ``present`` process ids in threads; returns each one's outcome."""
    port, outcome = launch_local.free_port(), {}

    def attend(pid):
        try:
            rendezvous.meet("127.0.0.1", port, "127.0.0.1", pid, num_processes, timeout)
            outcome[pid] = "met"
        except rendezvous.RendezvousError as error:
            outcome[pid] = str(error)

    threads = [threading.Thread(target=attend, args=(pid,)) for pid in present]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    return outcome


def test_processes_meet_whatever_order_they_arrive_in():
    assert meet_in_threads(4, [3, 1, 0, 2], timeout=20) == {0: "met", 1: "met", 2: "met", 3: "met"}


def test_a_process_that_never_arrives_is_named_and_the_others_stop():
    outcome = meet_in_threads(4, [0, 1, 3], timeout=1.0)
    assert outcome[0] == "process 2 of 4 did not arrive within 1 s"
    assert outcome[1] == outcome[3] and outcome[1].startswith("process 0 at 127.0.0.1:") and \
        outcome[1].endswith("gave up waiting for the others within 1 s")


def test_a_taken_port_is_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(rendezvous.RendezvousError, match=f"^cannot listen on 127.0.0.1:{port} \\(.*in use"):
            rendezvous.meet("127.0.0.1", port, "127.0.0.1", 0, 2, timeout=1.0)


@pytest.mark.parametrize("address, bound", [
    ("127.0.0.1:5000", "127.0.0.1:5000"), ("10.0.0.7:5000", "10.0.0.7:5000"), ("[::1]:5000", "[::1]:5000"),
    ("localhost:5000", "localhost:5000"), ("no-such-host.invalid:5000", "[::]:5000"),
])
def test_the_coordinator_binds_to_the_address_it_is_given(address, bound):
    assert distributed.bind_address(address) == bound


# --- The launcher's pieces -------------------------------------------------------------------------------

def test_launcher_gives_each_process_its_devices_and_its_id():
    env = launch_local.process_env(4, base={"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=2",
                                            "PATH": "/bin"})
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"
    cmd = launch_local.process_command(["--config=c.py", "--workdir=w"], process_id=1, num_processes=2,
                                       address="127.0.0.1:5")
    assert cmd[1:] == ["-m", "dailymae_jax.main", "--config=c.py", "--workdir=w",
                       "--config.distributed.coordinator_address=127.0.0.1:5",
                       "--config.distributed.num_processes=2", "--config.distributed.process_id=1"]


# --- Data: the same crops whatever the process count -----------------------------------------------------

@pytest.mark.slow  # builds and warms up a loader per process layout
def test_each_process_decodes_its_slice_of_the_single_process_batches(sample_beton):
    """Process p of 2 decodes columns [8p, 8p + 8) of every global batch of 16, pixel for pixel as 1 process."""
    from dailymae_jax.data.loader import EpochOrder, TrainLoader
    from dailymae_jax.data.shard import BatchSharding, make_mesh
    from dailymae_jax.schedule import Stage

    def host_batches(process_index, process_count):
        loader = TrainLoader(sample_beton, stages=(Stage(0, 32, 0.75),), num_workers=2,
                             order=EpochOrder(112, 16, 0, process_index, process_count),
                             sharding=BatchSharding(make_mesh()))
        return [images for images, _ in loader.host_batches(epoch=1, start_step=4)]

    whole = host_batches(0, 1)
    assert len(whole) == 3 and whole[0].shape == (16, 32, 32, 3)
    for p in range(2):
        share = host_batches(p, 2)
        for a, b in zip(whole, share, strict=True):
            np.testing.assert_array_equal(a[8 * p:8 * p + 8], b)
