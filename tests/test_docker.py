"""docker/Dockerfile (CUDA) and docker/Dockerfile.cpu, read by a small parser of our own: what a build would
trip over or ship wrongly, caught in milliseconds. Building the images takes minutes and a container engine:
that is scripts/build-image.sh, not this suite (README "Container images")."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tunesmith import __version__
from tunesmith.launch.k8s.options import GPU, IMAGE_REPOSITORY, default_image

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cuda": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
KNOWN = {
    "FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "LABEL", "EXPOSE",
    "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD",
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int  # where it starts, for the failure message


def parse(path: Path) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines dropped (Docker's rules:
    a comment is a line whose first non-blank character is #, also inside a continued instruction)."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append(Instruction(keyword, args.strip(), start))
        pending = ""
    assert not pending, f"{path.name}: the last instruction ends with a line continuation"
    return out


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, with /) out of the build context: Docker's matching,
    where * stays within one path component, ** crosses them, a pattern excludes its folder's contents, and
    the last matching pattern (! re-includes) wins."""
    excluded = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def _args(dockerfile: str) -> dict[str, str]:
    found = {}
    for ins in parse(DOCKERFILES[dockerfile]):
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            found[name] = default.strip('"')
    return found


def _pip_pins(dockerfile: str) -> dict[str, str]:
    """name -> version of every quoted requirement in a `pip install` of a RUN instruction."""
    pins = {}
    for ins in parse(DOCKERFILES[dockerfile]):
        for command in re.split(r"&&|;", ins.args) if ins.keyword == "RUN" else []:
            words = shlex.split(command)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]  # VAR=value pip install ...
            if not words or Path(words[0]).name != "pip" or "install" not in words:
                continue
            for word in words[words.index("install") + 1 :]:
                if word.startswith("-") or word.startswith("/") or word.startswith("$"):
                    continue  # options, the tunesmith source folder, the index option
                req = Requirement(word)
                pins[req.name] = str(req.specifier)
    return pins


