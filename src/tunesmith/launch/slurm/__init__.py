"""``tunesmith launch slurm``: one sbatch script per run, and the job's state, log and cancellation.

The script asks for N nodes with one Slurm task per node; each task runs ``tunesmith train`` once, and that
command starts torchrun with ``NPROC_PER_NODE`` processes on its node. All nodes meet in a c10d rendezvous on
the first host of the allocation, so nobody has to know the node list before the job starts::

    #SBATCH --nodes=N --ntasks-per-node=1 [--gres=gpu:G] ...
    MASTER_ADDR = first host of $SLURM_JOB_NODELIST    MASTER_PORT = 15000 + job id % 15000
    NNODES = $SLURM_NNODES    NPROC_PER_NODE = G    RDZV_ID = $SLURM_JOB_ID (several nodes)
    per task: NODE_RANK = $SLURM_NODEID, RDZV_CONF is_host (node 0), PET_LOCAL_ADDR = the node's NodeAddr
    srun --ntasks-per-node=1 python -m tunesmith.cli train RUN/slurm/config.yaml

The job trains the resolved config written next to the script (what ``launch`` validated, overrides included),
from the folder ``launch`` ran in (relative paths in the config keep their meaning), with the interpreter that
ran ``launch`` (the compute nodes must see it: a shared filesystem, as usual on Slurm). Its output goes to
``output_dir/slurm-<jobid>.out``.

The steps, one module each (the shape of every launch back-end, see :mod:`tunesmith.launch.backend`):
:mod:`.options` (:class:`SlurmOptions`, the command line) → :mod:`.check` (:class:`CheckedSlurm`) →
:mod:`.render` (the script, from the template ``resources/slurm/train.sbatch``) → :mod:`.submit` (sbatch, then
squeue / sacct / scontrol / scancel: :class:`SlurmJobs`); :mod:`.commands` wires them to argparse.
"""

from __future__ import annotations

from tunesmith.launch.slurm import check, render
from tunesmith.launch.slurm.check import CheckedSlurm
from tunesmith.launch.slurm.options import SlurmOptions
from tunesmith.launch.slurm.submit import SlurmJobs, cancel_job, job_logs, job_status, write_job_files

__all__ = [
    "CheckedSlurm",
    "SlurmJobs",
    "SlurmOptions",
    "cancel_job",
    "job_logs",
    "job_status",
    "render_sbatch",
    "write_job_files",
]


def render_sbatch(options: SlurmOptions) -> str:
    """The sbatch script for ``options``, checked first (options → check → render)."""
    return render.render(check.check(options))
