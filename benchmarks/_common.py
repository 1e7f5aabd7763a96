r"""What the benchmark scripts share: device timing helpers, the machine description written
into every JSON, and the model (the papers' gated MLP VAE, from the library).

Importing this module puts this checkout's root first on ``sys.path``, so that the scripts
time this checkout's ``vaepriors`` and not an installed copy; it does not import ``vaepriors``
itself, so a script may still put another checkout first (``--root``) before it does.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))  # this checkout's vaepriors

import torch  # noqa: E402
from torch import nn  # noqa: E402


__all__ = ["MODEL", "ROOT", "device_name", "machine", "model", "sync", "write_results"]

MODEL = "gated MLP VAE 784-300-300, d = 40, Bernoulli decoder (vaepriors.models.make_mlp_vae)"
"""The model every script times, in words (for the tables)."""


def sync(device: torch.device | str) -> None:
    r"""Waits for the device's queued work (CUDA), so that wall-clock timings are complete."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    r"""The GPU's name on CUDA, else the CPU model (from ``/proc/cpuinfo``)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def machine(device: torch.device | str) -> dict:
    r"""The machine, for the JSON: device and its name, CPU, torch and Python versions, torch
    threads, CPU count, load average (1, 5, 15 min) and the date."""
    device = torch.device(device)
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return info


def model(latent_dim: int = 40, hidden: tuple[int, ...] = (300, 300), input_shape: int = 28 * 28,
          device: torch.device | str = "cpu", seed: int | None = None) -> tuple[nn.Module, nn.Module]:  # fmt: skip
    r"""The papers' VAE, ``(encoder, decoder)`` from :func:`vaepriors.models.make_mlp_vae`
    (gated MLP, Bernoulli decoder) on flat inputs, on ``device``; ``seed`` fixes its weights."""
    from vaepriors.models import make_mlp_vae  # imported here: a script may first choose which checkout

    if seed is not None:
        torch.manual_seed(seed)
    enc, dec = make_mlp_vae(input_shape, latent_dim=latent_dim, hidden=hidden)
    return enc.to(device), dec.to(device)


def write_results(out: str | Path, stem: str, report: dict, markdown, plot) -> str:  # noqa: ANN001
    r"""Writes ``<out>/<stem>.json``, the table ``markdown(report)`` as ``.md`` and the figure
    ``plot(report, path)`` as ``.png`` (skipped with a note without matplotlib); returns the table."""
    import json
    import sys

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / f"{stem}.md").write_text(md)
    try:
        plot(report, out / f"{stem}.png")
    except ImportError:
        print("plot skipped: matplotlib is missing", file=sys.stderr)
    return md
