"""`tunesmith launch k8s`: the ConfigMap + PyTorchJob it renders, checked against the PyTorchJob CRD schema
(../shared/k8s) and Kubernetes' own schemas (kubernetes-validate, strict), and the options it refuses."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import yaml
from k8s_helpers import crd_schema, schema_violations

from tunesmith import __version__
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.launch.k8s import (
    ASCEND,
    ASCEND_DRIVER,
    GPU,
    POD_COMMAND,
    K8sOptions,
    check_options,
    job_name,
    path_warnings,
)
from tunesmith.launch.k8s import render_pytorchjob as render

BASE = [
    "model_name_or_path=/models/qwen2.5-1.5b",
    "dataset=identity",
    "dataset_dir=/data/datasets",
    "output_dir=/data/runs/qwen-id",
]
PVCS = ["models:/models:ro", "data:/data"]

# Launches a user runs: guide 004's 2 nodes × 2 GPUs, one node, elastic, Ascend, CPU-only with every option.
VARIANTS = {
    "one-node": dict(image="img:1", nproc_per_node=1),
    "guide004-2x2": dict(
        image="hiyouga/llamafactory:0.9.4", nnodes=2, nproc_per_node=2, pvc=PVCS, shm_size="16Gi",
        env=["HF_HOME=/models/hf", "NCCL_DEBUG=INFO"], cpu="8", memory="64Gi",
    ),
    "elastic": dict(image="img:1", nproc_per_node=4, elastic="2:4", pvc=PVCS, max_restarts=5),
    "ascend": dict(image="ascend/tunesmith:cann8", nnodes=2, nproc_per_node=8, accelerator=ASCEND, pvc=PVCS),
    "cpu-all-options": dict(
        image="registry.example.com/t:1", nnodes=3, nproc_per_node=2, accelerator="none", namespace="ml",
        name="my-run", pvc=PVCS, env=["A=1"], restart_policy="Never", cpu="500m", memory="8G", shm_size="1Gi",
        workdir="/data", node_selector=["pool=cpu"], image_pull_secret=["regcred"],
    ),
}  # fmt: skip


def _cfg(*extra: str):
    return load_config(None, [*BASE, *extra])


def _render(**kw):
    return render(_cfg(), K8sOptions(**kw))


def _templates(job: dict) -> dict[str, dict]:
    return {role: rs["template"] for role, rs in job["spec"]["pytorchReplicaSpecs"].items()}


@pytest.fixture(scope="module")
def pytorchjob_schema(shared_dir: Path) -> dict:
    return crd_schema(shared_dir / "k8s" / "kubeflow.org_pytorchjobs.yaml")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_job_validates_against_the_pytorchjob_crd(variant, pytorchjob_schema):
    job = _render(**VARIANTS[variant]).job
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert schema_violations(job, pytorchjob_schema) == []


def test_the_crd_check_catches_broken_jobs(pytorchjob_schema):
    """The schema check itself can fail: wrong types and misspelled fields are reported."""
    job = _render(**VARIANTS["guide004-2x2"]).job
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    assert any("replicas" in e for e in schema_violations(bad, pytorchjob_schema))
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    assert any("comand" in e for e in schema_violations(bad, pytorchjob_schema))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_configmap_and_pod_templates_validate_with_kubernetes_schemas(variant):
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    rendered = _render(**VARIANTS[variant])
    kubernetes_validate.validate(rendered.config_map, version, strict=True)
    for role, template in _templates(rendered.job).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"x-{role.lower()}"},
                        "template": template}  # fmt: skip
        kubernetes_validate.validate(pod_template, version, strict=True)
    broken = copy.deepcopy(rendered.config_map)
    broken["data"] = {"train.yaml": 3}  # ConfigMap data must be strings: the validator must say so
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_two_nodes_two_gpus_is_one_master_and_one_worker():
    """Guide 004's launch (2 nodes × 2 GPUs), with data and models on PVCs as in guide 000."""
    rendered = _render(**VARIANTS["guide004-2x2"])
    spec = rendered.job["spec"]
    replicas = {role: rs["replicas"] for role, rs in spec["pytorchReplicaSpecs"].items()}
    assert replicas == {"Master": 1, "Worker": 1}
    assert spec["nprocPerNode"] == "2" and "elasticPolicy" not in spec
    for role, template in _templates(rendered.job).items():
        assert spec["pytorchReplicaSpecs"][role]["restartPolicy"] == "OnFailure"
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the operator only wires up this container
        assert container["command"] == ["tunesmith", "train", "/config/train.yaml"] == POD_COMMAND
        assert "args" not in container
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "2", "cpu": "8", "memory": "64Gi"}
        assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
        env = [{"name": "HF_HOME", "value": "/models/hf"}, {"name": "NCCL_DEBUG", "value": "INFO"}]
        assert container["env"] == env
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        config_map = rendered.config_map["metadata"]["name"]
        assert volumes[mounts["/config"]["name"]]["configMap"]["name"] == config_map
        assert mounts["/config"]["readOnly"] is True
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
        models = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
        assert models == {"claimName": "models", "readOnly": True} and mounts["/models"]["readOnly"] is True
        assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"] == {"claimName": "data"}
    assert rendered.warnings == []  # every config path is on a PVC


