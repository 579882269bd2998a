"""``sandbox ablate --backend ray``: an ablation's runs as Ray tasks, on this machine or across a cluster.

Each run is the same ``sandbox run`` subprocess as with the local backend, started inside a Ray task that
reserves its share of a GPU (Ray points the task's CUDA_VISIBLE_DEVICES at the GPU it was given) and one CPU,
so the cluster runs as many at a time as its GPUs (or, without GPUs, its CPUs) allow. The ablation folder,
its layout, resume and failure handling are the local backend's: the runs write where they always do, and a
failed or lost task is a failed run, retried by the next ``sandbox ablate``.

Without ``--address`` the command starts a Ray on this machine and stops it at the end; with ``--address``
(``HOST:6379``, or ``auto`` for the cluster this machine belongs to) it joins a running cluster
(``ray start --head`` on one node, ``ray start --address HOST:6379`` on the others), whose nodes need this
package installed and the ablation folder on a file system they share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# One run: the `sandbox run` arguments and the log file (an absolute path: the task may run elsewhere).
Job = tuple[list[str], Path]
# launch(arguments, log, gpu, threads) -> exit code, as sandbox.ablate.launch_run; importable on every node.
Launch = Callable[[list[str], Path, "int | None", "int | None"], int]
LOST = -1   # the exit code recorded for a task that Ray lost (its worker or node died)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError('--backend: ray is not installed here (pip install -e ".[ray]")') from None
    return ray


def gpu_share(requested: float | None, cluster_gpus: float) -> float:
    """GPUs each run reserves: as requested, else a whole GPU when the cluster has any, else none."""
    if requested is None:
        return 1.0 if cluster_gpus > 0 else 0.0
    if requested < 0 or requested > max(cluster_gpus, 0):
        raise ValueError(f"--gpus-per-run: expected a number from 0 to the cluster's {cluster_gpus:g} GPU(s), "
                         f"got {requested:g}")
    return requested


def run_on_ray(jobs: list[Job], launch: Launch, *, address: str | None, gpus_per_run: float | None,
               on_finished: Callable[[int], None]) -> None:
    """Run every job as a Ray task; ``on_finished(exit code)`` is called as each one ends, in any order."""
    ray = import_ray()
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    pending = []
    try:
        share = gpu_share(gpus_per_run, ray.cluster_resources().get("GPU", 0))
        # One CPU and one thread per run: the cluster's CPUs are shared out without oversubscription.
        task = ray.remote(launch).options(num_gpus=share, num_cpus=1, max_retries=0)
        logs = {task.remote(arguments, log, None, 1): log for arguments, log in jobs}
        pending = list(logs)
        while pending:
            (done,), pending = ray.wait(pending, num_returns=1)
            try:
                code = ray.get(done)
            except ray.exceptions.RayError as error:   # the worker or its node died: the run failed
                code = LOST
                with open(logs[done], "a") as log:
                    log.write(f"ray: the task was lost ({type(error).__name__})\nexit code: {code}\n")
            on_finished(code)
    finally:
        for reference in pending:   # Ctrl-C or an error: stop the runs still going
            ray.cancel(reference, force=True)
        ray.shutdown()
