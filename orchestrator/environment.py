"""Where a run's numbers were computed: the machine and the numeric libraries, as MLflow tags.

A trial's numbers depend on its configuration and seed, and in their last bits on the kernels
that computed them: torch's ATen and oneDNN pick SIMD code by the CPU's instruction sets, numpy
and OpenBLAS by theirs, and each library version brings its own. Training amplifies last-bit
differences, so two rows compared by a verdict are comparable only if they ran in the same
environment, or were shown not to depend on it. Every run, sweep trial and ``avlab evaluate`` run
is tagged (``avlab.env.*``):

- ``cpu`` (the model name), ``cpu_capability`` (ATen's dispatch level: DEFAULT, AVX2, AVX512,
  ...), ``numpy_simd`` (numpy's baseline and the dispatch targets this CPU enables), ``blas``
  (each BLAS loaded: library, version and the core type OpenBLAS chose);
- ``gpu`` and ``gpu_driver`` where a CUDA device is used;
- the versions of python, torch, numpy, scipy, scikit-learn, torchvision, torchaudio, ray and
  mlflow; ``onednn``, ``mkl`` (torch's build);
- ``overrides``: environment variables that change the kernels (``ATEN_CPU_CAPABILITY``,
  ``ONEDNN_MAX_CPU_ISA``, ``OPENBLAS_CORETYPE``, ...) where set;
- ``id``: a short hash of everything above that can change a number (not ``cpu``'s model name,
  nor ray's and mlflow's versions), the one tag a report compares; ``history``: the ids of the
  environments the run's attempts ran in, oldest first (a run restarted on another node says so).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from typing import Any

TAG = "env."  # under tracking's "avlab." prefix
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OPENBLAS_CORETYPE",
                    "NPY_DISABLE_CPU_FEATURES", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "CUBLAS_WORKSPACE_CONFIG")
PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "torchvision", "torchaudio", "ray", "mlflow")
NOT_NUMERIC = ("cpu", "ray", "mlflow", "id", "history")  # recorded, but no part of ``id``


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numpy_simd() -> str:
    try:
        from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__
    except ImportError:  # another numpy layout: say so rather than guess
        return "unknown"
    enabled = [d for d in __cpu_dispatch__ if __cpu_features__.get(d)]
    return f"baseline {'+'.join(__cpu_baseline__) or 'none'}; dispatch {'+'.join(enabled) or 'none'}"


def _blas() -> str:
    from importlib import import_module

    from threadpoolctl import threadpool_info

    for module in ("numpy", "scipy.linalg"):  # each loads its BLAS, which threadpoolctl then finds
        import_module(module)

    found = sorted({f"{i.get('internal_api')} {i.get('version')} {i.get('architecture') or ''}".strip()
                    for i in threadpool_info() if i.get("user_api") == "blas"})
    return "; ".join(found) or "none"


def _torch_build() -> dict[str, str]:
    import torch

    shown = torch.__config__.show()
    onednn = re.search(r"MKL-DNN (v[0-9.]+)", shown)
    mkl = re.search(r"Math Kernel Library Version (\S+)", shown)
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn": onednn.group(1) if onednn else "none", "mkl": mkl.group(1) if mkl else "none"}


def _gpu(device: Any) -> dict[str, str]:
    import torch

    if device is None or torch.device(device).type != "cuda":
        return {}
    out = {"gpu": torch.cuda.get_device_name(device), "cuda": str(torch.version.cuda)}
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.splitlines()
        out["gpu_driver"] = line[0].strip() if line else "unknown"
    except (OSError, subprocess.SubprocessError):
        out["gpu_driver"] = "unknown"
    return out


@functools.lru_cache(maxsize=4)
def describe(device: str | None = None) -> dict[str, str]:
    """This process's environment (the module docstring's fields but ``history``), ``id`` included."""
    env = {"cpu": _cpu_model(), "machine": platform.machine(), "python": platform.python_version(),
           **_torch_build(), "numpy_simd": _numpy_simd(), "blas": _blas(), **_gpu(device)}
    env.update({package.replace("scikit-learn", "sklearn"): _version(package) for package in PACKAGES})
    overrides = {k: os.environ[k] for k in KERNEL_VARIABLES if os.environ.get(k)}
    if overrides:
        env["overrides"] = ",".join(f"{k}={v}" for k, v in overrides.items())
    env["id"] = environment_id(env)
    return env


def environment_id(env: dict[str, str]) -> str:
    """A short hash of the fields of ``env`` that can change a number."""
    numeric = {k: v for k, v in env.items() if k not in NOT_NUMERIC}
    return hashlib.sha256(json.dumps(numeric, sort_keys=True).encode()).hexdigest()[:10]


def tag_run(client: Any, run_id: str, device: Any = None) -> dict[str, str]:
    """Tag ``run_id`` with this process's environment and append its id to ``env.history``."""
    from orchestrator import tracking

    env = describe(None if device is None else str(device))
    previous = client.get_run(run_id).data.tags.get(f"{tracking.TAG_PREFIX}{TAG}history", "")
    history = [h for h in previous.split(",") if h][-50:]
    if not history or history[-1] != env["id"]:
        history.append(env["id"])
    tracking.set_tags(client, run_id, {f"{TAG}{k}": v[:4000] for k, v in env.items()}
                      | {f"{TAG}history": ",".join(history)})
    return env


def of_run(run: Any) -> str | None:
    """The environment id a run was tagged with (None: a run made before the tag)."""
    return run.data.tags.get(f"avlab.{TAG}id")


def summary(runs: list[Any]) -> str | None:
    """One line when ``runs`` ran in more than one environment (or some recorded none), naming
    each environment by its id, CPU capability and torch version; None when they all agree."""
    seen: dict[str | None, list[Any]] = {}
    for run in runs:
        seen.setdefault(of_run(run), []).append(run)
    if len(seen) <= 1:
        return None
    parts = []
    for env_id, group in seen.items():
        tags = group[0].data.tags
        what = ("not recorded" if env_id is None else
                f"{env_id}: {tags.get(f'avlab.{TAG}cpu_capability', '?')}, torch {tags.get(f'avlab.{TAG}torch', '?')}, "
                f"{tags.get(f'avlab.{TAG}cpu', '?')}")
        parts.append(f"{len(group)} in {what}")
    return (f"The runs compared here ran in {len(seen)} environments (tag `avlab.env.id`; their last "
            f"digits may differ for that alone): " + "; ".join(parts) + ".")


def elsewhere(runs: list[Any], here: str) -> str | None:
    """One line when some of ``runs`` were computed in an environment other than ``here`` (an
    ``avlab.env.id``); None when every one ran in it."""
    other = [r for r in runs if of_run(r) != here]
    if not other:
        return None
    ids = sorted({of_run(r) or "unrecorded" for r in other})
    return (f"{len(other)} of {len(runs)} trials were computed in environment {', '.join(ids)}, not in this one "
            f"({here}): taken with --reuse-across-environments")


if __name__ == "__main__":  # `python -m orchestrator.environment`: this machine's tags
    json.dump(describe(), sys.stdout, indent=1)
    print()