def test_one_node_is_master_only():
    spec = _render(image="img:1", nproc_per_node=4).job["spec"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Master"]
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["nprocPerNode"] == "4"


def test_elastic_job_is_workers_with_a_c10d_elastic_policy():
    spec = _render(**VARIANTS["elastic"]).job["spec"]
    policy = {"maxReplicas": 4, "maxRestarts": 5, "minReplicas": 2, "rdzvBackend": "c10d"}
    assert spec["elasticPolicy"] == policy
    # the operator needs Worker replicas (rendezvous on worker 0) and no Master; they start at MAX
    assert {role: rs["replicas"] for role, rs in spec["pytorchReplicaSpecs"].items()} == {"Worker": 4}
    spec = _render(**{**VARIANTS["elastic"], "nnodes": 3}).job["spec"]
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3


def test_ascend_requests_npus_and_mounts_the_driver():
    rendered = _render(**VARIANTS["ascend"])
    for template in _templates(rendered.job).values():
        (container,) = template["spec"]["containers"]
        assert container["resources"]["limits"] == {ASCEND: "8"}
        driver = [v for v in template["spec"]["volumes"] if "hostPath" in v]
        assert driver == [{"hostPath": {"path": ASCEND_DRIVER, "type": "Directory"}, "name": "ascend-driver"}]
        mount = {"mountPath": ASCEND_DRIVER, "name": "ascend-driver", "readOnly": True}
        assert mount in container["volumeMounts"]
    assert render(_cfg("device=cuda"), K8sOptions(**VARIANTS["ascend"])).warnings == [
        "config key device = cuda does not match --accelerator huawei.com/Ascend910"
    ]


def test_configmap_holds_the_resolved_config_and_loads_back_to_it(tmp_path):
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    cfg = _cfg(
        "finetuning_type=lora", "lora_rank=16", "lora_target=q_proj,v_proj", "learning_rate=1e-4",
        "placeholders.name=Ada", "report_to=all", f"deepspeed={ds}", "num_train_epochs=2", "run_name=Qwen ID",
    )  # fmt: skip
    rendered = render(cfg, K8sOptions(image="img:1", pvc=PVCS))
    text = rendered.config_map["data"]["train.yaml"]
    data = yaml.safe_load(text)
    assert data["deepspeed"] == {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    # keys left at their defaults, and unset keys, are left out
    assert "per_device_eval_batch_size" not in data and None not in data.values()
    written = tmp_path / "train.yaml"
    written.write_text(text)
    back = load_config(written)
    assert back.model_dump() == cfg.model_copy(update={"deepspeed": data["deepspeed"]}).model_dump()
    assert load_config(written).model_dump() == back.model_dump()  # stable


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(image=None), "--image is missing"),
        (dict(image="  "), "--image is missing"),
        (dict(nnodes=0), "--nnodes 0 is not allowed"),
        (dict(nproc_per_node=0), "--nproc-per-node 0 is not allowed"),
        (dict(accelerator="amd.com/gpu"), "--accelerator 'amd.com/gpu' is not one of"),
        (dict(pvc=["data"]), "--pvc 'data' is not NAME:/mount"),
        (dict(pvc=["Data_1:/data"]), "is not a valid PersistentVolumeClaim name"),
        (dict(pvc=["data:relative"]), "the mount path must be absolute"),
        (dict(pvc=["data:/config"]), "the mount path must be absolute and not /"),
        (dict(pvc=["a:/data", "b:/data/"]), "--pvc mounts two claims at the same path"),
        (dict(env=["NOEQUALS"]), "--env 'NOEQUALS' is not KEY=VALUE"),
        (dict(env=["1BAD NAME=x"]), "is not a valid environment variable name"),
        (dict(env=["MASTER_ADDR=x"]), "--env MASTER_ADDR would fight the rendezvous"),
        (dict(env=["PET_NNODES=2"]), "--env PET_NNODES would fight the rendezvous"),
        (dict(env=["NPROC_PER_NODE=8"]), "--env NPROC_PER_NODE would fight the rendezvous"),
        (dict(elastic="4"), "--elastic '4' is not MIN:MAX"),
        (dict(elastic="3:2"), "--elastic 3:2: MIN must be at least 1"),
        (dict(elastic="1:2", nnodes=5), "--nnodes 5 is outside --elastic 1:2"),
        (dict(memory="16GB"), "--memory '16GB' is not a Kubernetes quantity"),
        (dict(restart_policy="Sometimes"), "--restart-policy 'Sometimes' is not one of"),
        (dict(namespace="My_NS"), "--namespace 'My_NS' is not a valid namespace"),
        (dict(name="Qwen_7B"), "--name 'Qwen_7B' is not a valid job name"),
        (dict(name="x" * 51), "is not a valid job name"),
        (dict(workdir="data"), "--workdir 'data' must be an absolute path"),
        (dict(node_selector=["pool"]), "--node-selector 'pool' is not a valid LABEL=VALUE"),
        (dict(max_restarts=-1), "--max-restarts -1 is not allowed"),
    ],
)
def test_broken_launch_options_are_refused_with_one_sentence(options, message):
    with pytest.raises(ConfigError) as err:
        _render(**{"image": "img:1", **options})
    text = str(err.value)
    assert message in text and "\n" not in text


