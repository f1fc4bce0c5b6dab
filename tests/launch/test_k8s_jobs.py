"""`tunesmith launch k8s` + `tunesmith jobs` against a Kubernetes API emulator on 127.0.0.1.

No real API server can run on the test machines: ``k8s_helpers.py`` serves the endpoints the kubernetes
client calls (and checks PyTorchJobs against the CRD schema from ../shared when it is there). The real CLI
runs as a subprocess with a kubeconfig pointing at the emulator, so the kubeconfig loading, the HTTP calls and
the exit codes are the ones a user gets; the many shorter checks call the same CLI in-process (``main``).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_helpers import K8sApiEmulator, crd_schema

from tunesmith.cli import build_parser, main
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.launch.jobs import _backend
from tunesmith.launch.k8s import K8sOptions
from tunesmith.launch.k8s import render_pytorchjob as render
from tunesmith.launch.k8s.submit import connect, submit

REPO = Path(__file__).resolve().parents[2]
CRD = REPO.parent / "shared" / "k8s" / "kubeflow.org_pytorchjobs.yaml"
CONFIG = """\
model_name_or_path: /models/qwen2.5-1.5b
dataset: identity
dataset_dir: /data/datasets
output_dir: /data/runs/qwen-id
finetuning_type: lora
learning_rate: 1.0e-4
"""


@pytest.fixture(scope="module")
def api():
    # the CRD schema comes from ../shared; without it the emulator still checks what the operator webhook does
    with K8sApiEmulator(schema=crd_schema(CRD) if CRD.is_file() else None, lifetime_s=300) as emulator:
        yield emulator


@pytest.fixture
def workdir(tmp_path, api) -> Path:
    (tmp_path / "my.yaml").write_text(CONFIG)
    api.write_kubeconfig(tmp_path / "kubeconfig", namespace="ml")
    return tmp_path


def tunesmith(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a process of its own, as a user runs it (KUBECONFIG → the emulator)."""
    env = {**os.environ, "KUBECONFIG": str(workdir / "kubeconfig"), "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.fixture
def cli(workdir, monkeypatch, capsys):
    """The same CLI in this process (`tunesmith.cli.main`), for the many short calls: returns (exit code,
    stdout, stderr). A subprocess each would mostly spend its time importing torch and the kubernetes
    client."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("KUBECONFIG", str(workdir / "kubeconfig"))
    monkeypatch.setattr(logging.getLogger("tunesmith"), "handlers", [])  # log to this test's captured stderr

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2, out + err
    errors = [line for line in err.splitlines() if line.startswith("tunesmith: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


LAUNCH = ["launch", "k8s", "my.yaml", "--image", "img:1", "--nnodes", "3", "--nproc-per-node", "2",
          "--pvc", "models:/models:ro", "--pvc", "data:/data", "--name", "qwen-id"]  # fmt: skip


def test_the_real_cli_submits_follows_and_deletes_a_job(workdir, api):
    proc = tunesmith(workdir, *LAUNCH)
    assert proc.returncode == 0, proc.stderr
    assert "submitted PyTorchJob qwen-id to namespace ml" in proc.stdout  # the kubeconfig context's namespace
    assert api.get("pytorchjobs", "ml", "qwen-id") and api.get("configmaps", "ml", "qwen-id-config")

    status = tunesmith(workdir, "jobs", "status", "qwen-id")
    assert status.returncode == 0, status.stderr
    assert "PyTorchJob qwen-id (namespace ml): Running" in status.stdout
    assert "Master × 1, Worker × 2; processes per node: 2" in status.stdout
    assert "Worker: active 2" in status.stdout and "qwen-id-worker-1: Running" in status.stdout

    logs = tunesmith(workdir, "jobs", "logs", "qwen-id", "--replica", "worker", "--index", "1")
    assert logs.returncode == 0, logs.stderr
    assert "pod qwen-id-worker-1 would run: tunesmith train /config/train.yaml" in logs.stdout

    deleted = tunesmith(workdir, "jobs", "delete", "qwen-id")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted PyTorchJob qwen-id and ConfigMap qwen-id-config from namespace ml" in deleted.stdout
    assert api.names("pytorchjobs", "ml") == [] and api.names("configmaps", "ml") == []
    assert api.names("pods", "ml") == []


def test_submitted_objects_status_logs_and_list(cli, workdir, api):
    code, out, err = cli(*LAUNCH[:-1], "follow-me")
    assert code == 0, err
    # what was submitted is exactly what --dry-run shows, in the kubeconfig's namespace
    code, dry, _ = cli(*LAUNCH[:-1], "follow-me", "--dry-run")
    config_map, job = yaml.safe_load_all(dry)
    stored_job = api.get("pytorchjobs", "ml", "follow-me")
    stored_map = api.get("configmaps", "ml", "follow-me-config")
    assert stored_job["spec"] == job["spec"] and stored_map["data"] == config_map["data"]
    (workdir / "from-cluster.yaml").write_text(stored_map["data"]["train.yaml"])
    assert load_config(workdir / "from-cluster.yaml") == load_config(workdir / "my.yaml")

    api.set_condition("ml", "follow-me", "Succeeded", "PyTorchJobSucceeded", "PyTorchJob ml/follow-me done.")
    code, out, _ = cli("jobs", "status", "follow-me")
    assert "PyTorchJob follow-me (namespace ml): Succeeded" in out
    assert "Succeeded=True (PyTorchJobSucceeded): PyTorchJob ml/follow-me done." in out

    code, out, _ = cli("jobs", "logs", "follow-me")  # the master by default
    assert "pod follow-me-master-0 would run: tunesmith train /config/train.yaml" in out
    code, out, _ = cli("jobs", "logs", "follow-me", "--replica", "worker", "--index", "1", "--tail", "1")
    assert out == "replica worker 1 of PyTorchJob follow-me\n"
    code, out, _ = cli("jobs", "logs", "follow-me", "--follow")
    assert "pod follow-me-master-0 would run" in out
    missing = one_error_line(*cli("jobs", "logs", "follow-me", "--replica", "worker", "--index", "5"))
    assert "has no worker pod with index 5" in missing

    code, out, _ = cli("jobs", "list")
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "STATE", "REPLICAS", "CREATED"]
    assert any(line.split()[:3] == ["follow-me", "Succeeded", "1"] for line in out.splitlines())
    assert cli("jobs", "list", "--namespace", "other")[1].strip() == "no PyTorchJobs in namespace other"

    assert cli("jobs", "delete", "follow-me")[0] == 0
    gone = one_error_line(*cli("jobs", "status", "follow-me"))
    assert "no PyTorchJob named follow-me in namespace ml" in gone


def test_a_second_submission_of_the_same_name_is_refused(cli, api):
    args = ["launch", "k8s", "my.yaml", "--image", "img:1", "--namespace", "dup", "--name", "dup-job"]
    assert cli(*args)[0] == 0
    api_map = api.get("configmaps", "dup", "dup-job-config")
    error = one_error_line(*cli(*args, "learning_rate=1"))
    assert "a PyTorchJob named dup-job already exists in namespace dup" in error
    assert "tunesmith jobs delete dup-job" in error
    assert api.get("configmaps", "dup", "dup-job-config") == api_map  # the running job's config is untouched


def test_elastic_job_logs_default_to_worker_zero(cli, api):
    code, _, err = cli(
        "launch", "k8s", "my.yaml", "--image", "img:1", "--elastic", "1:2", "--namespace", "el", "--name",
        "elastic-run",
    )  # fmt: skip
    assert code == 0, err
    assert api.get("pytorchjobs", "el", "elastic-run")["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    assert "pod elastic-run-worker-0 would run" in cli("jobs", "logs", "elastic-run", "-n", "el")[1]


def test_a_broken_job_is_refused_before_anything_is_sent(workdir, api):
    before = len(api.requests)
    # Ascend has no published image (GPU and CPU jobs default to tunesmith's): --image stays required there
    ascend = ["--accelerator", "huawei.com/Ascend910"]
    no_image = tunesmith(workdir, "launch", "k8s", "my.yaml", "--nnodes", "2", *ascend)
    assert "--image is missing" in one_error_line(no_image.returncode, no_image.stdout, no_image.stderr)
    bad = tunesmith(workdir, "launch", "k8s", "my.yaml", "--image", "i", "--nnodes", "0")
    error = one_error_line(bad.returncode, bad.stdout, bad.stderr)
    assert "--nnodes 0 is not allowed; it must be at least 1" in error
    assert len(api.requests) == before  # refused before submission: the API server saw nothing


def test_the_api_servers_refusal_is_one_sentence_and_leaves_no_configmap(cli, workdir, api):
    """A job the admission webhook refuses (here: two Masters, tampered after rendering): the API's reason,
    one line, and the ConfigMap created just before is removed again."""
    cfg = load_config(workdir / "my.yaml")
    rendered = render(cfg, K8sOptions(image="img:1", nnodes=2, name="tampered", namespace="hooks"))
    rendered.job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    cluster = connect(namespace="hooks")
    with pytest.raises(TunesmithError) as err:
        submit(cluster, rendered)
    text = str(err.value)
    assert text.startswith("the Kubernetes API refused to create PyTorchJob tampered (422:")
    assert "replicas: Forbidden: must be 1" in text and "\n" not in text
    assert api.names("configmaps", "hooks") == [] and api.names("pytorchjobs", "hooks") == []


def test_bad_credentials_and_an_unreachable_server_are_one_line(cli, workdir, api):
    wrong = api.write_kubeconfig(workdir / "wrong-token", token="not-the-token")
    error = one_error_line(*cli("jobs", "list", "--kubeconfig", str(wrong)))
    assert "the Kubernetes API refused to list PyTorchJobs in namespace default (401: Unauthorized)" in error
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = workdir / "dead"
    dead.write_text(wrong.read_text().replace(api.url, f"http://127.0.0.1:{port}"))
    error = one_error_line(*cli("jobs", "status", "x", "--kubeconfig", str(dead)))
    assert f"cannot reach the Kubernetes API at http://127.0.0.1:{port}" in error
    error = one_error_line(*cli("jobs", "list", "--kubeconfig", "nope.yaml"))
    assert "--kubeconfig nope.yaml does not exist" in error


def test_context_picks_the_credentials_and_namespace(cli, workdir, api):
    kubeconfig = yaml.safe_load(api.write_kubeconfig(workdir / "two", token="stale").read_text())
    kubeconfig["users"].append({"name": "good-user", "user": {"token": api.token}})
    kubeconfig["contexts"].append({"name": "good", "context": {"cluster": "emulator", "user": "good-user",
                                                               "namespace": "ctx-ns"}})  # fmt: skip
    (workdir / "two").write_text(yaml.safe_dump(kubeconfig))
    assert "(401: Unauthorized)" in one_error_line(*cli("jobs", "list", "--kubeconfig", "two"))
    code, out, err = cli("jobs", "list", "--kubeconfig", "two", "--context", "good")
    assert code == 0, err
    assert out.strip() == "no PyTorchJobs in namespace ctx-ns"


def test_numeric_names_go_to_slurm_unless_told_otherwise():
    parser = build_parser()
    assert _backend(parser.parse_args(["jobs", "status", "12345"])) == "slurm"
    assert _backend(parser.parse_args(["jobs", "logs", "qwen-id"])) == "k8s"
    assert _backend(parser.parse_args(["jobs", "delete", "12345", "--backend", "k8s"])) == "k8s"
    assert _backend(parser.parse_args(["jobs", "status", "my-job", "--backend", "slurm"])) == "slurm"
