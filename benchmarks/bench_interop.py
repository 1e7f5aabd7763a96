r"""Any VAE, not only the papers' one: exemplars as the user stores them, and posterior families
other than the diagonal Gaussian.

**a. Exemplars as stored (memory).** A CelebA-shaped synthetic set (uint8, 3 x 64 x 64, random
pixels) in an :class:`vaepriors.ExemplarPrior` bound to a small convolutional encoder (four
strided 4x4 convolutions 3-16-32-64-128 with ReLU, a linear head to a diagonal Gaussian over
d = 64), evaluated in eval mode: ``prior.eval().log_prob(z)`` for 100 z, which encodes every
exemplar once. Each case runs in a fresh process (forked from a server that has only imported
torch and vaepriors) and reports the growth of the resident set: the peak (``VmHWM``, reset
through ``/proc/self/clear_refs``) minus the resident size just before the prior is built. The uint8 images are created (and the encoder run once on 8
images, so that the convolution library's one-off set-up is not counted) before that
baseline; glibc is asked to serve blocks over 128 KiB by mmap and to trim its heap first, so
that memory freed earlier is not reused unseen. Cases:

- ``uint8``: ``ExemplarPrior(images)``, the images kept as uint8 (the library's default);
- ``float32``: ``ExemplarPrior(images.float() / 255)``, the user converting first;
- ``dataset``: a ``torch.utils.data.Dataset`` whose items are read from a raw uint8 file on
  disk with ``os.pread`` (no mmap, so the page cache is not in the resident set);

each with the default ``chunk_size`` (4096 exemplars encoded at a time) and, to show where
the growth comes from, with ``--small-chunk`` (512). Growth is reported in bytes and as a
multiple of the raw uint8 bytes of the set. Target: ``uint8`` at most 1.5x.

**b. Posterior families (time).** One training step (``ExemplarELBO`` forward + backward +
Adam) of the papers' gated MLP VAE (784-300-300, d = 40, Bernoulli decoder, from
``_common.model``), batch 100, on random binarised 784-d images (grey-level exemplars and
pseudo-inputs), for three posteriors: ``normal`` (the encoder's ``(mean, log_var)``: the
library's Gaussian fast path), ``laplace`` (``Laplace(mean, exp(log_var / 2))`` from the same
heads) and ``flow`` (a zuko MAF over d = 40, 2 transforms, hidden (64, 64), conditioned on the
encoder's last 300-d hidden layer; it samples by inverting the autoregressive transform, d
sequential passes), under six priors: ``gaussian``, ``mog`` (500 components), ``vamp`` (500
pseudo-inputs), ``exemplar`` (subsampling, M = N/2), ``rat`` (k = 10) and ``pseudocoreset``
(500 pseudo-inputs). Configurations run in interleaved rounds, shuffled, on 1 torch thread;
the table gives median step times and the ratio to the normal posterior under the same
prior. Each trained configuration then gets ``vp.log_likelihood`` with a small S, which must
be finite.

    python benchmarks/bench_interop.py                # default, ~5-8 min on 1 thread
    python benchmarks/bench_interop.py --quick        # < 1 min (small sizes: a smoke run)

Writes ``results/interop_cpu.{json,md,png}`` (``interop_quick_cpu.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODEL, machine, model, write_results  # noqa: E402  (puts this checkout's vaepriors first)

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

import vaepriors as vp  # noqa: E402

IMAGE = (3, 64, 64)
D_IN = 28 * 28
FAMILIES = ("normal", "laplace", "flow")
PRIORS = ("gaussian", "mog", "vamp", "exemplar", "rat", "pseudocoreset")


# -- memory measurement ------------------------------------------------------------------
def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _libc(name: str, *args: int) -> None:
    try:
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):
        pass


class ConvEncoder(nn.Module):
    """Four strided 4x4 convolutions (3 -> 16 -> 32 -> 64 -> 128 channels, 64 -> 4 pixels) and
    a linear head: ``x [B, 3, 64, 64] -> (mean, log_var)``, each ``[B, d]``."""

    def __init__(self, latent_dim: int = 64, channels: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = IMAGE[0]
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.ReLU()]
            cin = cout
        self.net = nn.Sequential(*layers, nn.Flatten())
        side = IMAGE[1] // 2 ** len(channels)
        self.head = nn.Linear(cin * side * side, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.head(self.net(x)).chunk(2, -1)
        return mean, log_var.clamp(-6, 2)


class RawImages(torch.utils.data.Dataset):
    """uint8 images ``[3, 64, 64]`` read one by one from a raw file with ``os.pread``."""

    def __init__(self, path: str, n: int) -> None:
        self.path, self.n, self.size = path, n, math.prod(IMAGE)
        self.fd: int | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        buf = os.pread(self.fd, self.size, int(i) * self.size)
        return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(IMAGE)


def memory_child(spec: dict) -> dict:
    """One memory case, in this (fresh) process."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    enc = ConvEncoder(spec["latent"])
    with torch.no_grad():
        enc(torch.rand(8, *IMAGE))  # the convolution library's one-off set-up, before the baseline
    n = spec["n"]
    images = torch.randint(0, 256, (n, *IMAGE), dtype=torch.uint8)
    raw = images.numel()
    tmp = None
    if spec["case"] == "dataset":
        tmp = tempfile.TemporaryDirectory(prefix="vaepriors-interop-")
        path = os.path.join(tmp.name, "images.u8")
        images.numpy().tofile(path)
        del images
        data: object = RawImages(path, n)
    z = torch.randn(100, spec["latent"])
    kwargs = {} if spec["chunk_size"] is None else {"chunk_size": spec["chunk_size"]}

    _libc("mallopt", -3, 128 * 2**10)  # M_MMAP_THRESHOLD: large blocks by mmap, returned on free
    _libc("malloc_trim", 0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if spec["case"] == "uint8":
        prior = vp.ExemplarPrior(images, progress=False, **kwargs)
    elif spec["case"] == "float32":
        prior = vp.ExemplarPrior(images.float() / 255, progress=False, **kwargs)
    else:
        prior = vp.ExemplarPrior(data, progress=False, **kwargs)
    prior.bind(enc)
    out = prior.eval().log_prob(z)
    first_s = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    retained = _status("VmRSS") - base
    t1 = time.perf_counter()
    out2 = prior.log_prob(z)
    second_s = time.perf_counter() - t1
    result = dict(
        case=spec["case"], n=n, chunk_size=prior.chunk_size, raw_uint8_bytes=raw,
        stored=repr(prior.exemplar_set), peak_growth_bytes=peak, retained_growth_bytes=retained,
        peak_x_raw=peak / raw, retained_x_raw=retained / raw, first_call_s=first_s, cached_call_s=second_s,
        finite=bool(torch.isfinite(out).all() and torch.isfinite(out2).all()),
    )  # fmt: skip
    if tmp is not None:
        tmp.cleanup()
    return result


def _memory_proc(spec: dict, path: str) -> None:
    try:
        out = ("ok", memory_child(spec))
    except BaseException:  # noqa: BLE001 (reported by the parent)
        out = ("error", traceback.format_exc())
    Path(path).write_text(json.dumps(out))


def run_memory_case(spec: dict) -> dict:
    """Runs :func:`memory_child` in a fresh process and returns its result: a child of a fork
    server that has only imported torch and vaepriors (no interpreter start-up per case); where
    there is no fork server, a new interpreter."""
    if "forkserver" not in mp.get_all_start_methods():
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory case {spec} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.nn", "vaepriors"])
    with tempfile.TemporaryDirectory(prefix="vaepriors-interop-") as tmp:
        path = os.path.join(tmp, "result.json")
        proc = ctx.Process(target=_memory_proc, args=(spec, path), daemon=True)
        proc.start()
        proc.join()
        if not os.path.exists(path):
            raise RuntimeError(f"memory case {spec}: the process exited with code {proc.exitcode} without a result")
        kind, value = json.loads(Path(path).read_text())
    if kind != "ok":
        raise RuntimeError(f"memory case {spec} failed:\n{value}")
    return value


# -- posterior families ------------------------------------------------------------------
class FamilyEncoder(nn.Module):
    """The gated MLP encoder read as a posterior of the given family."""

    def __init__(self, family: str, gated: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.family, self.gated = family, gated
        if family == "flow":
            import zuko

            hidden = gated.mean.in_features
            self.flow = zuko.flows.MAF(latent_dim, context=hidden, transforms=2, hidden_features=(64, 64))

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        if self.family == "normal":
            return self.gated(x)  # (mean, log_var): the Gaussian fast path
        if self.family == "laplace":
            mean, log_var = self.gated(x)
            return torch.distributions.Laplace(mean, torch.exp(0.5 * log_var))
        return self.flow(self.gated.layers(x))


def make_prior(name: str, grey: torch.Tensor, args: argparse.Namespace) -> vp.Prior:
    d = args.latent
    if name == "gaussian":
        return vp.GaussianPrior(d)
    if name == "mog":
        return vp.MixturePrior(d, args.components)
    if name == "vamp":
        return vp.VampPrior.from_data(grey, args.components, generator=torch.Generator().manual_seed(2))
    if name == "exemplar":
        return vp.ExemplarPrior(grey, n_subsample=args.n_data // 2, generator=3, progress=False)
    if name == "rat":
        return vp.ExemplarPrior(grey, k=args.k, generator=4, progress=False)
    if name == "pseudocoreset":
        return vp.PseudocoresetPrior.from_data(grey, n_pseudo=args.components, generator=torch.Generator().manual_seed(5))
    raise ValueError(name)


def prior_label(name: str, args: argparse.Namespace) -> str:
    return {
        "gaussian": "gaussian", "mog": f"mog K={args.components}", "vamp": f"vamp K={args.components}",
        "exemplar": f"exemplar M={args.n_data // 2}", "rat": f"exemplar RAT k={args.k}",
        "pseudocoreset": f"pseudocoreset M={args.components}",
    }[name]  # fmt: skip


def step_benchmark(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    n = args.n_data
    grey = torch.rand(n, D_IN)  # exemplars and pseudo-inputs: grey levels
    data = grey.bernoulli()  # training batches: binarised
    configs = {}
    for p in args.priors:
        for fam in FAMILIES:
            gated, dec = model(args.latent, seed=1)
            torch.manual_seed(11)
            enc = FamilyEncoder(fam, gated, args.latent)
            elbo = vp.ExemplarELBO(enc, dec, make_prior(p, grey, args))
            opt = torch.optim.Adam(elbo.parameters(), lr=5e-4)
            configs[(p, fam)] = dict(elbo=elbo, opt=opt, times=[], gen=torch.Generator().manual_seed(7))

    def step(c: dict) -> None:
        idx = torch.randint(n, (args.batch,), generator=c["gen"])
        loss = c["elbo"](data[idx], idx).loss
        c["opt"].zero_grad(set_to_none=True)
        loss.backward()
        c["opt"].step()

    for key, c in configs.items():  # warm-up: first-call costs (RAT cache build, allocations)
        step(c)
        c["steps"] = 1
        if args.round_seconds > 0:  # steps per round from a second step's time
            t = time.perf_counter()
            step(c)
            c["steps"] = max(1, round(args.round_seconds / max(time.perf_counter() - t, 1e-4)))
    order = list(configs)
    rng = random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for key in order:
            c = configs[key]
            t = time.perf_counter()
            for _ in range(c["steps"]):
                step(c)
            c["times"].append((time.perf_counter() - t) / c["steps"])
        print(f"steps: round {r + 1}/{args.rounds} done", file=sys.stderr)

    rows = []
    for (p, fam), c in configs.items():
        elbo = c["elbo"]
        t = time.perf_counter()
        ll = vp.log_likelihood(elbo, data[: args.ll_points], n_samples=args.ll_samples, progress=False,
                               generator=torch.Generator().manual_seed(9))  # fmt: skip
        ll_s = time.perf_counter() - t
        rows.append(dict(
            prior=p, label=prior_label(p, args), family=fam, step_ms=1e3 * statistics.median(c["times"]),
            min_ms=1e3 * min(c["times"]), max_ms=1e3 * max(c["times"]), steps_timed=c["steps"] * args.rounds,
            loglik_mean=float(ll.mean), loglik_finite=bool(torch.isfinite(ll.values).all()), loglik_s=ll_s,
        ))  # fmt: skip
    by = {(r["prior"], r["family"]): r for r in rows}
    for r in rows:
        r["x_normal"] = r["step_ms"] / by[(r["prior"], "normal")]["step_ms"]
        r["x_gaussian_normal"] = r["step_ms"] / by.get(("gaussian", "normal"), by[(r["prior"], "normal")])["step_ms"]
    return dict(rows=rows)


# -- output ----------------------------------------------------------------------------
def mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.6]})
    mem = report.get("memory", [])
    if mem:
        ax = axes[0]
        labels = [f"{r['case']}\nN={r['n']}\nchunk {r['chunk_size']}" for r in mem]
        x = range(len(mem))
        ax.bar([i - 0.2 for i in x], [r["peak_x_raw"] for r in mem], 0.4, label="peak growth")
        ax.bar([i + 0.2 for i in x], [r["retained_x_raw"] for r in mem], 0.4, label="retained growth")
        ax.axhline(1.5, color="k", ls="--", lw=1, label="target 1.5x (uint8)")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("resident growth / raw uint8 bytes")
        ax.set_title("a. exemplars as stored: eval of ExemplarPrior")
        ax.legend(fontsize=7)
    rows = report.get("steps", {}).get("rows", [])
    if rows:
        ax = axes[1]
        priors = list(dict.fromkeys(r["label"] for r in rows))
        width = 0.8 / len(FAMILIES)
        for j, fam in enumerate(FAMILIES):
            vals = [next((r["step_ms"] for r in rows if r["label"] == p and r["family"] == fam), 0) for p in priors]
            bars = ax.bar([i + (j - 1) * width for i in range(len(priors))], vals, width, label=fam)
            for b, p in zip(bars, priors):
                r = next((r for r in rows if r["label"] == p and r["family"] == fam), None)
                if r and fam != "normal":
                    ax.annotate(f"{r['x_normal']:.1f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=6)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xticks(range(len(priors)), priors, fontsize=7, rotation=15)
        ax.set_ylabel("ms / training step (median)")
        ax.set_title("b. posterior families: step time (x normal fast path)")
        ax.legend(fontsize=7)
    fig.suptitle(f"bench_interop ({report['meta']['device_name']}, {report['meta']['threads']} thread)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(report: dict) -> str:
    meta, args = report["meta"], report["meta"]["args"]
    lines = [
        f"# Any VAE: exemplars as stored and posterior families ({meta['device_name']}, cpu)",
        "",
        f"torch {meta['torch']}, {meta['threads']} thread(s), {meta['date']}; load average at start "
        f"{meta['load_start']}, at end {meta['load_end']} (shared 2-core machine: compare ratios within "
        f"this table). Command: `{meta['command']}`.",
    ]
    mem = report.get("memory", [])
    if mem:
        lines += [
            "",
            f"## a. Resident-memory growth of `prior.eval().log_prob(z)` (uint8 {'x'.join(map(str, IMAGE))} "
            f"images, conv encoder to d = {args['conv_latent']})",
            "",
            "Fresh process per case; growth above the resident size just before the prior is built "
            "(images already created). Peak = high-water mark while building and encoding; retained = "
            "after the call, prior alive.",
            "",
            "| case | N | chunk_size | raw uint8 MiB | peak growth MiB | x raw | retained MiB | x raw | "
            "first call s | cached call s | finite |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mem:
            lines.append(
                f"| {r['case']} | {r['n']} | {r['chunk_size']} | {mib(r['raw_uint8_bytes'])} | "
                f"{mib(r['peak_growth_bytes'])} | **{r['peak_x_raw']:.2f}x** | {mib(r['retained_growth_bytes'])} | "
                f"{r['retained_x_raw']:.2f}x | {r['first_call_s']:.1f} | {r['cached_call_s']:.3f} | {r['finite']} |"
            )
        t = report.get("memory_target")
        if t:
            lines += ["", f"Target: `uint8` with the default chunk_size at most 1.5x the raw uint8 bytes: "
                          f"measured {t['measured']:.2f}x, **{'met' if t['met'] else 'not met'}**."]  # fmt: skip
    rows = report.get("steps", {}).get("rows", [])
    if rows:
        lines += [
            "",
            f"## b. Training step by posterior family ({MODEL}; N = {args['n_data']} random binarised images, "
            f"batch {args['batch']})",
            "",
            f"Median over {args['rounds']} interleaved, shuffled rounds; `x normal`: ratio to the normal "
            f"posterior (the Gaussian fast path) under the same prior. log-likelihood: `vp.log_likelihood` "
            f"on {args['ll_points']} points, S = {args['ll_samples']}.",
            "",
            "| prior | posterior | median ms / step | min | max | steps timed | x normal | x gaussian-normal | "
            "log-lik (mean) | finite |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['label']} | {r['family']} | {r['step_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} | "
                f"{r['steps_timed']} | **{r['x_normal']:.2f}x** | {r['x_gaussian_normal']:.2f}x | "
                f"{r['loglik_mean']:.1f} | {r['loglik_finite']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--parts", default="memory,steps", help="which parts to run: memory, steps")
    ap.add_argument("--n-images", type=int, default=20_000, help="a. images in the set")
    ap.add_argument("--more-images", type=int, default=40_000,
                    help="a. also uint8 and dataset at this N (growth vs N; 0: skip)")  # fmt: skip
    ap.add_argument("--small-chunk", type=int, default=512, help="a. uint8 and dataset again with this chunk_size (0: skip)")
    ap.add_argument("--conv-latent", type=int, default=64, help="a. d of the conv encoder")
    ap.add_argument("--n-data", type=int, default=3000, help="b. training images (and exemplars)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--latent", type=int, default=40, help="b. d")
    ap.add_argument("--components", type=int, default=500, help="b. MoG / VampPrior / pseudocoreset components")
    ap.add_argument("-k", type=int, default=10, help="b. RAT neighbours")
    ap.add_argument("--priors", default=",".join(PRIORS))
    ap.add_argument("--rounds", type=int, default=7, help="b. interleaved rounds")
    ap.add_argument("--round-seconds", type=float, default=0.4, help="b. time per configuration and round")
    ap.add_argument("--ll-points", type=int, default=4)
    ap.add_argument("--ll-samples", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    if args.quick:
        args.n_images, args.more_images, args.small_chunk = 500, 0, 0
        args.n_data, args.components, args.rounds, args.round_seconds = 400, 50, 1, 0.0
        args.ll_points, args.ll_samples = 2, 4
    args.priors = [p for p in args.priors.split(",") if p]
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    load_start = [round(v, 2) for v in os.getloadavg()]
    t_start = time.perf_counter()
    argv = " ".join(sys.argv[1:])
    report: dict = {"meta": {}}

    if "memory" in parts:
        specs = [dict(case=c, n=args.n_images, chunk_size=None) for c in ("uint8", "float32", "dataset")]
        if args.small_chunk:
            specs += [dict(case=c, n=args.n_images, chunk_size=args.small_chunk) for c in ("uint8", "dataset")]
        if args.more_images:
            specs += [dict(case=c, n=args.more_images, chunk_size=None) for c in ("uint8", "dataset")]
        mem = []
        for s in specs:
            s.update(threads=args.threads, seed=0, latent=args.conv_latent)
            mem.append(run_memory_case(s))
            r = mem[-1]
            print(f"memory: {r['case']} N={r['n']} chunk {r['chunk_size']}: peak {r['peak_x_raw']:.2f}x raw, "
                  f"{r['first_call_s']:.1f} s", file=sys.stderr)  # fmt: skip
        report["memory"] = mem
        main_case = mem[0]
        report["memory_target"] = dict(target=1.5, measured=main_case["peak_x_raw"], met=main_case["peak_x_raw"] <= 1.5)
    if "steps" in parts:
        report["steps"] = step_benchmark(args)

    report["meta"] = dict(
        **machine("cpu"), model=MODEL, load_start=load_start, load_end=[round(v, 2) for v in os.getloadavg()],
        wall_s=time.perf_counter() - t_start, command=f"python benchmarks/bench_interop.py {argv}".strip(),
        args={k: v for k, v in vars(args).items() if k not in ("out", "memory_child")},
    )  # fmt: skip
    md = write_results(args.out, "interop_quick_cpu" if args.quick else "interop_cpu", report, markdown, plot)
    print(md)


if __name__ == "__main__":
    main()