def test_a_config_too_large_for_a_configmap_is_refused():
    cfg = _cfg()
    cfg.evaluation_inputs = ["x" * 1000] * 1100
    with pytest.raises(ConfigError, match="more than a ConfigMap holds"):
        render(cfg, K8sOptions(image="img:1"))


def test_a_config_without_a_dataset_is_refused():
    cfg = load_config(None, ["model_name_or_path=/models/m", "output_dir=/data/run"])
    with pytest.raises(ConfigError, match="config key dataset is required"):
        render(cfg, K8sOptions(image="img:1"))


def test_job_name_comes_from_name_run_name_or_output_dir():
    assert job_name(_cfg("run_name=Qwen2.5 identity_LoRA"), None) == "qwen2-5-identity-lora"
    assert job_name(_cfg("output_dir=/data/runs/2024_Qwen-7B/"), None) == "qwen-7b"
    assert job_name(_cfg(), "explicit-1") == "explicit-1"
    assert len(job_name(_cfg("run_name=" + "a" * 80), None)) == 50
    with pytest.raises(ConfigError, match="pass --name"):
        job_name(_cfg("output_dir=/data/2024/"), None)


def test_paths_the_pods_cannot_see_are_warned_about():
    pvcs = check_options(K8sOptions(image="i", pvc=PVCS)).pvcs
    on_pvcs = _cfg("adapter_name_or_path=/data/runs/a/checkpoint-10")
    assert path_warnings(on_pvcs, pvcs, None) == []
    local = load_config(None, [
        "model_name_or_path=/home/me/models/qwen", "dataset=data/mine.json", "output_dir=/data/runs/x",
    ])  # fmt: skip
    warnings = path_warnings(local, pvcs, None)
    assert len(warnings) == 2
    assert "model_name_or_path = /home/me/models/qwen is not under any --pvc mount" in warnings[0]
    assert "dataset = data/mine.json is a relative path" in warnings[1] and "working directory" in warnings[1]
    assert path_warnings(local, pvcs, "/data")[1:] == []  # --workdir on a PVC: relative paths land there
    # a packaged alias and dataset names are not paths; dataset_dir only matters when names are used
    alias = load_config(
        None, ["model_name_or_path=smollm2-135m-instruct", "dataset=identity", "output_dir=/data/r"]
    )
    assert [w.split(" = ")[0] for w in path_warnings(alias, pvcs, None)] == ["config key dataset_dir"]
    files = load_config(None, ["model_name_or_path=/models/m", "dataset=/data/a.json", "output_dir=/data/r"])
    assert path_warnings(files, pvcs, None) == []


