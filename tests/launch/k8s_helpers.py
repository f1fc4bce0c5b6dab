"""A small in-process emulator of the Kubernetes API, for testing `tunesmith launch k8s` and `tunesmith jobs`.

No real API server can run on the test machines, so this HTTP server on 127.0.0.1 implements just the
endpoints the kubernetes Python client calls for us, storing objects in memory:

* ConfigMaps: create, get, replace, list, delete (core/v1);
* PyTorchJobs: create, get, list, delete (kubeflow.org/v1), checked on create like the real API server would
  (the CRD's OpenAPI schema, unknown fields refused as with ``fieldValidation=Strict``) and like the training
  operator's admission webhook (a ``pytorch`` container with an image, Master replicas exactly 1);
* Pods: list by label selector, read a pod's log.

On creating a PyTorchJob it plays the training operator: it sets Created/Running conditions and replica
statuses and creates one fake pod per replica (``NAME-master-0``, ``NAME-worker-i``) with the operator's
labels and a log line saying which command the pod would run. No container ever runs. The server stops
itself after ``lifetime_s`` seconds even if a test forgets to.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

TOKEN = "emulator-token"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"


def crd_schema(crd_file: Path) -> dict[str, Any]:
    """``spec.versions[0].schema.openAPIV3Schema`` of a CustomResourceDefinition file."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is ~1 MB of YAML: libyaml reads it fast
    crd = yaml.load(crd_file.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a safe loader
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the structural schema does not declare: a real API server silently prunes them (or refuses them
    with fieldValidation=Strict), so a rendered job must have none."""
    found: list[str] = []
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return found
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and not extra:
                found.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def schema_violations(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """jsonschema errors plus unknown fields, as readable strings (empty: valid)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    return errors + [f"unknown field {f}" for f in unknown_fields(obj, schema)]


def webhook_violations(job: dict[str, Any]) -> list[str]:
    """What the training operator's PyTorchJob admission webhook refuses (pytorchjob_webhook.go)."""
    name = job.get("metadata", {}).get("name", "")
    errors = []
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name: Invalid value: {name!r}: should be a DNS-1035 label")
    specs = job.get("spec", {}).get("pytorchReplicaSpecs") or {}
    if job.get("spec", {}).get("elasticPolicy") is not None and "Worker" not in specs:
        errors.append(
            "spec.pytorchReplicaSpecs[Worker]: Required value: must be configured if elastic policy is used"
        )
    for role, rs in specs.items():
        where = f"spec.pytorchReplicaSpecs[{role}]"
        if role not in ("Master", "Worker"):
            errors.append(f"{where}: Unsupported value: {role!r}")
        containers = rs.get("template", {}).get("spec", {}).get("containers") or []
        if not any(c.get("name") == "pytorch" for c in containers):
            errors.append(
                f"{where}.template.spec.containers: Required value: There is no container named pytorch"
            )
        for c in containers:
            if not c.get("image"):
                errors.append(f"{where}.template.spec.containers[{c.get('name')}].image: Required value")
        replicas = rs.get("replicas")
        if role == "Master" and replicas != 1:
            errors.append(f"{where}.replicas: Forbidden: must be 1")
        elif replicas is not None and replicas < 1:
            errors.append(f"{where}.replicas: Forbidden: must be at least 1")
    return errors


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class K8sApiEmulator:
    """``with K8sApiEmulator() as api: api.write_kubeconfig(path)``; objects live in ``api.objects``."""

    def __init__(self, schema: dict[str, Any] | None = None, lifetime_s: float = 120.0, token: str = TOKEN):
        self.schema = schema
        self.token = token
        self.lifetime_s = lifetime_s
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, namespace, name) → object
        self.logs: dict[tuple[str, str], str] = {}  # (namespace, pod) → log text
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle --------------------------------------------------------------------------------------

    def __enter__(self) -> K8sApiEmulator:
        handler = type("Handler", (_Handler,), {"emulator": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        ).start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)  # bounded lifetime
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self._server:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None, "the emulator is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: Path, namespace: str | None = None, token: str | None = None) -> Path:
        context: dict[str, Any] = {"cluster": "emulator", "user": "tester"}
        if namespace:
            context["namespace"] = namespace
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token or self.token}}],
            "contexts": [{"name": "emulator", "context": context}],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(kubeconfig), encoding="utf-8")
        return path

    # -- what a test inspects or drives ------------------------------------------------------------------

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            return copy.deepcopy(self.objects.get((plural, namespace, name)))

    def names(self, plural: str, namespace: str) -> list[str]:
        with self.lock:
            return sorted(n for p, ns, n in self.objects if p == plural and ns == namespace)

    def set_condition(
        self, namespace: str, job: str, type_: str, reason: str = "", message: str = ""
    ) -> None:
        """Advance a job as the operator would (e.g. to Succeeded or Failed)."""
        with self.lock:
            status = self.objects[("pytorchjobs", namespace, job)]["status"]
            for condition in status["conditions"]:
                if condition["type"] == "Running":
                    condition["status"] = "False"
            status["conditions"].append(
                {
                    "type": type_,
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": _now(),
                    "lastUpdateTime": _now(),
                }
            )

    # -- operator emulation ------------------------------------------------------------------------------

    def _start_job(self, namespace: str, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        specs = job["spec"]["pytorchReplicaSpecs"]
        job["status"] = {
            "conditions": [
                {
                    "type": "Created",
                    "status": "True",
                    "reason": "PyTorchJobCreated",
                    "message": f"PyTorchJob {namespace}/{name} is created.",
                    "lastTransitionTime": _now(),
                },
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "PyTorchJobRunning",
                    "message": f"PyTorchJob {namespace}/{name} is running.",
                    "lastTransitionTime": _now(),
                },
            ],
            "replicaStatuses": {role: {"active": rs.get("replicas", 1)} for role, rs in specs.items()},
            "startTime": _now(),
        }
        for role, rs in specs.items():
            for index in range(rs.get("replicas", 1)):
                pod_name = f"{name}-{role.lower()}-{index}"
                template = copy.deepcopy(rs["template"])
                volumes = template["spec"].get("volumes") or []
                missing = [
                    v["configMap"]["name"]
                    for v in volumes
                    if "configMap" in v
                    and ("configmaps", namespace, v["configMap"]["name"]) not in self.objects
                ]
                labels = {
                    **(template.get("metadata") or {}).get("labels", {}),
                    JOB_NAME_LABEL: name,
                    "training.kubeflow.org/replica-type": role.lower(),
                    "training.kubeflow.org/replica-index": str(index),
                    "training.kubeflow.org/operator-name": "pytorchjob-controller",
                }
                pod = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": pod_name,
                        "namespace": namespace,
                        "labels": labels,
                        "uid": str(uuid.uuid4()),
                        "creationTimestamp": _now(),
                    },
                    "spec": template["spec"],
                    "status": {"phase": "Pending" if missing else "Running"},
                }
                self.objects[("pods", namespace, pod_name)] = pod
                command = " ".join(template["spec"]["containers"][0].get("command") or [])
                self.logs[(namespace, pod_name)] = (
                    f"[k8s emulator: no container runs here] pod {pod_name} would run: {command}\n"
                    f"replica {role.lower()} {index} of PyTorchJob {name}\n"
                )


