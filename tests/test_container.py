"""The container image and the Kubernetes manifest that runs it, checked without a container runtime.

No runtime works on the machines the tests run on, so `deploy/container/Containerfile` is read
here the way a builder reads it (instructions, continuations, stages, ARG substitution in FROM)
and held to what would break the image or its users: the base, the torch pin the Makefile
keeps, the exec-form entry point that makes the server PID 1, a numeric non-root user, volumes
for every path the server writes, settings that exist. `deploy/kubernetes/pipeserve.yaml` is held
to the image (user, volumes, port) and to the real command-line parser. The last test runs the
server itself on a read-only root filesystem with only the image's two volumes writable, where
the machine lets a test make one (root and mount namespaces).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
CONTEXT_IGNORE = REPO / "deploy" / "container" / "Containerfile.dockerignore"
MANIFEST = REPO / "deploy" / "kubernetes" / "pipeserve.yaml"


# --- reading the Containerfile ---------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    stage: int  # index of the FROM it follows; -1 before the first FROM (global ARGs)


def instructions(text: str) -> list[Instruction]:
    """The instructions of a Containerfile: comments dropped, backslash continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append((pending + line).strip())
        pending = ""
    assert not pending, "the Containerfile ends inside a continued line"
    parsed: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        parsed.append(Instruction(keyword, args.strip(), stage))
    return parsed


def containerfile() -> list[Instruction]:
    return instructions(CONTAINERFILE.read_text())


def final_stage(parsed: list[Instruction]) -> list[Instruction]:
    last = max(instruction.stage for instruction in parsed)
    return [instruction for instruction in parsed if instruction.stage == last]


def only(parsed: list[Instruction], keyword: str) -> Instruction:
    found = [instruction for instruction in parsed if instruction.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument; fails on the shell form."""
    assert args.startswith("["), f"not exec form (a shell would run it): {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), args
    return value


def args_of(parsed: list[Instruction], stage: int | None = None) -> dict[str, str]:
    """ARG defaults: the global ones (before the first FROM), or one stage's."""
    wanted = -1 if stage is None else stage
    values: dict[str, str] = {}
    for instruction in parsed:
        if instruction.keyword == "ARG" and instruction.stage == wanted:
            name, _, default = instruction.args.partition("=")
            values[name.strip()] = default.strip().strip('"')
    return values


def env_of(parsed: list[Instruction]) -> dict[str, str]:
    """The variables that ENV sets in these instructions (key=value form; later ones win)."""
    values: dict[str, str] = {}
    for instruction in parsed:
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.args)
        assert all("=" in word for word in words), f"use ENV KEY=VALUE: {instruction.args}"
        for word in words:
            name, value = word.split("=", 1)
            values[name] = value
    return values


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def base_images(parsed: list[Instruction]) -> list[str]:
    """Every FROM's image with the global ARGs substituted, except FROMs of an earlier stage."""
    variables = args_of(parsed)
    stages: set[str] = set()
    images: list[str] = []
    for instruction in parsed:
        if instruction.keyword != "FROM":
            continue
        words = instruction.args.split()
        image = substitute(words[0], variables)
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if image not in stages:
            images.append(image)
    return images


def copy_sources(parsed: list[Instruction]) -> set[str]:
    """What the COPY instructions take from the build context (not from another stage)."""
    sources: set[str] = set()
    for instruction in parsed:
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(instruction.args)
        if any(word.startswith("--from") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.update(path.removeprefix("./").rstrip("/") for path in paths[:-1])
    return sources


def user_ids(parsed: list[Instruction]) -> tuple[int, int]:
    """The final stage's USER as numbers (uid, gid)."""
    users = [instruction.args for instruction in final_stage(parsed) if instruction.keyword == "USER"]
    assert users, "the image runs as root: no USER in the final stage"
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"USER must be numeric uid:gid, or runAsNonRoot cannot verify it: {users[-1]}"
    return int(match.group(1)), int(match.group(2))


# --- reading the manifest --------------------------------------------------------------------------


def manifest() -> dict[str, Any]:
    import yaml

    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text())}


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = manifest()["Deployment"]["spec"]["template"]["spec"]
    return spec


def server_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def manifest_env() -> dict[str, str]:
    """The container's plain env values (those from a Secret have none here)."""
    return {item["name"]: str(item["value"]) for item in server_container().get("env", []) if "value" in item}