def test_dry_run_prints_configmap_and_job_and_submits_nothing(tmp_path, monkeypatch, capsys):
    config = tmp_path / "my.yaml"
    config.write_text("model_name_or_path: /home/me/qwen\ndataset: identity\ndataset_dir: /data/d\n"
                      "output_dir: /data/runs/qwen-id\n")  # fmt: skip
    # a dry run must not even read a kubeconfig: point it at one that cannot be loaded
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.setattr(logging.getLogger("tunesmith"), "handlers", [])  # warnings to this test's stderr
    out = tmp_path / "job.yaml"
    argv = ["launch", "k8s", str(config), "--image", "img:1", "--nnodes", "2", "--nproc-per-node", "2",
            "--pvc", "data:/data", "--dry-run", "learning_rate=3e-4"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    config_map, job = yaml.safe_load_all(captured.out)
    assert config_map["kind"] == "ConfigMap" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == "qwen-id" and "namespace" not in job["metadata"]  # kubectl's namespace
    assert yaml.safe_load(config_map["data"]["train.yaml"])["learning_rate"] == 3e-4  # overrides applied
    assert "model_name_or_path = /home/me/qwen is not under any --pvc mount" in captured.err
    assert main([*argv, "--out", str(out)]) == 0
    assert list(yaml.safe_load_all(out.read_text())) == [config_map, job]
    assert capsys.readouterr().out == ""  # with --out the YAML goes to the file only


def test_without_image_gpu_and_cpu_jobs_run_the_published_image_of_this_version(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text("model_name_or_path: /m\ndataset: identity\noutput_dir: /data/r\n")
    images = {}
    for accelerator in (GPU, "none"):
        assert main(["launch", "k8s", str(config), "--accelerator", accelerator, "--dry-run"]) == 0
        job = list(yaml.safe_load_all(capsys.readouterr().out))[1]
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        images[accelerator] = pod["containers"][0]["image"]
    assert images == {GPU: f"ghcr.io/tunesmith/tunesmith:{__version__}",
                      "none": f"ghcr.io/tunesmith/tunesmith:{__version__}-cpu"}  # fmt: skip


def test_cli_refuses_a_broken_job_with_one_line_and_exit_2(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text("model_name_or_path: /m\ndataset: identity\noutput_dir: /data/r\n")
    # no published Ascend (CANN) image: there --image is still required
    assert main(["launch", "k8s", str(config), "--nnodes", "2", "--accelerator", ASCEND, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tunesmith: error: --image is missing")
    assert main(["launch", "k8s", str(config), "--image", "i", "--nproc-per-node", "0", "--dry-run"]) == 2
    assert "--nproc-per-node 0 is not allowed" in capsys.readouterr().err