def _setup_sh_spec(package: str) -> SpecifierSet:
    """The versions scripts/setup.sh installs `package` with ("torch==2.13.0", "deepspeed>=0.19,<0.20")."""
    match = re.search(rf'"{package}([<>=!~][^"]*)"', (REPO / "scripts" / "setup.sh").read_text())
    assert match, f"scripts/setup.sh no longer installs {package} with a version"
    return SpecifierSet(match.group(1))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_instruction_is_one_docker_knows(name):
    instructions = parse(DOCKERFILES[name])
    unknown = [f"line {i.line}: {i.keyword}" for i in instructions if i.keyword not in KNOWN]
    assert instructions and not unknown


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_base_image_is_an_argument_whose_default_is_pinned(name):
    """scripts/build-image.sh --base swaps the base (a local one where no registry is reachable); the default
    names a release, never `latest` or a bare repository that moves under us."""
    instructions = parse(DOCKERFILES[name])
    assert instructions[0].keyword == "ARG" and instructions[0].args.startswith("BASE_IMAGE=")
    base = _args(name)["BASE_IMAGE"]
    repository, _, tag = base.rpartition(":")
    assert "/" in repository and tag and tag != "latest" and re.search(r"\d", tag), base
    stages = []
    for ins in instructions:
        if ins.keyword == "FROM":
            image, *rest = ins.args.split()
            assert image == "${BASE_IMAGE}", f"line {ins.line}: FROM {image} bypasses the BASE_IMAGE argument"
            stages += rest[1:]  # FROM X AS build
    for ins in instructions:
        source = re.search(r"--from=(\S+)", ins.args) if ins.keyword == "COPY" else None
        assert source is None or source.group(1) in stages, f"line {ins.line}: COPY from an outside image"
    assert ":latest" not in DOCKERFILES[name].read_text()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_exist_and_are_in_the_build_context(name):
    copies = [i for i in parse(DOCKERFILES[name]) if i.keyword in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        if "--from=" in ins.args:
            continue
        *sources, _dest = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"{name} line {ins.line}: {source} is not in the repository"
            dropped = dockerignore_excludes(source.rstrip("/"))
            assert not dropped, f"{name} line {ins.line}: .dockerignore drops {source}"
    assert not dockerignore_excludes("src/tunesmith/cli.py")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_runs_tunesmith_as_a_user_that_is_not_root(name):
    instructions = parse(DOCKERFILES[name])
    final = instructions[max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM") :]
    users = [ins.args for ins in final if ins.keyword == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the final stage must switch to a non-root USER"
    assert any(ins.keyword == "RUN" and "useradd" in ins.args and users[-1] in ins.args for ins in final)
    entry = [ins.args for ins in final if ins.keyword == "ENTRYPOINT"]
    assert entry == ['["tunesmith"]']  # exec form: signals reach tunesmith (PID 1) directly
    assert not any(ins.keyword == "ADD" for ins in final)  # nothing fetched from URLs, no archives unpacked


def test_torch_and_deepspeed_are_the_versions_scripts_setup_sh_installs():
    torch = _setup_sh_spec("torch")
    deepspeed = _setup_sh_spec("deepspeed")
    cpu, cuda = _pip_pins("cpu"), _pip_pins("cuda")
    assert cpu["torch"] == str(torch)  # the CPU build of the same release, installed like setup.sh does
    torch_version = str(torch).removeprefix("==")
    cuda_tag = _args("cuda")["BASE_IMAGE"].rpartition(":")[2]
    assert cuda_tag.startswith(f"{torch_version}-cuda")  # PyTorch's image of the same torch
    for pins in (cpu, cuda):
        assert pins["deepspeed"].startswith("==") and Version(pins["deepspeed"][2:]) in deepspeed
        unpinned = {name: spec for name, spec in pins.items() if not spec.startswith("==")}
        assert not unpinned, f"every package a Dockerfile installs by name is pinned: {unpinned}"
    for text in (DOCKERFILES["cpu"].read_text(), DOCKERFILES["cuda"].read_text()):
        assert "--no-build-isolation" in text  # deepspeed's build sees the installed torch, as in setup.sh


def test_deepspeed_prebuilds_only_ops_that_run_on_any_cpu():
    """DeepSpeed compiles its CPU ops (CPU Adam, async I/O) with -march=native and the build machine's SIMD
    flags: prebuilt into an image they would crash with an illegal instruction on an older CPU. Those compile
    at first use (a compiler stays in the image); the CUDA image prebuilds the GPU ops, whose targets
    TORCH_CUDA_ARCH_LIST sets."""
    builds = {}
    for name in DOCKERFILES:
        runs = [i.args for i in parse(DOCKERFILES[name]) if i.keyword == "RUN" and "deepspeed==" in i.args]
        assert len(runs) == 1 and "DS_BUILD_OPS=0" in runs[0]
        builds[name] = set(re.findall(r"DS_BUILD_(\w+)=1", runs[0]))
    assert builds["cpu"] == set()
    assert {"FUSED_ADAM", "FUSED_LAMB"} <= builds["cuda"]
    assert not builds["cuda"] & {"CPU_ADAM", "CPU_ADAGRAD", "CPU_LION", "AIO"}
    assert _args("cuda")["TORCH_CUDA_ARCH_LIST"]
    # without a GPU at build time DeepSpeed falls back to its CPU accelerator and builds the CPU flavour
    for name, accelerator in (("cuda", "cuda"), ("cpu", "cpu")):
        envs = " ".join(ins.args for ins in parse(DOCKERFILES[name]) if ins.keyword == "ENV")
        assert f"DS_ACCELERATOR={accelerator}" in envs
    for name in DOCKERFILES:
        final = parse(DOCKERFILES[name])
        final = final[max(i for i, ins in enumerate(final) if ins.keyword == "FROM") :]
        has_compiler = any(ins.keyword == "RUN" and "g++" in ins.args for ins in final)
        devel = _args(name)["BASE_IMAGE"].endswith("-devel")  # PyTorch's devel images have g++ and nvcc
        assert has_compiler or devel, f"{name}: no compiler for DeepSpeed's JIT-compiled ops"


def test_the_constraints_pins_are_inside_what_tunesmith_declares():
    import tomllib

    declared = {}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["cluster"]:
        req = Requirement(text)
        declared[req.name.lower().replace("_", "-")] = req.specifier
    for line in (REPO / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert str(req.specifier).startswith("=="), line
            spec = declared.get(req.name.lower().replace("_", "-"))
            assert spec is None or Version(str(req.specifier)[2:]) in spec, f"{line} is outside {spec}"


def test_dockerignore_keeps_outputs_caches_weights_and_git_out_of_the_context():
    for path in (".git/HEAD", "test-artifacts/run/log.txt", "src/tunesmith/__pycache__/cli.cpython-311.pyc",
                 ".pytest_cache/v", ".ruff_cache/x", ".venv/bin/python", "saves/qwen/model.safetensors",
                 "output/run1/adapter_model.safetensors", "runs/x", "build/lib/x", "dist/t.whl", "m.gguf",
                 "src/tunesmith.egg-info/PKG-INFO"):  # fmt: skip
        assert dockerignore_excludes(path), f".dockerignore lets {path} into the image's build context"
    for path in ("pyproject.toml", "README.md", "src/tunesmith/resources", "docker/constraints.txt"):
        assert not dockerignore_excludes(path), path


def test_the_default_launch_image_is_the_one_the_build_script_tags():
    script = (REPO / "scripts" / "build-image.sh").read_text()
    assert f"REPOSITORY={IMAGE_REPOSITORY}\n" in script
    assert default_image(GPU) == f"{IMAGE_REPOSITORY}:{__version__}"  # the CUDA image: --cuda's tag
    assert default_image("none") == f"{IMAGE_REPOSITORY}:{__version__}-cpu"
    assert "tag=$REPOSITORY:$VERSION || tag=$REPOSITORY:$VERSION-cpu" in script
