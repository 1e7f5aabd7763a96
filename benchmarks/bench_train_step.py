r"""Steady seconds per training step for every prior in the papers' setting, against a plain
hand-written loop and against another checkout (the code before a change), in one run.

The model is the papers' VAE (gated MLP 784-300-300, d = 40, Bernoulli decoder; Adam, lr
5e-4), batch 100, dynamic MNIST (random grey-level images where MNIST is absent: the step cost
does not depend on the pixels, except through RAT's neighbourhoods and the truncated backward's
responsibilities, which need a trained model and real data). Rows:

- ``plain``, ``plain MoG``, ``plain VampPrior``: a hand-written ELBO with the same math (the
  closed-form Gaussian KL; the Monte Carlo KL with a dense mixture log-density, as the papers'
  code writes it); no vaepriors code in the step. Each is timed with its library row
  (``gaussian``, ``mog``, ``vamp``), the two steps alternated one by one, on the very same
  tensors (model, prior parameters, Adam and its state), so that only the step's code differs;
  the "x plain" column is the median over those pairs of steps. Timed as separate rows, in
  blocks of steps between other configurations, the same two steps differed by up to 25% on
  this shared machine (cache state and load at the time of the block).
- ``gaussian``, ``mog`` (K = 500), ``vamp`` (K = 500 pseudo-inputs), ``coreset`` (M = 500):
  through :class:`vaepriors.ExemplarELBO`.
- ``rat``: the exemplar prior with RAT, k = 10 among N - 1 = 49999 (leave-one-out), and
  ``rat M=25000``: k = 10 within a subset of M = 25000.
- ``subsample``: exemplar subsampling, M = 25000 (25001 exemplars re-encoded per step), exact;
  ``subsample trunc``: the same with ``truncate_backward`` (``--tolerance``).
- ``loo``: leave-one-out over all N = 50000 (the whole set re-encoded per step), exact, and
  ``loo trunc``.

Each checkout runs in its own worker process (this one, and ``--base``); the driver alternates
them and the configurations in interleaved rounds (shuffled order), so that the machine's load
hits all alike, and reports medians. Times are wall clock and, with one thread, the main
thread's CPU time (``time.thread_time``: not inflated by waiting for a CPU on a shared
machine). With ``--checkpoint`` (a model saved by ``profile_train_step.py --responsibilities
--save``) every configuration starts from those trained weights and that sigma^2.

    python benchmarks/bench_train_step.py --base ../wt-perf-base --threads 1,0 --rounds 5
    python benchmarks/bench_train_step.py --priors gaussian,mog --rounds 3 --no-base   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts this checkout first; a worker's --root goes before it)

D_IN = 28 * 28
LOG2PI = math.log(2 * math.pi)

CONFIGS = {
    # name: (label, slow: few steps per round, needs truncation support)
    "plain": ("plain loop (Gaussian, closed-form KL)", False, False),
    "gaussian": ("Gaussian", False, False),
    "plain-mog": ("plain loop, MoG K=500 (dense)", False, False),
    "mog": ("MoG K=500", False, False),
    "plain-vamp": ("plain loop, VampPrior K=500 (dense)", False, False),
    "vamp": ("VampPrior K=500", False, False),
    "coreset": ("pseudocoreset M=500", False, False),
    "rat": ("RAT k=10 among N-1", False, False),
    "rat-sub": ("RAT k=10 within M=25000", False, False),
    "subsample": ("exemplar subsampling M=25000, exact", True, False),
    "subsample-trunc": ("exemplar subsampling M=25000, truncated backward", True, True),
    "loo": ("exemplar leave-one-out N=50000, exact", True, False),
    "loo-trunc": ("exemplar leave-one-out N=50000, truncated backward", True, True),
}
PLAIN_OF = {"gaussian": "plain", "mog": "plain-mog", "vamp": "plain-vamp"}


# -- worker ----------------------------------------------------------------------------
class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.torch = torch
        self.args = args
        self.data, self.source = self._data()
        self.n = self.data.shape[0]
        self.ckpt = torch.load(args.checkpoint, weights_only=True) if args.checkpoint else None
        self.runs: dict[str, dict] = {}

    def _data(self):
        torch = self.torch
        try:
            from vaepriors.data import load_mnist

            train = load_mnist(self.args.data_dir).train
            return train.reshape(-1, D_IN)[: self.args.n].contiguous(), "dynamic MNIST"
        except Exception as err:  # noqa: BLE001
            print(f"MNIST not found ({err}): random grey-level images", file=sys.stderr)
            return torch.rand(self.args.n, D_IN, generator=torch.Generator().manual_seed(0)), "random grey-level images"

    def _model(self):
        enc, dec = _common.model(40, seed=0)
        if self.ckpt is not None:
            enc.load_state_dict(self.ckpt["encoder"])
            dec.load_state_dict(self.ckpt["decoder"])
        return enc, dec

    def _log_var(self) -> float:
        if self.ckpt is None:
            return 0.0
        return float(self.ckpt["prior"]["log_var"])

    def build(self, name: str) -> dict:
        torch = self.torch
        import vaepriors as vp

        data, n = self.data, self.n
        enc, dec = self._model()
        g = torch.Generator().manual_seed(0)
        kw = dict(generator=0, progress=False, init_log_var=self._log_var())
        tol = self.args.tolerance
        priors = {
            "gaussian": lambda: vp.GaussianPrior(40),
            "mog": lambda: vp.MixturePrior(40, 500),
            "vamp": lambda: vp.VampPrior.from_data(data, 500, generator=g),
            "coreset": lambda: vp.PseudocoresetPrior.from_data(data, 500, generator=g),
            "rat": lambda: vp.ExemplarPrior(data, k=10, **kw),
            "rat-sub": lambda: vp.ExemplarPrior(data, n_subsample=n // 2, k=10, **kw),
            "subsample": lambda: vp.ExemplarPrior(data, n_subsample=n // 2, **kw),
            "subsample-trunc": lambda: vp.ExemplarPrior(data, n_subsample=n // 2, truncate_backward=tol, **kw),
            "loo": lambda: vp.ExemplarPrior(data, **kw),
            "loo-trunc": lambda: vp.ExemplarPrior(data, truncate_backward=tol, **kw),
        }
        torch.manual_seed(0)
        if name.startswith("plain"):
            # The plain step trains the very tensors (model, prior parameters, Adam state) of
            # the library's configuration it is compared with: only the code of the step
            # differs, not where the weights happen to lie in memory.
            lib = {"plain": "gaussian", "plain-mog": "mog", "plain-vamp": "vamp"}[name]
            if lib not in self.runs:
                self.runs[lib] = self.build(lib)
            other = self.runs[lib]
            step = self._plain(name, other["elbo"], other["opt"])
            return dict(step=step, prior=None, gen=torch.Generator().manual_seed(1), steps_done=0)
        prior = priors[name]()
        elbo = vp.ExemplarELBO(enc, dec, prior)
        opt = torch.optim.Adam(elbo.parameters(), lr=5e-4)

        def step(x, idx):
            out = elbo(x, idx)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        return dict(step=step, prior=prior, elbo=elbo, opt=opt, gen=torch.Generator().manual_seed(1), steps_done=0)

    def _plain(self, name: str, elbo, opt):
        """A hand-written step (the same model, prior parameters, optimiser and ELBO math; no
        vaepriors code) over the tensors of the library's configuration ``elbo``."""
        torch = self.torch
        enc, dec, prior = elbo.encoder, elbo.decoder, elbo.prior
        logp = None
        if name == "plain-mog":
            m, lv, logits = prior.means, prior.log_var, prior.logits

            def logp(z):
                c = -0.5 * (LOG2PI + lv + (z[:, None, :] - m).pow(2) * torch.exp(-lv)).sum(-1)
                return torch.logsumexp(c + torch.log_softmax(logits, 0), 1)

        elif name == "plain-vamp":
            u = prior.pseudo_inputs
            k = u.shape[0]

            def logp(z):
                m, lv = enc(u)
                c = -0.5 * (LOG2PI + lv + (z[:, None, :] - m).pow(2) * torch.exp(-lv)).sum(-1)
                return torch.logsumexp(c, 1) - math.log(k)

        def step(x, idx):
            mean, log_var = enc(x)
            eps = torch.randn_like(mean)
            z = mean + torch.exp(0.5 * log_var) * eps
            rec = dec(z).log_prob(x)
            if logp is None:
                kl = 0.5 * (log_var.exp() + mean.pow(2) - 1 - log_var).sum(-1)
            else:
                kl = -0.5 * (LOG2PI + log_var + eps.pow(2)).sum(-1) - logp(z)
            loss = -(rec - kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def one(self, run: dict) -> tuple[float, float]:
        torch = self.torch
        idx = torch.randint(self.n, (self.args.batch,), generator=run["gen"])
        x = torch.bernoulli(self.data[idx], generator=run["gen"])
        t0, c0 = time.perf_counter(), time.thread_time()
        run["step"](x, idx)
        run["steps_done"] += 1
        return time.perf_counter() - t0, time.thread_time() - c0

    def run(self, name: str, steps: int) -> dict:
        extra: dict = {}
        if name not in self.runs:
            t0 = time.perf_counter()
            self.runs[name] = self.build(name)
            extra["build_s"] = time.perf_counter() - t0
        run = self.runs[name]
        if not run.get("warm"):
            extra["first_step_s"] = self.one(run)[0]  # builds caches (RAT)
            for _ in range(self.args.warmup - 1):
                self.one(run)
            run["warm"] = True
        wall, cpu = [], []
        distinct, kept = [], []
        plain = PLAIN_OF.get(name)
        if plain is not None:  # the hand-written step, alternated step by step with this one
            if plain not in self.runs:
                self.runs[plain] = self.build(plain)
                for _ in range(self.args.warmup):
                    self.one(self.runs[plain])
            extra["plain_wall"], extra["plain_cpu"] = [], []
        for i in range(steps):
            if plain is not None and i % 2:
                w, c = self.one(self.runs[plain])
                extra["plain_wall"].append(w)
                extra["plain_cpu"].append(c)
            w, c = self.one(run)
            wall.append(w)
            cpu.append(c)
            if plain is not None and not i % 2:
                w, c = self.one(self.runs[plain])
                extra["plain_wall"].append(w)
                extra["plain_cpu"].append(c)
            prior = run["prior"]
            if getattr(prior, "k", None) is not None and prior.last_neighbours is not None:
                distinct.append(int(self.torch.unique(prior.last_neighbours).numel()))
            if getattr(prior, "last_truncation", None) is not None:
                kept.append(prior.last_truncation[0] / max(1, prior.last_truncation[1]))
        extra.update(wall=wall, cpu=cpu, distinct=distinct, kept=kept)
        return extra


def worker_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads or os.cpu_count())
    w = Worker(args)
    import vaepriors

    supports = "truncate_backward" in vaepriors.ExemplarPrior.__init__.__code__.co_varnames
    print(json.dumps(dict(ready=True, root=str(Path(vaepriors.__file__).parent.parent), data=w.source,
                          truncation=supports, threads=torch.get_num_threads())), flush=True)  # fmt: skip
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        out = w.run(cmd["config"], cmd["steps"])
        print(json.dumps(out), flush=True)


