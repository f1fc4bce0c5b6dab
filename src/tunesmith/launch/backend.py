"""What ``tunesmith jobs`` asks of a launch back-end (Slurm, Kubernetes): one small interface.

Each back-end is a package with the same five steps, one module each::

    options.py   what the user asked (a dataclass) and the command-line arguments that fill it
    check.py     validation: one sentence per mistake, and a frozen Checked... object, all that render reads
    render.py    the checked job as text or objects (an sbatch script; a ConfigMap and a PyTorchJob)
    submit.py    talking to the scheduler: submit, then status, logs and cancel (a :class:`JobBackend`)
    commands.py  the argparse wiring of ``tunesmith launch <back-end>``
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class LogRequest:
    """Which log ``jobs logs`` wants: a replica and its index (for jobs with several kinds of pod), the last
    ``tail`` lines, and whether to keep following it."""

    replica: str | None = None
    index: int = 0
    tail: int | None = None
    follow: bool = False


class JobBackend(Protocol):
    """Following jobs that ``tunesmith launch`` submitted; every method returns what the command prints."""

    def list_jobs(self) -> str:
        """The jobs there are, one line each."""
        ...

    def status(self, name: str) -> str:
        """The state of one job."""
        ...

    def logs(self, name: str, request: LogRequest) -> Iterator[str]:
        """The job's log, in chunks as they come."""
        ...

    def delete(self, name: str) -> str:
        """Stop the job and remove what launching it created; say what was done."""
        ...
