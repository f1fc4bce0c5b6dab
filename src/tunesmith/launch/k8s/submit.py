"""Talking to a Kubernetes API server: submit a rendered PyTorchJob, follow it, read its logs, delete it
(:class:`K8sJobs`, the back-end of ``tunesmith jobs``).

The client configuration comes from ``--kubeconfig``, else ``KUBECONFIG`` / ``~/.kube/config``, else the
in-cluster service account. API failures become one-sentence :class:`TunesmithError` messages (what the server
said and what to do about it); nothing here prints a traceback for a refused request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.launch.backend import LogRequest
from tunesmith.launch.k8s.render import (
    CONFIG_MAP_ANNOTATION,
    CONTAINER,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    Rendered,
)
from tunesmith.logging import get_logger

log = get_logger("launch.k8s")

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
REQUEST_TIMEOUT = 30  # seconds per API call: a dead server fails the command instead of hanging it


@dataclass
class Cluster:
    """An API client and the namespace commands act in."""

    api: Any  # kubernetes.client.ApiClient
    namespace: str
    host: str

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)


def require_cluster_packages() -> None:
    """`launch k8s` / `jobs` need the optional `cluster` extra: say how to install it (no traceback)."""
    import importlib.util

    for module, package in (("kubernetes", "kubernetes"), ("kubeflow.training", "kubeflow-training")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise TunesmithError(f"{package} is not installed; run: pip install 'tunesmith[cluster]'")


def connect(
    kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None
) -> Cluster:
    """Load the client configuration (--kubeconfig, KUBECONFIG / ~/.kube/config, or in-cluster)."""
    require_cluster_packages()
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig and not Path(kubeconfig).is_file():
        raise TunesmithError(f"--kubeconfig {kubeconfig} does not exist; check the path")
    # Read KUBECONFIG now (the client reads it once, at import); it may list several files, joined by ':'.
    config_file = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    context_namespace = None
    try:
        if kubeconfig or os.environ.get("KUBECONFIG") or Path(config_file).is_file():
            api = config.new_client_from_config(config_file=config_file, context=context)
            contexts, active = config.list_kube_config_contexts(config_file=config_file)
            if context:
                active = next((c for c in contexts if c["name"] == context), active)
            context_namespace = (active or {}).get("context", {}).get("namespace")
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api = client.ApiClient(configuration)
            if IN_CLUSTER_NAMESPACE.is_file():
                context_namespace = IN_CLUSTER_NAMESPACE.read_text().strip()
        else:
            raise TunesmithError(
                "no Kubernetes configuration found; pass --kubeconfig FILE, set KUBECONFIG, or run inside "
                "a cluster"
            )
    except ConfigException as err:
        raise TunesmithError(
            f"the Kubernetes configuration cannot be used ({err}); check --kubeconfig / KUBECONFIG"
        ) from None
    api.configuration.retries = 1  # fail fast on an unreachable server (urllib3 would retry 3 times)
    return Cluster(api, namespace or context_namespace or "default", api.configuration.host)


def _api_error(err: Exception, cluster: Cluster, what: str) -> TunesmithError:
    """Turn a client exception into one sentence that says what failed and what to do."""
    from kubernetes.client.exceptions import ApiException

    if not isinstance(err, ApiException):  # connection refused, DNS, TLS, timeouts
        reason = str(getattr(err, "reason", None) or err).splitlines()[0][:200]
        return TunesmithError(
            f"cannot reach the Kubernetes API at {cluster.host} while trying to {what} ({reason}); check "
            "--kubeconfig / KUBECONFIG and that the cluster is up"
        )
    message = err.reason or ""
    try:
        message = json.loads(err.body or "{}").get("message") or message
    except (ValueError, AttributeError):
        pass
    if err.status in (401, 403):
        hint = f"check your credentials and RBAC permissions in namespace {cluster.namespace}"
    elif err.status == 404 and "pytorchjob" in what.lower():
        hint = "is the Kubeflow training operator (its PyTorchJob CRD) installed in the cluster?"
    else:
        hint = "fix what the API server names and try again"
    return TunesmithError(f"the Kubernetes API refused to {what} ({err.status}: {message}); {hint}")


def _status(err: Exception) -> int | None:
    return getattr(err, "status", None)


# ---------------------------------------------------------------------------------------------- submit


def submit(cluster: Cluster, rendered: Rendered) -> None:
    """Create (or replace) the ConfigMap, then create the PyTorchJob; refuse if the job already exists."""
    ns = cluster.namespace
    name = rendered.name
    config_map = dict(rendered.config_map, metadata={**rendered.config_map["metadata"], "namespace": ns})
    job = dict(rendered.job, metadata={**rendered.job["metadata"], "namespace": ns})
    try:
        cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as err:  # noqa: BLE001 - 404 is the good case; anything else is reported below
        if _status(err) != 404:
            raise _api_error(err, cluster, f"look up PyTorchJob {name}") from None
    else:
        raise TunesmithError(
            f"a PyTorchJob named {name} already exists in namespace {ns}; delete it with "
            f"`tunesmith jobs delete {name}` or pass --name"
        )
    cm_name = config_map["metadata"]["name"]
    try:
        cluster.core.create_namespaced_config_map(ns, config_map, _request_timeout=REQUEST_TIMEOUT)
    except Exception as err:  # noqa: BLE001
        if _status(err) != 409:
            raise _api_error(err, cluster, f"create ConfigMap {cm_name}") from None
        try:  # a ConfigMap left behind by an earlier run of the same name: replace it
            cluster.core.replace_namespaced_config_map(
                cm_name, ns, config_map, _request_timeout=REQUEST_TIMEOUT
            )
        except Exception as err2:  # noqa: BLE001
            raise _api_error(err2, cluster, f"replace ConfigMap {cm_name}") from None
    try:
        cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, job, _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as err:  # noqa: BLE001
        _delete_quietly(cluster, cm_name)  # no job will ever mount it
        raise _api_error(err, cluster, f"create PyTorchJob {name}") from None


def _delete_quietly(cluster: Cluster, config_map: str) -> bool:
    try:
        cluster.core.delete_namespaced_config_map(
            config_map, cluster.namespace, _request_timeout=REQUEST_TIMEOUT
        )
        return True
    except Exception:  # noqa: BLE001 - best effort cleanup
        return False


# ------------------------------------------------------------------------------------------------ follow


def get_job(cluster: Cluster, name: str) -> dict[str, Any]:
    try:
        return cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as err:  # noqa: BLE001
        if _status(err) == 404:
            raise TunesmithError(
                f"no PyTorchJob named {name} in namespace {cluster.namespace}; `tunesmith jobs list` shows "
                "the jobs there"
            ) from None
        raise _api_error(err, cluster, f"read PyTorchJob {name}") from None


def job_state(job: dict[str, Any]) -> str:
    """The newest condition that holds (Created, Running, Restarting, Succeeded, Failed, ...)."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    return conditions[-1]["type"] if conditions else "Pending"


