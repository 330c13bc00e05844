"""Config blocks every recipe shares, so that every task reads them with the same fields and defaults."""

import ml_collections


def distributed() -> ml_collections.ConfigDict:
    """Several processes on JAX's multi-controller runtime (docs/DISTRIBUTED.md).

    With num_processes = 0 a run launched by `srun` with several tasks takes all three values from Slurm;
    anything else is one process.
    """
    d = ml_collections.ConfigDict()
    d.coordinator_address = ""  # host:port of process 0; "" = Slurm's first node (or alone)
    d.num_processes = 0  # 0 = from Slurm (SLURM_STEP_NUM_TASKS), else 1
    d.process_id = -1  # -1 = from Slurm (SLURM_PROCID)
    d.initialization_timeout = 300  # s for all processes to join (and to see process 0's sample data)
    # A process silent this long counts as dead and the runtime stops all others: bounds how long a run hangs
    # after a crash or a lost node, at the risk of false alarms if set below a few seconds.
    d.heartbeat_timeout = 100
    d.shutdown_timeout = 300  # s a finished process waits at exit for the others (process 0 writes the summary)
    return d