class _Handler(BaseHTTPRequestHandler):
    emulator: K8sApiEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # -- plumbing --------------------------------------------------------------------------------------

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _route(self, method: str) -> None:
        em = self.emulator
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with em.lock:
            em.requests.append((method, url.path))
        if self.headers.get("Authorization") != f"Bearer {em.token}":
            self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        routes = (
            (r"/api/v1/namespaces/([^/]+)/(configmaps|pods)", False),
            (r"/apis/kubeflow\.org/v1/namespaces/([^/]+)/(pytorchjobs)", False),
            (r"/api/v1/namespaces/([^/]+)/(configmaps|pods)/([^/]+)", True),
            (r"/apis/kubeflow\.org/v1/namespaces/([^/]+)/(pytorchjobs)/([^/]+)", True),
        )
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", url.path):
            if method == "GET":
                return self._log(m.group(1), m.group(2), query)
        for pattern, named in routes:
            m = re.fullmatch(pattern, url.path)
            if not m:
                continue
            ns, plural = m.group(1), m.group(2)
            if named:
                return self._one(method, plural, ns, m.group(3))
            return self._collection(method, plural, ns, query)
        self._send(
            404, _status(404, "NotFound", f"the server could not find the requested resource {url.path}")
        )

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    # -- resources ---------------------------------------------------------------------------------------

    def _collection(self, method: str, plural: str, ns: str, query: dict[str, str]) -> None:
        em = self.emulator
        kind = {"configmaps": "ConfigMap", "pods": "Pod", "pytorchjobs": "PyTorchJob"}[plural]
        api_version = "kubeflow.org/v1" if plural == "pytorchjobs" else "v1"
        if method == "GET":
            wanted = dict(part.split("=", 1) for part in query.get("labelSelector", "").split(",") if part)
            with em.lock:
                items = [
                    copy.deepcopy(o)
                    for (p, n, _), o in sorted(em.objects.items())
                    if p == plural
                    and n == ns
                    and all((o["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())
                ]
            self._send(
                200,
                {
                    "apiVersion": api_version,
                    "kind": f"{kind}List",
                    "metadata": {"resourceVersion": "1"},
                    "items": items,
                },
            )
            return
        if method != "POST" or plural == "pods":
            self._send(405, _status(405, "MethodNotAllowed", f"{method} is not supported on {plural}"))
            return
        obj = self._body()
        name = (obj.get("metadata") or {}).get("name")
        if obj.get("kind") != kind or obj.get("apiVersion") != api_version or not name:
            self._send(400, _status(400, "BadRequest", f"expected a {api_version} {kind} with metadata.name"))
            return
        if plural == "pytorchjobs":
            errors = webhook_violations(obj)
            if em.schema is not None:
                errors = schema_violations(obj, em.schema) + errors
            if errors:
                message = f'PyTorchJob.kubeflow.org "{name}" is invalid: {"; ".join(errors)}'
                self._send(422, _status(422, "Invalid", message))
                return
        with em.lock:
            if (plural, ns, name) in em.objects:
                self._send(409, _status(409, "AlreadyExists", f'{plural} "{name}" already exists'))
                return
            obj["metadata"].update(
                namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion="1"
            )
            em.objects[(plural, ns, name)] = obj
            if plural == "pytorchjobs":
                em._start_job(ns, obj)
            created = copy.deepcopy(obj)
        self._send(201, created)

    def _one(self, method: str, plural: str, ns: str, name: str) -> None:
        em = self.emulator
        key = (plural, ns, name)
        with em.lock:
            current = copy.deepcopy(em.objects.get(key))
        if current is None:
            self._send(404, _status(404, "NotFound", f'{plural} "{name}" not found'))
            return
        if method == "GET":
            self._send(200, current)
        elif method == "PUT" and plural == "configmaps":
            obj = self._body()
            obj["metadata"].update(namespace=ns, uid=current["metadata"]["uid"], resourceVersion="2")
            with em.lock:
                em.objects[key] = obj
            self._send(200, obj)
        elif method == "DELETE" and plural != "pods":
            with em.lock:
                del em.objects[key]
                if plural == "pytorchjobs":  # the pods are owned by the job: garbage-collected with it
                    for k in [
                        k
                        for k, o in em.objects.items()
                        if k[0] == "pods"
                        and k[1] == ns
                        and o["metadata"]["labels"].get(JOB_NAME_LABEL) == name
                    ]:
                        del em.objects[k]
                        em.logs.pop((ns, k[2]), None)
            self._send(
                200,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {"name": name, "kind": plural},
                },
            )
        else:
            self._send(405, _status(405, "MethodNotAllowed", f"{method} is not supported on {plural}/{name}"))

    def _log(self, ns: str, pod: str, query: dict[str, str]) -> None:
        em = self.emulator
        with em.lock:
            text = em.logs.get((ns, pod))
            obj = em.objects.get(("pods", ns, pod))
        if text is None or obj is None:
            self._send(404, _status(404, "NotFound", f'pods "{pod}" not found'))
            return
        containers = [c["name"] for c in obj["spec"]["containers"]]
        if query.get("container", containers[0]) not in containers:
            self._send(
                400, _status(400, "BadRequest", f"container {query['container']} is not valid for pod {pod}")
            )
            return
        if "tailLines" in query:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(query["tailLines"]) :]) if int(query["tailLines"]) > 0 else ""
        self._send(200, text, "text/plain")
