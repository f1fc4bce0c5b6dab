"""A :class:`CheckedK8s` job as a ConfigMap and a Kubeflow PyTorchJob (plain dicts, or one YAML stream).

The job's pods run exactly ``tunesmith train /config/train.yaml``: the resolved config travels in a ConfigMap
mounted at ``/config``, and the training operator sets the rendezvous variables (``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``) that
``tunesmith train`` reads inside the pod.

The objects are built with the Kubeflow training SDK's models (``kubeflow.training.models``) and the
Kubernetes client's models, then serialised to plain dicts; both imports happen inside :func:`render` so that
``tunesmith --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from tunesmith.launch.k8s.check import CheckedK8s, CheckedOptions
from tunesmith.launch.k8s.options import ASCEND, CONFIG_FILE, CONFIG_MOUNT

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the training operator only wires up (env, ports) the container with this name
POD_COMMAND = ["tunesmith", "train", f"{CONFIG_MOUNT}/{CONFIG_FILE}"]
MASTER_PORT = (
    23456  # the operator's default `pytorchjob-port`; named explicitly so MASTER_PORT is never a guess
)
MANAGED_BY = {"app.kubernetes.io/managed-by": "tunesmith"}
CONFIG_MAP_ANNOTATION = "tunesmith/config-map"
ASCEND_DRIVER = "/usr/local/Ascend/driver"


@dataclass
class Rendered:
    name: str
    namespace: str | None
    config_map: dict[str, Any]
    job: dict[str, Any]
    warnings: list[str]

    def to_yaml(self) -> str:
        """Both objects as one multi-document YAML stream (``kubectl apply -f`` takes it as is)."""
        return yaml.dump_all(
            [self.config_map, self.job], Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=1000
        )


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the config inside the ConfigMap) as readable ``|`` blocks, never aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_BlockDumper.add_representer(str, _str_presenter)


def _volumes(opts: CheckedOptions, config_map: str) -> tuple[list[Any], list[Any]]:
    """The pod's volumes and the container's mounts: the config, /dev/shm, each PVC, the Ascend driver."""
    from kubernetes import client

    mounts = [
        client.V1VolumeMount(name="config", mount_path=CONFIG_MOUNT, read_only=True),
        client.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
    ]
    volumes = [
        client.V1Volume(name="config", config_map=client.V1ConfigMapVolumeSource(name=config_map)),
        # NCCL/HCCL and DataLoader workers exchange tensors through /dev/shm; the container default is 64 MiB.
        client.V1Volume(
            name="dshm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory", size_limit=opts.shm_size)
        ),
    ]
    for i, pvc in enumerate(opts.pvcs):
        volume = f"pvc-{i}-{pvc.claim.replace('.', '-')}"[:63].rstrip("-")
        source = client.V1PersistentVolumeClaimVolumeSource(claim_name=pvc.claim, read_only=pvc.read_only or None)
        volumes.append(client.V1Volume(name=volume, persistent_volume_claim=source))
        mounts.append(
            client.V1VolumeMount(name=volume, mount_path=pvc.mount, read_only=pvc.read_only or None)
        )
    if opts.accelerator == ASCEND:
        # The CANN runtime inside the image loads the host's NPU driver libraries; without the Ascend Docker
        # runtime on the nodes they come from this hostPath (as in MindX DL's job templates).
        volumes.append(
            client.V1Volume(
                name="ascend-driver",
                host_path=client.V1HostPathVolumeSource(path=ASCEND_DRIVER, type="Directory"),
            )
        )
        mounts.append(client.V1VolumeMount(name="ascend-driver", mount_path=ASCEND_DRIVER, read_only=True))
    return volumes, mounts


def _pod_template(job: CheckedK8s) -> Any:
    from kubernetes import client

    opts = job.options
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if opts.accelerator != "none":
        limits[opts.accelerator] = str(opts.nproc_per_node)  # extended resources: requests = limits
    for key, value in (("cpu", opts.cpu), ("memory", opts.memory)):
        if value is not None:
            limits[key] = requests[key] = value
    volumes, mounts = _volumes(opts, job.config_map)
    env = [client.V1EnvVar(name=k, value=v) for k, v in opts.env]
    container = client.V1Container(
        name=CONTAINER,
        image=opts.image,
        command=list(POD_COMMAND),
        env=env or None,
        ports=[client.V1ContainerPort(name="pytorchjob-port", container_port=MASTER_PORT, protocol="TCP")],
        resources=client.V1ResourceRequirements(limits=limits or None, requests=requests or None),
        volume_mounts=mounts,
        working_dir=opts.workdir,
    )
    secrets = [client.V1LocalObjectReference(name=s) for s in opts.image_pull_secrets]
    return client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels={**MANAGED_BY, "tunesmith/job": job.name}),
        spec=client.V1PodSpec(
            containers=[container],
            volumes=volumes,
            node_selector=dict(opts.node_selector) or None,
            image_pull_secrets=secrets or None,
        ),
    )


def _pytorchjob(job: CheckedK8s) -> Any:
    from kubeflow.training import models as kf
    from kubernetes import client

    opts = job.options
    template = _pod_template(job)
    specs = {
        role: kf.KubeflowOrgV1ReplicaSpec(replicas=count, restart_policy=opts.restart_policy, template=template)
        for role, count in opts.replicas
    }
    elastic = None
    if opts.elastic:
        low, high = opts.elastic
        elastic = kf.KubeflowOrgV1ElasticPolicy(
            rdzv_backend="c10d", min_replicas=low, max_replicas=high, max_restarts=opts.max_restarts
        )
    return kf.KubeflowOrgV1PyTorchJob(
        api_version=f"{GROUP}/{VERSION}",
        kind=KIND,
        metadata=client.V1ObjectMeta(
            name=job.name,
            namespace=opts.namespace,
            labels=dict(MANAGED_BY),
            annotations={CONFIG_MAP_ANNOTATION: job.config_map},
        ),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(opts.nproc_per_node),
            pytorch_replica_specs=specs,
            elastic_policy=elastic,
            # keep finished pods so `tunesmith jobs logs` can still read them
            run_policy=kf.KubeflowOrgV1RunPolicy(clean_pod_policy="None"),
        ),
    )


def _serialise(obj: Any) -> dict[str, Any]:
    """A client model as a plain dict: apiVersion, kind, metadata first, as kubectl writes them."""
    from kubernetes import client

    data = client.ApiClient().sanitize_for_serialization(obj)
    return {key: data[key] for key in ("apiVersion", "kind", "metadata", "data", "spec") if key in data}


def render(job: CheckedK8s) -> Rendered:
    """The ConfigMap and the PyTorchJob of ``job`` (as plain dicts)."""
    from kubernetes import client

    namespace = job.options.namespace
    meta = {"name": job.config_map, **({"namespace": namespace} if namespace else {})}
    config_map = client.V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=client.V1ObjectMeta(**meta, labels={**MANAGED_BY, "tunesmith/job": job.name}),
        data={CONFIG_FILE: job.config_text},
    )
    return Rendered(
        job.name, namespace, _serialise(config_map), _serialise(_pytorchjob(job)), list(job.warnings)
    )
