"""deploy/docker/Dockerfile read as text (no Docker engine here): its two targets, cpu (CPU torch from
the PyTorch CPU index, no vLLM; docker-compose.yml's image) and gpu (CUDA torch, the project's vllm
extra, gcc for Triton; deploy/kuberay/'s image). Each check is a function of the text, and each is
shown to catch a Dockerfile broken the way it guards against."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from _deploy_helpers import COMPOSE_FILE, DEPLOY, ROOT
from packaging.requirements import Requirement

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_PIN = '"torch==${TORCH_VERSION}"'


def global_args(text: str) -> dict[str, str]:
    """`ARG NAME=default` lines before the first FROM."""
    head = text.split("\nFROM ", 1)[0]
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", head, re.M))


def stages(text: str) -> dict[str, dict]:
    """Each build stage by name: its base (`FROM base AS name`) and its instructions, continuation
    lines joined and comments dropped, in order."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, dict] = {}
    current = None
    for line in joined.splitlines():
        line = line.strip()
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            out[current] = {"from": m.group(1), "lines": []}
        elif current and line and not line.startswith("#"):
            out[current]["lines"].append(line)
    return out


def _pip_lines(stage: dict) -> list[str]:
    return [l for l in stage["lines"] if l.startswith("RUN") and "pip install" in l]


def _project_install_at(stage: dict) -> int | None:
    """Index of the pip line that installs the project (`.` or `.[extras]`)."""
    for i, line in enumerate(_pip_lines(stage)):
        if re.search(r'pip install (\S+ )*"?\.(\[[\w,]+\])?"?( |$)', line):
            return i
    return None


def problems(text: str) -> list[str]:
    """What is wrong with the Dockerfile's targets (empty: nothing)."""
    bad = []
    args, st = global_args(text), stages(text)
    if args.get("TORCH_VERSION") != "2.13.0":
        bad.append(f"TORCH_VERSION default is {args.get('TORCH_VERSION')!r}, not scripts/setup.sh's 2.13.0")
    for name in ("cpu", "gpu"):
        if st.get(name, {}).get("from") != "base":
            bad.append(f"no target {name!r} built on the base stage")
    if bad:
        return bad
    if st["base"]["from"] != "python:3.11-slim":
        bad.append(f"base image {st['base']['from']}")
    if list(st)[-1] != "cpu":
        bad.append("the default target (the last stage) is not cpu")
    bad += _cpu_problems(st["cpu"], args) + _gpu_problems(st["gpu"], args)
    for name in ("cpu", "gpu"):
        if st[name]["lines"][-1] != "USER aepo":
            bad.append(f"{name}: does not end as the unprivileged user aepo")
        if "COPY --from=source /app /app" not in st[name]["lines"]:
            bad.append(f"{name}: does not copy the project's source stage")
    return bad


def _torch_before_project(stage: dict, name: str) -> list[str]:
    pips = _pip_lines(stage)
    torch_at = next((i for i, l in enumerate(pips) if TORCH_PIN in l), None)
    project_at = _project_install_at(stage)
    if torch_at is None or project_at is None or torch_at >= project_at:
        return [f"{name}: torch is not pinned and installed before the project (which would pull its own)"]
    return []


def _cpu_problems(stage: dict, args: dict) -> list[str]:
    bad = _torch_before_project(stage, "cpu")
    torch_line = next((l for l in _pip_lines(stage) if TORCH_PIN in l), "")
    index = re.search(r'--index-url "?\$\{?(\w+)\}?"?', torch_line)
    if not index or args.get(index.group(1)) != CPU_INDEX:
        bad.append(f"cpu: torch is not installed from the PyTorch CPU index {CPU_INDEX}")
    if any("vllm" in l.lower() for l in stage["lines"]):
        bad.append("cpu: installs vLLM")
    if not any("torch.version.cuda is None" in l for l in stage["lines"]):
        bad.append("cpu: the build does not check that torch is the CPU build")
    return bad


def _gpu_problems(stage: dict, args: dict) -> list[str]:
    bad = _torch_before_project(stage, "gpu")
    if any("--index-url" in l for l in _pip_lines(stage)):
        bad.append("gpu: torch from another index than PyPI's CUDA build")
    apt = " ".join(l for l in stage["lines"] if "apt-get install" in l).split()
    for pkg in ("gcc", "libc6-dev"):  # Triton compiles its launchers at run time; gcc alone has no libc headers
        if pkg not in apt:
            bad.append(f"gpu: {pkg} is not installed (Triton needs a C compiler at run time)")
    pips = _pip_lines(stage)
    project_at = _project_install_at(stage)
    if project_at is None or '".[vllm]"' not in pips[project_at]:
        bad.append("gpu: the project is not installed with its vllm extra")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"].get("vllm", [])
    spec = next((Requirement(r) for r in extra if Requirement(r).name == "vllm"), None)
    pinned = args.get("VLLM_VERSION")
    if spec is None or not pinned or pinned not in spec.specifier:
        bad.append(f"gpu: VLLM_VERSION {pinned!r} does not meet the vllm extra {spec}")
    if not any("torch.version.cuda" in l and "assert" in l for l in stage["lines"]):
        bad.append("gpu: the build does not check that torch is a CUDA build")
    return bad


def test_the_dockerfile_has_a_cpu_and_a_gpu_target():
    assert problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    "old, new, expect",
    [
        (' --index-url "${TORCH_CPU_INDEX_URL}"', "", "CPU index"),  # CUDA torch in the CPU image
        ("ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu", "ARG TORCH_CPU_INDEX_URL=https://example.invalid/cu",
         "CPU index"),
        ("gcc libc6-dev", "libc6-dev", "gcc is not installed"),
        ('pip install ".[vllm]"', "pip install .", "vllm extra"),
        ("ARG VLLM_VERSION=0.32.0", "ARG VLLM_VERSION=0.9.0", "VLLM_VERSION"),
        ("FROM base AS cpu", "FROM base AS cpu-image", "no target 'cpu'"),
    ],
)
def test_the_checks_catch_a_broken_dockerfile(old, new, expect):
    text = DOCKERFILE.read_text()
    assert old in text
    found = problems(text.replace(old, new, 1))
    assert any(expect in p for p in found), found


def test_dockerfile_copies_only_what_exists():
    text = DOCKERFILE.read_text()
    for src in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
    assert re.search(r"^EXPOSE .*\b8265\b.*\b8080\b.*\b9400\b.*\b8000\b", text, re.M)


def test_compose_builds_the_cpu_target_and_kuberay_runs_the_gpu_image():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    image = compose["x-aepo-image"]
    assert image["build"] == {"context": ".", "dockerfile": "deploy/docker/Dockerfile", "target": "cpu"}
    assert image["image"].endswith("-cpu")
    images = set()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        text = (DEPLOY / "kuberay" / name).read_text()
        images |= set(re.findall(r"^\s*image: (\S+)$", text, re.M))
    assert images and all(i.endswith("-gpu") for i in images), images