def effective_security(key: str) -> Any:
    """A securityContext field as the kubelet applies it: the container's, else the pod's."""
    container = server_container().get("securityContext", {})
    return container[key] if key in container else pod_spec().get("securityContext", {}).get(key)


def pipeserve_env() -> dict[str, str]:
    """PIPESERVE_* as the server sees them in the pod: the image's, overridden by the manifest's."""
    image = {k: v for k, v in env_of(final_stage(containerfile())).items() if k.startswith("PIPESERVE_")}
    return {**image, **{k: v for k, v in manifest_env().items() if k.startswith("PIPESERVE_")}}


# --- the Containerfile ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_base_is_python_311_slim_bookworm_with_tcmalloc() -> None:
    parsed = containerfile()
    images = base_images(parsed)
    assert len(images) >= 1
    for image in images:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm", image), image
    # The virtual environment built in one stage runs in the next: its interpreter is a link to
    # the base image's python, which must be the same one.
    assert len(set(images)) == 1, images
    # The model processes' allocator, under the name it has on bookworm (trixie renamed it
    # libtcmalloc-minimal4t64); no recommended extras, no package lists left in the layer.
    runtime_runs = [i.args for i in final_stage(parsed) if i.keyword == "RUN"]
    apt = next(run for run in runtime_runs if "apt-get install" in run)
    assert re.search(r"\blibtcmalloc-minimal4( |$)", apt), apt
    assert "--no-install-recommends" in apt and "rm -rf /var/lib/apt/lists" in apt


