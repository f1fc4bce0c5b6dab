"""Running training somewhere: the ``tunesmith launch`` back-ends and ``tunesmith jobs``.

- ``tunesmith train`` itself (the local back-end): ``local.py`` trains or re-runs itself under torchrun
  (``torchrun.py``), reading the launch from flags, LLaMA-Factory's variables or a scheduler's own
  (``cluster_env.py``); ``rendezvous.py`` orders the exit of a multi-node job so the store's host leaves last.
- Cluster back-ends, each a package of the same five steps (``backend.py`` describes them): ``slurm/`` (an sbatch
  job) and ``k8s/`` (a Kubeflow PyTorchJob); ``jobs.py`` follows either through one ``JobBackend`` interface.
- ``ranktable.py``: HCCL rank tables for Ascend jobs. ``commands.py`` registers the commands.
"""
