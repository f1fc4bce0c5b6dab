"""``tunesmith launch k8s``: a tunesmith config + launch options → a ConfigMap and a Kubeflow PyTorchJob, submitted
to a Kubernetes cluster and followed with ``tunesmith jobs``.

The job's pods run exactly ``tunesmith train /config/train.yaml``: the resolved config travels in a ConfigMap
mounted at ``/config``, and the training operator sets the rendezvous variables that ``tunesmith train`` reads
inside the pod. Everything a user can get wrong is checked before anything is submitted, and refused with one
sentence naming the option.

The steps, one module each (the shape of every launch back-end, see :mod:`tunesmith.launch.backend`):
:mod:`.options` (:class:`K8sOptions`, the command line) → :mod:`.check` (:class:`CheckedK8s`) → :mod:`.render`
(the ConfigMap and the PyTorchJob) → :mod:`.submit` (the Kubernetes API: :class:`K8sJobs`); :mod:`.commands`
wires them to argparse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunesmith.launch.k8s import check, render
from tunesmith.launch.k8s.check import CheckedK8s, CheckedOptions, Pvc, check_options, job_name, path_warnings
from tunesmith.launch.k8s.options import ACCELERATORS, ASCEND, GPU, K8sOptions
from tunesmith.launch.k8s.render import ASCEND_DRIVER, POD_COMMAND, Rendered

if TYPE_CHECKING:
    from tunesmith.config.schema import Config

__all__ = [
    "ACCELERATORS",
    "ASCEND",
    "ASCEND_DRIVER",
    "GPU",
    "POD_COMMAND",
    "CheckedK8s",
    "CheckedOptions",
    "K8sOptions",
    "Pvc",
    "Rendered",
    "check_options",
    "job_name",
    "path_warnings",
    "render_pytorchjob",
]


def render_pytorchjob(cfg: Config, options: K8sOptions, source: str | None = None) -> Rendered:
    """The ConfigMap and PyTorchJob for ``cfg`` and ``options``, checked first (options → check → render)."""
    return render.render(check.check(cfg, options, source))