@pytest.mark.timeout(30)
def test_torch_is_the_makefiles_pin_from_the_cpu_index() -> None:
    pin = re.search(r"^TORCH\s*:?=\s*torch==(\S+)\s*$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert pin, "the Makefile no longer pins torch as TORCH := torch==X"
    parsed = containerfile()
    stage_args = {name: value for stage in range(max(i.stage for i in parsed) + 1)
                  for name, value in args_of(parsed, stage).items()}
    assert stage_args.get("TORCH_VERSION") == pin.group(1), "the image's torch differs from the Makefile's"
    installs = [substitute(i.args, stage_args) for i in parsed
                if i.keyword == "RUN" and re.search(r"pip install.*torch==", i.args)]
    assert len(installs) == 1, installs
    words = shlex.split(installs[0])
    assert f"torch=={pin.group(1)}" in words
    assert "--index-url" in words, "without PyPI's index replaced, torch comes as a CUDA build"
    assert words[words.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"


@pytest.mark.timeout(30)
def test_the_project_is_installed_from_a_small_context() -> None:
    parsed = containerfile()
    assert copy_sources(parsed) == {"setup.cfg", "pyproject.toml", "README.md", "src"}
    assert any(re.search(r"pip install (--no-cache-dir )?\.( |$)", i.args) for i in parsed if i.keyword == "RUN")
    # Containerfile.dockerignore (BuildKit and podman read <Containerfile>.dockerignore beside it):
    # everything out, then exactly the COPY sources back in, none of them excluded again.
    patterns = [line.strip() for line in CONTEXT_IGNORE.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert patterns[0] == "*", "the ignore file must start by excluding everything"
    let_in = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert let_in == copy_sources(parsed)
    assert not {pattern.rstrip("/") for pattern in patterns[1:]} & copy_sources(parsed)


@pytest.mark.timeout(30)
def test_entry_point_is_python_m_pipeserve_in_exec_form() -> None:
    runtime = final_stage(containerfile())
    # No shell and no init in between: SIGTERM goes to the server, which is PID 1.
    assert exec_form(only(runtime, "ENTRYPOINT").args) == ["python", "-m", "pipeserve"]
    assert exec_form(only(runtime, "CMD").args) == []  # `docker run IMAGE --model x` appends flags
    assert only(runtime, "STOPSIGNAL").args == "SIGTERM"
    assert not [i for i in runtime if i.keyword == "SHELL"]
    # `python` is the virtual environment's: its bin first on PATH, copied whole from the builder.
    path = env_of(runtime)["PATH"].split(":")
    copied = [shlex.split(i.args) for i in runtime if i.keyword == "COPY" and "--from=" in i.args]
    assert any(words[-1].rstrip("/") + "/bin" == path[0] for words in copied), (path, copied)
    healthchecks = [i for i in runtime if i.keyword == "HEALTHCHECK"]
    for healthcheck in healthchecks:  # optional; slim images have no curl or wget
        command = exec_form(healthcheck.args.split(" CMD ", 1)[1].strip())
        assert command[:2] == ["python", "-c"] and "/health" in command[2], command


@pytest.mark.timeout(30)
def test_user_is_numeric_non_root_and_owns_the_cache() -> None:
    parsed = containerfile()
    uid, gid = user_ids(parsed)
    assert uid != 0 and gid != 0
    runtime = final_stage(parsed)
    hf_home = env_of(runtime)["HF_HOME"]
    # The cache directory is the user's before it becomes a volume: a named volume copies that
    # owner, and a change made after VOLUME would be thrown away.
    owner = [index for index, i in enumerate(runtime)
             if i.keyword == "RUN" and hf_home in i.args and re.search(rf"\b{uid}\b", i.args)]
    volume = [index for index, i in enumerate(runtime) if i.keyword == "VOLUME"]
    assert owner and volume and owner[0] < volume[0]
    # Group 0's too, and writable by it: OpenShift runs the image as an arbitrary UID in group 0.
    assert re.search(rf"-g 0 -m 0775 {re.escape(hf_home)}\b", runtime[owner[0]].args)


@pytest.mark.timeout(30)
def test_every_written_path_is_a_volume() -> None:
    runtime = final_stage(containerfile())
    env = env_of(runtime)
    declared = only(runtime, "VOLUME").args
    volumes = set(exec_form(declared) if declared.startswith("[") else declared.split())
    assert env["HF_HOME"] in volumes
    assert env["TMPDIR"] == "/tmp" and "/tmp" in volumes
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # nothing tries to write beside the code
    assert env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.timeout(30)
def test_pipeserve_variables_are_real_settings_and_listen_beyond_loopback() -> None:
    from pipeserve.front.config import Config, env_name, load_config

    runtime = final_stage(containerfile())
    settings = {k: v for k, v in env_of(runtime).items() if k.startswith("PIPESERVE_")}
    known = {env_name(f.name) for f in dataclasses.fields(Config)}
    assert settings and set(settings) <= known, set(settings) - known
    config = load_config([], environ=settings)  # every value parses (a bad one exits 2)
    assert config.host == "0.0.0.0", "a container's loopback is unreachable from outside it"
    assert only(runtime, "EXPOSE").args.split("/")[0] == str(config.port)


# --- the Kubernetes manifest ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_manifest_runs_the_images_user_on_a_read_only_root() -> None:
    uid, gid = user_ids(containerfile())
    assert effective_security("runAsNonRoot") is True
    assert (effective_security("runAsUser"), effective_security("runAsGroup")) == (uid, gid)
    assert effective_security("readOnlyRootFilesystem") is True
    assert effective_security("allowPrivilegeEscalation") is False
    assert "ALL" in (effective_security("capabilities") or {}).get("drop", [])
    container = server_container()
    # The image's entry point runs (PID 1 = the server); a `command` would replace it.
    assert "command" not in container or container["command"] == ["python", "-m", "pipeserve"]


@pytest.mark.timeout(30)
def test_manifest_mounts_tmp_and_the_hf_cache() -> None:
    hf_home = manifest_env().get("HF_HOME") or env_of(final_stage(containerfile()))["HF_HOME"]
    mounts = {mount["mountPath"]: mount for mount in server_container().get("volumeMounts", [])}
    assert "/tmp" in mounts and hf_home in mounts, sorted(mounts)
    volumes = {volume["name"] for volume in pod_spec().get("volumes", [])}
    for path in ("/tmp", hf_home):
        assert mounts[path]["name"] in volumes
        assert not mounts[path].get("readOnly", False)


@pytest.mark.timeout(30)
def test_manifest_args_and_env_are_real_settings() -> None:
    from pipeserve.front.config import Config, build_parser, env_name, load_config

    args = [str(arg) for arg in server_container().get("args", [])]
    _, unknown = build_parser().parse_known_args(args)  # a bad value exits 2 here
    assert unknown == [], f"flags the server does not have: {unknown}"
    # Whole names only: argparse also takes an unambiguous prefix, which a new flag can break.
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    assert {arg.split("=", 1)[0] for arg in args if arg.startswith("--")} <= flags
    known = {env_name(f.name) for f in dataclasses.fields(Config)}
    named = {item["name"] for item in server_container().get("env", [])}
    assert {name for name in named if name.startswith("PIPESERVE_")} <= known
    config = load_config(args, environ=pipeserve_env())
    ports = {port["name"]: port["containerPort"] for port in server_container()["ports"]}
    assert ports["http"] == config.port
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
        assert server_container()[probe]["httpGet"] == {"path": path, "port": "http"}


@pytest.mark.timeout(30)
def test_grace_period_outlasts_the_drain() -> None:
    from pipeserve.front.config import load_config
    from pipeserve.front.worker import SHUTDOWN_GRACE_S

    args = [str(arg) for arg in server_container().get("args", [])]
    config = load_config(args, environ=pipeserve_env())  # flag > variable > default, as at run time
    # preStop's pause (serving while the endpoint removal spreads) → SIGTERM → drain (up to
    # --drain-timeout) → each model process gets its exit grace → exit; the kubelet's SIGKILL
    # must come after all of it.
    pause = server_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep" and float(pause[1]) >= 1
    assert pod_spec()["terminationGracePeriodSeconds"] > float(pause[1]) + config.drain_timeout + SHUTDOWN_GRACE_S


# --- the server on a read-only root filesystem --------------------------------------------------------

# Run inside `unshare --mount` (a private mount namespace: nothing here is seen outside it):
# the image's writable paths as fresh tmpfs mounts, every other path read-only, then the server.
_READ_ONLY_ROOT = r"""
set -e
mount --make-rprivate /
parent=$(dirname "$HF_HOME")
mount -t tmpfs -o mode=0755 tmpfs "$parent"
mkdir -p "$HF_HOME"
mount -t tmpfs -o "mode=0755,uid=$RUN_UID,gid=$RUN_GID" tmpfs "$HF_HOME"
mount -o remount,ro "$parent"
mount -o remount,bind,ro /
mount -t tmpfs -o mode=1777 tmpfs /tmp
test ! -w / && test ! -w /usr && echo "root filesystem is read-only"
exec "$@"
"""


def _mount_namespaces_work() -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    if not (shutil.which("unshare") and shutil.which("mount") and shutil.which("sh")):
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c",
                            "mount --make-rprivate / && mount -o remount,bind,ro / && test ! -w /"],
                           capture_output=True, timeout=10)
    return probe.returncode == 0


def _reachable_by_others(path: Path) -> bool:
    """Whether a user other than the owner may reach `path` (every directory above it o+x)."""
    return all(directory.stat().st_mode & stat.S_IXOTH for directory in path.resolve().parents)


@pytest.mark.timeout(30)
def test_server_serves_and_drains_on_a_read_only_root(start_server: Callable[..., Any]) -> None:
    if not _mount_namespaces_work():
        pytest.skip("needs root and mount namespaces (unshare --mount)")
    runtime = final_stage(containerfile())
    env = {k: v for k, v in env_of(runtime).items() if k != "PATH"}
    hf_home = Path(env["HF_HOME"])
    code = [Path(sys.executable).resolve(), Path(sys.prefix), REPO]
    if not hf_home.parent.is_dir():
        pytest.skip(f"{hf_home.parent} does not exist here to mount the cache under")
    if any(path.resolve().is_relative_to(hidden) for path in code for hidden in (Path("/tmp"), hf_home.parent)):
        pytest.skip("the interpreter or the checkout lies under a path this test mounts over")
    uid, gid = user_ids(containerfile())
    # As the image's user where the interpreter is reachable by it (here it may live under a
    # private home directory); the read-only root holds for root as much as for anyone.
    as_user = shutil.which("setpriv") is not None and all(_reachable_by_others(path) for path in code)
    switch = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"] if as_user else []
    env.update(HOME="/nonexistent", RUN_UID=str(uid), RUN_GID=str(gid))
    command = ["unshare", "--mount", "sh", "-c", _READ_ONLY_ROOT, "sh", *switch,
               sys.executable, "-m", "pipeserve", "--host", "127.0.0.1", "--port", "0"]
    server = start_server("--dtype", "float32", env=env, command=command)  # the embedded model
    server.wait_log("root filesystem is read-only")
    assert server.request("GET", "/health").status == 200
    reply = server.request("POST", "/", "A sentence to embed.")
    assert reply.status == 200, reply.body
    assert len(reply.json()) == 384
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0, server.log
    for complaint in ("Read-only file system", "Permission denied", "Traceback"):
        assert complaint not in server.log, server.log
