"""A :class:`CheckedSlurm` job as its sbatch script: the packaged template ``resources/slurm/train.sbatch`` with
the job's directives, process count and command filled in (shell-quoted here)."""

from __future__ import annotations

import shlex
from functools import cache
from importlib import resources
from typing import Any

from tunesmith.launch.cluster_env import SLURM_PORT_BASE, SLURM_PORT_SPAN
from tunesmith.launch.slurm.check import CheckedSlurm

TEMPLATE = ("resources", "slurm", "train.sbatch")


@cache
def _template() -> Any:
    import jinja2

    text = resources.files("tunesmith").joinpath(*TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(
        autoescape=False,  # a shell script: values are shell-quoted before they go in
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.from_string(text)


def directives(job: CheckedSlurm) -> list[str]:
    """The ``#SBATCH`` options, in the order the script lists them."""
    q = shlex.quote
    found = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={job.cpus_per_task}",
    ]
    if job.gpus_per_node > 0:
        found.append(f"--gres=gpu:{job.gpus_per_node}")
    for option, value in (("partition", job.partition), ("time", job.time), ("mem", job.mem)):
        if value:
            found.append(f"--{option}={value}")
    return [
        *found,
        f"--chdir={q(str(job.workdir))}",
        f"--output={q(str(job.log_path))}",
        f"--error={q(str(job.log_path))}",  # one file: a traceback lands next to the progress it interrupts
        *job.sbatch_args,
    ]


def render(job: CheckedSlurm) -> str:
    """The sbatch script of ``job`` (its mesh, when checked, as a comment under the first line's)."""
    script = _template().render(
        script_path=shlex.quote(str(job.script_path)),
        directives=directives(job),
        port_base=SLURM_PORT_BASE,
        port_span=SLURM_PORT_SPAN,
        procs=job.procs,
        rendezvous=job.rendezvous,
        train_command=" ".join(shlex.quote(word) for word in job.train_command),
    )
    if not job.mesh:
        return script
    shebang, comment, rest = script.split("\n", 2)
    return "\n".join([shebang, comment, f"# {job.mesh}", rest])