# -- driver ----------------------------------------------------------------------------
class Remote:
    def __init__(self, root: Path, args: argparse.Namespace, threads: int) -> None:
        cmd = [sys.executable, __file__, "--worker", "--root", str(root), "--threads", str(threads),
               "--n", str(args.n), "--batch", str(args.batch), "--warmup", str(args.warmup),
               "--tolerance", str(args.tolerance)]  # fmt: skip
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(root))
        self.info = json.loads(self.proc.stdout.readline())

    def run(self, config: str, steps: int) -> dict:
        self.proc.stdin.write(json.dumps(dict(cmd="run", config=config, steps=steps)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.info.get('root')} died")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps(dict(cmd="quit")) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def drive(args: argparse.Namespace, threads: int, versions: dict[str, Path]) -> dict:
    remotes = {v: Remote(root, args, threads) for v, root in versions.items()}
    configs = [c for c in args.priors.split(",") if c]
    results: dict = {v: {c: dict(wall=[], cpu=[], distinct=[], kept=[]) for c in configs} for v in versions}
    loads = []
    rng = random.Random(0)
    try:
        for r in range(args.rounds):
            order = configs[:]
            rng.shuffle(order)
            for c in order:
                vs = list(versions)
                rng.shuffle(vs)
                for v in vs:
                    if CONFIGS[c][2] and not remotes[v].info["truncation"]:
                        continue
                    steps = args.slow_steps if CONFIGS[c][1] else args.steps
                    out = remotes[v].run(c, steps)
                    res = results[v][c]
                    for key in ("wall", "cpu", "distinct", "kept", "plain_wall", "plain_cpu"):
                        res.setdefault(key, [])
                        res[key] += out.get(key, [])
                    for key in ("build_s", "first_step_s"):
                        if key in out:
                            res[key] = out[key]
            loads.append(os.getloadavg()[0])
            summary = ", ".join(
                f"{c} " + "/".join(f"{1e3 * statistics.median(results[v][c]['wall']):.0f}" for v in versions
                                   if results[v][c]["wall"])  # fmt: skip
                for c in configs
            )
            print(f"[{threads or 'all'} threads] round {r + 1}/{args.rounds} (ms, {'/'.join(versions)}): {summary}; "
                  f"load {loads[-1]:.1f}", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for rem in remotes.values():
            rem.close()
    return dict(threads=remotes[next(iter(remotes))].info["threads"], results=results, load_per_round=loads,
                workers={v: rem.info for v, rem in remotes.items()})  # fmt: skip


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(run: dict, configs: list[str], versions: list[str]) -> list[dict]:
    rows = []
    res = run["results"]
    configs = [x for c in configs for x in ([PLAIN_OF[c], c] if c in PLAIN_OF else [c])]
    for v in versions:  # the plain steps were timed with (alternated with) their library step
        for lib, plain in PLAIN_OF.items():
            if lib in res[v]:
                res[v][plain] = dict(wall=res[v][lib].get("plain_wall", []), cpu=res[v][lib].get("plain_cpu", []),
                                     distinct=[], kept=[])  # fmt: skip
    for c in configs:
        row = dict(config=c, label=CONFIGS[c][0])
        for v in versions:
            r = res[v][c]
            row[v] = dict(
                wall_ms=None if not r["wall"] else 1e3 * med(r["wall"]),
                cpu_ms=None if not r["cpu"] else 1e3 * med(r["cpu"]),
                steps=len(r["wall"]),
                distinct=med(r["distinct"]),
                kept=med(r["kept"]),
                first_step_s=r.get("first_step_s"),
            )
        rows.append(row)
    by = {r["config"]: r for r in rows}
    for r in rows:
        for v in versions:
            cell = r[v]
            if cell["wall_ms"] is None:
                continue
            plain = PLAIN_OF.get(r["config"])
            if plain in by and by[plain][v]["wall_ms"]:
                lib_r, plain_r = res[v][r["config"]], res[v][plain]
                # median over pairs of steps (each library step and the plain step next to it)
                cell["x_plain_wall"] = med([a / b for a, b in zip(lib_r["wall"], plain_r["wall"])])
                cell["x_plain_cpu"] = med([a / b for a, b in zip(lib_r["cpu"], plain_r["cpu"])])
            if "gaussian" in by and by["gaussian"][v]["wall_ms"]:
                cell["x_gaussian_wall"] = cell["wall_ms"] / by["gaussian"][v]["wall_ms"]
                cell["x_gaussian_cpu"] = cell["cpu_ms"] / by["gaussian"][v]["cpu_ms"]
        if "base" in versions and "new" in versions and r["base"]["wall_ms"] and r["new"]["wall_ms"]:
            r["speedup_wall"] = r["base"]["wall_ms"] / r["new"]["wall_ms"]
            r["speedup_cpu"] = r["base"]["cpu_ms"] / r["new"]["cpu_ms"]
        base_row = by.get(r["config"].replace("-trunc", ""))
        if r["config"].endswith("-trunc") and base_row is not None and "base" in versions and r["new"]["wall_ms"]:
            b = base_row["base"]
            if b["wall_ms"]:
                r["speedup_vs_base_exact_wall"] = b["wall_ms"] / r["new"]["wall_ms"]
                r["speedup_vs_base_exact_cpu"] = b["cpu_ms"] / r["new"]["cpu_ms"]
    return rows


def fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown(all_runs: list[dict], meta: dict, versions: list[str]) -> str:
    lines = [
        f"# Training step, every prior ({meta['cpu']}, torch {meta['torch']})",
        "",
        f"{_common.MODEL}, Adam lr 5e-4, batch {meta['batch']}, {meta['data']}, N = {meta['n']}"
        f"{'; trained weights: ' + meta['checkpoint_note'] if meta.get('checkpoint_note') else ''}. "
        f"Truncation tolerance {meta['tolerance']:g}. {meta['date']}. Medians over interleaved rounds; "
        "`new` is this checkout, `base` the code before the change "
        f"(`{meta.get('base_commit', '-')}`), each in its own process, alternated.",
        "",
    ]
    for run in all_runs:
        rows = run["rows"]
        loads = run["load_per_round"]
        lines += [
            f"## {run['threads']} thread(s)",
            "",
            f"Load average (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)} "
            f"on {meta['cpu_count']} CPUs.",
            "",
            "| configuration | new ms (wall / thread CPU) | base ms (wall / thread CPU) | speed-up (wall / CPU) "
            "| x plain, new / base (thread CPU, paired) | new x Gaussian (wall / CPU) | steps new / base | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            n, b = r.get("new", {}), r.get("base", {})
            notes = []
            if n.get("distinct"):
                notes.append(f"{n['distinct']:.0f} distinct exemplars re-encoded")
            if n.get("kept"):
                notes.append(f"{100 * n['kept']:.1f}% of exemplars back-propagated")
            if r.get("speedup_vs_base_exact_wall"):
                notes.append(f"{r['speedup_vs_base_exact_wall']:.2f}x / {r['speedup_vs_base_exact_cpu']:.2f}x faster than base exact")
            sp = f"{fmt(r.get('speedup_wall'), '.2f', 'x')} / {fmt(r.get('speedup_cpu'), '.2f', 'x')}"
            lines.append(
                f"| {r['label']} | {fmt(n.get('wall_ms'))} / {fmt(n.get('cpu_ms'))} | {fmt(b.get('wall_ms'))} / "
                f"{fmt(b.get('cpu_ms'))} | {sp} | {fmt(n.get('x_plain_cpu'), '.3f')} / {fmt(b.get('x_plain_cpu'), '.3f')} | "
                f"{fmt(n.get('x_gaussian_wall'), '.2f')} / {fmt(n.get('x_gaussian_cpu'), '.2f')} | "
                f"{n.get('steps', 0)} / {b.get('steps', 0)} | {'; '.join(notes)} |"
            )
        lines.append("")
    lines += [f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def plot(all_runs: list[dict], path: Path, versions: list[str]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(all_runs), figsize=(7 * len(all_runs), 5.5), squeeze=False)
    for ax, run in zip(axes[0], all_runs):
        rows = run["rows"]
        y = range(len(rows))
        h = 0.8 / len(versions)
        for i, v in enumerate(versions):
            vals = [r[v]["wall_ms"] or float("nan") for r in rows]
            ax.barh([t + i * h for t in y], vals, height=h, label=v)
        ax.set_yticks([t + 0.4 - h / 2 for t in y])
        ax.set_yticklabels([r["label"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("median ms per step (wall)")
        ax.set_title(f"{run['threads']} thread(s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", default=str(_common.ROOT.parent / "wt-perf-base"),
                    help="the checkout to compare with (the code before the change)")  # fmt: skip
    ap.add_argument("--no-base", action="store_true", help="time this checkout only")
    ap.add_argument("--threads", default="1,0", help="comma-separated torch thread counts (0: all CPUs)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    ap.add_argument("--slow-steps", type=int, default=1, help="steps per round of the exemplar configurations")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--priors", default=",".join(c for c in CONFIGS if not c.startswith("plain")),
                    help="configurations; gaussian, mog and vamp are each timed step by step alternated with "
                         "their plain loop")  # fmt: skip
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--tolerance", type=float, default=1e-6, help="truncate_backward of the '-trunc' rows")
    ap.add_argument("--checkpoint", default=None, help="trained weights (profile_train_step.py --save)")
    ap.add_argument("--checkpoint-note", default="", help="what the checkpoint is, for the table")
    ap.add_argument("--data-dir", default=os.environ.get("VAEPRIORS_MNIST"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(Path(args.root).resolve()))
        args.threads = int(args.threads)
        worker_main(args)
        return

    versions = {"new": _common.ROOT}
    meta = dict(**_common.machine("cpu"), n=args.n, batch=args.batch, tolerance=args.tolerance,
                checkpoint=args.checkpoint, checkpoint_note=args.checkpoint_note,
                command=" ".join(["python benchmarks/bench_train_step.py", *sys.argv[1:]]))  # fmt: skip
    if not args.no_base:
        base = Path(args.base).resolve()
        if not (base / "vaepriors" / "__init__.py").exists():
            raise SystemExit(f"no checkout at {base}: create one (git worktree add {base} <commit>) or pass --no-base")
        versions["base"] = base
        meta["base_commit"] = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    meta["new_commit"] = subprocess.run(["git", "-C", str(_common.ROOT), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()  # fmt: skip
    configs = [c for c in args.priors.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    all_runs = []
    t0 = time.perf_counter()
    for t in (int(s) for s in args.threads.split(",")):
        run = drive(args, t, versions)
        run["rows"] = summarise(run, configs, list(versions))
        all_runs.append(run)
    meta["seconds"] = time.perf_counter() - t0
    meta["data"] = all_runs[0]["workers"]["new"]["data"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_step_{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, runs=all_runs), indent=1) + "\n")
    md = markdown(all_runs, meta, list(versions))
    if plot(all_runs, out / f"{stem}.png", list(versions)):
        md += f"\n![step times]({stem}.png)\n"
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