def list_jobs(cluster: Cluster) -> list[dict[str, Any]]:
    try:
        result = cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, PLURAL, _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as err:  # noqa: BLE001
        raise _api_error(err, cluster, f"list PyTorchJobs in namespace {cluster.namespace}") from None
    return result.get("items") or []


def job_pods(cluster: Cluster, name: str, replica: str | None = None, index: int | None = None) -> list[Any]:
    """The job's pods, found by the labels the training operator puts on them."""
    selector = [f"{JOB_NAME_LABEL}={name}"]
    if replica:
        selector.append(f"{REPLICA_TYPE_LABEL}={replica.lower()}")
    if index is not None:
        selector.append(f"{REPLICA_INDEX_LABEL}={index}")
    try:
        pods = cluster.core.list_namespaced_pod(
            cluster.namespace, label_selector=",".join(selector), _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as err:  # noqa: BLE001
        raise _api_error(err, cluster, f"list the pods of PyTorchJob {name}") from None
    return sorted(pods.items, key=lambda p: p.metadata.name)


def describe(cluster: Cluster, name: str) -> str:
    """What `tunesmith jobs status NAME` prints: state, conditions, replica statuses, pods."""
    job = get_job(cluster, name)
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    lines = [f"PyTorchJob {name} (namespace {cluster.namespace}): {job_state(job)}"]
    replicas = ", ".join(
        f"{role} × {rs.get('replicas', 1)}" for role, rs in (spec.get("pytorchReplicaSpecs") or {}).items()
    )
    lines.append(f"  replicas: {replicas}; processes per node: {spec.get('nprocPerNode', '?')}")
    for key in ("startTime", "completionTime"):
        if status.get(key):
            lines.append(f"  {key}: {status[key]}")
    lines.append("  conditions:")
    for c in status.get("conditions") or []:
        text = f"    {c.get('type')}={c.get('status')}"
        if c.get("reason"):
            text += f" ({c['reason']})"
        if c.get("message"):
            text += f": {c['message']}"
        if c.get("lastTransitionTime"):
            text += f" at {c['lastTransitionTime']}"
        lines.append(text)
    if not status.get("conditions"):
        lines.append("    none yet (has the training operator seen the job?)")
    lines.append("  replica statuses:")
    for role, rs in (status.get("replicaStatuses") or {}).items():
        counts = ", ".join(f"{k} {rs.get(k, 0)}" for k in ("active", "succeeded", "failed"))
        lines.append(f"    {role}: {counts}")
    pods = job_pods(cluster, name)
    if pods:
        lines.append("  pods:")
        for pod in pods:
            lines.append(f"    {pod.metadata.name}: {pod.status.phase if pod.status else 'Unknown'}")
    return "\n".join(lines)


def pod_logs(
    cluster: Cluster,
    name: str,
    replica: str | None,
    index: int,
    tail: int | None = None,
    follow: bool = False,
) -> Iterator[str]:
    """The log of one pod of the job (default: the master, or worker 0 of an elastic job)."""
    job = get_job(cluster, name)
    roles = list((job.get("spec") or {}).get("pytorchReplicaSpecs") or {})
    role = replica or ("master" if "Master" in roles else "worker")
    pods = job_pods(cluster, name, role, index)
    if not pods:
        raise TunesmithError(
            f"PyTorchJob {name} has no {role} pod with index {index} (yet); `tunesmith jobs status {name}` "
            "shows its pods"
        )
    pod = pods[0].metadata.name
    try:
        if follow:
            response = cluster.core.read_namespaced_pod_log(
                pod,
                cluster.namespace,
                container=CONTAINER,
                follow=True,
                tail_lines=tail,
                _preload_content=False,
            )
            for chunk in response.stream():
                yield chunk.decode("utf-8", "replace")
            return
        yield cluster.core.read_namespaced_pod_log(
            pod, cluster.namespace, container=CONTAINER, tail_lines=tail, _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as err:  # noqa: BLE001
        raise _api_error(err, cluster, f"read the log of pod {pod}") from None


def delete(cluster: Cluster, name: str) -> list[str]:
    """Delete the job (its pods go with it) and its ConfigMap; returns what was deleted."""
    job = get_job(cluster, name)
    config_map = ((job.get("metadata") or {}).get("annotations") or {}).get(
        CONFIG_MAP_ANNOTATION, f"{name}-config"
    )
    try:
        cluster.custom.delete_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
        )
    except Exception as err:  # noqa: BLE001
        raise _api_error(err, cluster, f"delete PyTorchJob {name}") from None
    deleted = [f"{KIND} {name}"]
    if _delete_quietly(cluster, config_map):
        deleted.append(f"ConfigMap {config_map}")
    return deleted


def job_table(items: list[dict[str, Any]]) -> list[str]:
    """``jobs list``: name, state, replicas and creation time, in aligned columns."""
    rows = [("NAME", "STATE", "REPLICAS", "CREATED")]
    for job in items:
        specs = (job.get("spec") or {}).get("pytorchReplicaSpecs") or {}
        replicas = "+".join(f"{rs.get('replicas', 1)} {role.lower()}" for role, rs in specs.items())
        meta = job.get("metadata") or {}
        rows.append((meta.get("name", "?"), job_state(job), replicas, meta.get("creationTimestamp", "")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


class K8sJobs:
    """``tunesmith jobs`` for PyTorchJobs (a :class:`tunesmith.launch.backend.JobBackend`); connects on first use
    with --kubeconfig / --context / --namespace."""

    def __init__(
        self, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None
    ) -> None:
        self._where = (kubeconfig, context, namespace)
        self._cluster: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            self._cluster = connect(*self._where)
        return self._cluster

    def list_jobs(self) -> str:
        items = list_jobs(self.cluster)
        if not items:
            return f"no PyTorchJobs in namespace {self.cluster.namespace}"
        return "\n".join(job_table(items))

    def status(self, name: str) -> str:
        return describe(self.cluster, name)

    def logs(self, name: str, request: LogRequest) -> Iterator[str]:
        return pod_logs(self.cluster, name, request.replica, request.index, request.tail, request.follow)

    def delete(self, name: str) -> str:
        deleted = delete(self.cluster, name)
        return f"deleted {' and '.join(deleted)} from namespace {self.cluster.namespace}"
