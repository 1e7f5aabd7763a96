r"""Several processes: per-rank time and resident memory of the exemplar prior under
torch.distributed (gloo, CPU), replicated and sharded (``ExemplarPrior(..., shard=True)``).

Every configuration is a fresh group of R processes (a fork server that has imported torch
and vaepriors, a ``FileStore`` rendezvous, 1 torch thread per rank), on this machine's cores:
R = 3 on a 2-core machine is oversubscribed, and the machine is shared with other jobs (the
load average is recorded). The encoder is deliberately cheap, ``nn.Linear(40, 2 d)`` on 40-d
inputs with d = 40, so that the prior's reduction over the exemplars (the engine) dominates;
the decoder is ``nn.Linear(d, 40)`` with a unit-variance Normal. The exemplars are N rows of
a float32 file written once by the parent and mapped by every rank (as a large set on disk
would be): a replicated prior holds a copy of all N rows, a sharded one a copy of its block
(``ExemplarSet.subset``); the mapping is dropped after construction.

Each rank measures, in order:

- **build**: resident growth after constructing the prior (the stored exemplars) and the
  construction's peak;
- **eval first**: ``prior.eval().log_prob(z)`` on this rank's queries, which encodes the
  exemplars (a replicated prior: all N on every rank; a sharded one: its N/R) and reduces;
- **eval cached**: the same call again (means cached): the reduction alone, ``--repeats`` times;
- **train**: a training step with exemplar subsampling, ``ExemplarPrior(n_subsample=M)``:
  ``ExemplarELBO`` forward + backward + Adam, wrapped in ``DistributedDataParallel`` when
  R > 1, batch ``--batch`` per rank drawn from the rank's own block of the set.

Times: each rank's wall time (after a barrier) and its process CPU time, which other jobs on a
shared machine do not stretch; the table takes the slowest rank. Resident growth is measured
against the resident size before the data is mapped (``VmHWM`` reset through
``/proc/self/clear_refs`` after ``malloc_trim``; glibc's mmap threshold fixed at 32 MiB). The
collectives the library issues are counted (bytes and calls, by wrapping
``torch.distributed.all_gather`` / ``all_reduce`` / ``broadcast``); DDP's own gradient
all-reduce of the parameters is not counted (it is the same with and without sharding).

Scaling: **strong**: N fixed (``--n``), Q queries in all split over the ranks;
**weak**: N = R x ``--n-per-rank``, the same Q in all, so every rank's reduction is Q x N/R
pairs whichever the mode. Training: B per rank fixed, M = ``--subsample-fraction`` x N.

Also written: the communication per step as a function of B (queries per rank), R and d, and
a **model** (not a measurement on GPUs) of the N at which sharding pays on 8 to 64 GPUs, from
this CPU's measured per-rank compute and an assumed interconnect.

    python benchmarks/bench_distributed.py             # default, ~4-6 min on a loaded 2-core machine
    python benchmarks/bench_distributed.py --quick     # < 1 min (small sizes: a smoke run)

Writes ``results/distributed_cpu.{json,md,png}`` (``distributed_quick_cpu.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import pickle
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model, write_results  # noqa: E402  (puts this checkout's vaepriors first)

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

import vaepriors as vp  # noqa: E402
from vaepriors import distributed as vdist  # noqa: E402

D_IN = 40
PG_TIMEOUT = 900.0  # seconds: the slowest collective of a loaded machine, with room
# Imported once by the fork server; torch._dynamo (and sympy) is what the first optimiser step
# and DDP import otherwise, ~5 s per process on a loaded 2-core machine.
GPU_FACTOR = 1000  # the model's illustrative column: a GPU this many times faster per exemplar (an assumption)
PRELOAD = ["torch", "torch.distributed", "torch.nn.parallel", "torch.optim", "torch._dynamo", "vaepriors"]


# -- per-rank measurement ------------------------------------------------------------------
def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _libc(name: str, *args: int) -> None:
    try:
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    gc.collect()
    _libc("malloc_trim", 0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


class LinearEncoder(nn.Module):
    """``x [B, 40] -> (mean, log_var)``, each ``[B, d]``: a single linear layer."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Linear(D_IN, 2 * d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.net(x).chunk(2, -1)
        return mean, log_var.clamp(-6, 2)


class LinearDecoder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Linear(d, D_IN)

    def forward(self, z: torch.Tensor) -> torch.distributions.Distribution:
        return torch.distributions.Normal(self.net(z), 1.0)


class CommCounter:
    """Wraps torch.distributed's collectives to count the library's calls and bytes."""

    def __init__(self) -> None:
        self.phase = None
        self.log: dict[str, list] = {}
        orig = {k: getattr(tdist, k) for k in ("all_gather", "all_reduce", "broadcast")}

        def record(op: str, nbytes: int) -> None:
            if self.phase is not None:
                self.log.setdefault(self.phase, []).append((op, nbytes))

        def all_gather(tensor_list, tensor, *a, **k):  # noqa: ANN001, ANN202
            record("all_gather", sum(t.numel() * t.element_size() for t in tensor_list))
            return orig["all_gather"](tensor_list, tensor, *a, **k)

        def all_reduce(tensor, *a, **k):  # noqa: ANN001, ANN202
            record("all_reduce", tensor.numel() * tensor.element_size())
            return orig["all_reduce"](tensor, *a, **k)

        def broadcast(tensor, *a, **k):  # noqa: ANN001, ANN202
            record("broadcast", tensor.numel() * tensor.element_size())
            return orig["broadcast"](tensor, *a, **k)

        tdist.all_gather, tdist.all_reduce, tdist.broadcast = all_gather, all_reduce, broadcast

    def summary(self, phase: str) -> dict:
        calls = self.log.get(phase, [])
        out: dict = {"calls": len(calls), "ops": calls}
        for op in ("all_gather", "all_reduce", "broadcast"):
            out[f"{op}_bytes"] = sum(b for o, b in calls if o == op)
            out[f"{op}_calls"] = sum(1 for o, _ in calls if o == op)
        return out


def rank_job(rank: int, world: int, spec: dict) -> dict:
    """One rank of one configuration (torch.distributed is initialised, even for R = 1)."""
    gc.freeze()  # the imported modules' objects: keeps each gc.collect() below short
    counter = CommCounter()
    # M_MMAP_THRESHOLD fixed at glibc's dynamic maximum (as bench_engine's timed calls): blocks of
    # 32 MiB and more are mmapped (returned on free, counted again when reused); a lower threshold
    # would make every engine chunk a fresh mapping and slow the timed calls with page faults.
    _libc("mallopt", -3, 32 * 2**20)
    n, d, mode = spec["n"], spec["d"], spec["mode"]
    torch.manual_seed(spec["seed"])
    enc, dec = LinearEncoder(d), LinearDecoder(d)  # same weights on every rank
    queries = torch.randn(spec["q_total"], d, generator=torch.Generator().manual_seed(spec["seed"] + 1))
    q0, q1 = vdist.shard_range(spec["q_total"], rank, world)
    z = queries[q0:q1].clone()
    del queries

    def barrier() -> None:
        if world > 1:
            tdist.barrier()

    res: dict = {"rank": rank}
    barrier()
    _reset_peak()
    base = _status("VmRSS")
    mapped = torch.from_file(spec["path"], shared=False, size=spec["n_file"] * D_IN, dtype=torch.float32)
    rows = mapped.view(spec["n_file"], D_IN)[:n]
    kwargs = dict(n_subsample=spec["m"], generator=spec["seed"] + 2, progress=False)
    if mode == "replicated":
        prior = vp.ExemplarPrior(rows.clone(), sync=world > 1, **kwargs)
    else:
        prior = vp.ExemplarPrior(rows, shard=True, **kwargs)
    del mapped, rows
    gc.collect()
    _libc("malloc_trim", 0)
    res.update(n_local=prior.n_local, build_peak=_status("VmHWM") - base, stored=_status("VmRSS") - base)
    prior.bind(enc)
    lo = vdist.shard_range(n, rank, world)[0] if prior.sharded else 0

    # -- exact evaluation ---------------------------------------------------------------
    prior.eval()
    barrier()
    _reset_peak()
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = prior.log_prob(z)
    res["eval_first_s"] = time.perf_counter() - t
    res["eval_first_cpu_s"] = time.process_time() - c
    res["eval_first_peak"] = _status("VmHWM") - base
    gc.collect()
    _libc("malloc_trim", 0)  # freed temporaries back to the system: what stays is held
    res["eval_resident"] = _status("VmRSS") - base  # stored exemplars + cached means
    res["eval_values"] = out.tolist()
    times, cpu = [], []
    for i in range(spec["repeats"]):
        barrier()
        counter.phase = "eval" if i == 0 else None
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            prior.log_prob(z)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        counter.phase = None
    res["eval_cached_s"], res["eval_cached_cpu_s"] = times, cpu
    res["eval_comm"] = counter.summary("eval")

    # -- training with exemplar subsampling --------------------------------------------
    prior.train()  # drops the evaluation cache
    elbo = vp.ExemplarELBO(enc, dec, prior)
    net: nn.Module = elbo
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(elbo)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    start, stop = vdist.shard_range(n, rank, world)
    gen = torch.Generator().manual_seed(spec["seed"] + 10 + rank)
    stored = prior.exemplars

    def step(phase: str | None) -> None:
        idx = torch.randint(start, stop, (spec["batch"],), generator=gen)
        x = stored[idx - lo]
        counter.phase = None if phase is None else phase + "_fwd"
        loss = net(x, idx).loss
        counter.phase = None if phase is None else phase + "_bwd"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        counter.phase = None
        opt.step()

    step(None)  # warm-up (generator sync, allocations)
    barrier()
    _reset_peak()
    times, cpu = [], []
    for i in range(spec["steps"]):
        barrier()
        t, c = time.perf_counter(), time.process_time()
        step("train" if i == 0 else None)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    res["train_s"], res["train_cpu_s"] = times, cpu
    res["train_peak"] = _status("VmHWM") - base
    res["train_comm_fwd"] = counter.summary("train_fwd")
    res["train_comm_bwd"] = counter.summary("train_bwd")
    return res


# -- the process harness (as tests/_distributed.py, without pytest) -----------------------
def _child(rank: int, world: int, store_dir: str, spec: dict) -> None:
    try:
        torch.set_num_threads(1)
        store = tdist.FileStore(os.path.join(store_dir, "store"), world)
        tdist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=PG_TIMEOUT))
        data = pickle.dumps(("ok", rank_job(rank, world, spec)))
    except BaseException:
        data = pickle.dumps(("error", traceback.format_exc()))
    path = os.path.join(store_dir, f"result{rank}")
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the process group's destructor


def run_job(world: int, spec: dict, timeout: float) -> list[dict]:
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="vaepriors-bench-dist-") as tmp:
        procs = [ctx.Process(target=_child, args=(r, world, tmp, spec), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        outcomes: dict[int, tuple] = {}
        try:
            while len(outcomes) < world and time.monotonic() < deadline:
                for r, p in enumerate(procs):
                    path = os.path.join(tmp, f"result{r}")
                    if r in outcomes:
                        continue
                    code = p.exitcode
                    if os.path.exists(path):
                        with open(path, "rb") as f:
                            outcomes[r] = pickle.load(f)
                    elif code is not None:
                        outcomes[r] = ("exit", code)
                if any(o[0] != "ok" for o in outcomes.values()):
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
    bad = {r: outcomes.get(r, ("hung", None)) for r in range(world) if outcomes.get(r, ("hung",))[0] != "ok"}
    if bad:
        raise RuntimeError(f"job {spec} on {world} ranks failed: " + "\n".join(f"rank {r}: {o}" for r, o in bad.items()))
    return [outcomes[r][1] for r in range(world)]


# -- per-rank compute throughput for the model ---------------------------------------------
def microbench(d: int, batch: int, m: int, repeats: int = 5) -> dict:
    """CPU seconds per encoded exemplar (fwd, and fwd + bwd) of this benchmark's linear encoder
    and of the papers' gated MLP encoder, and per (query, exemplar) pair of the engine (fwd, and
    fwd + bwd), on this process's thread(s); medians of process CPU time."""

    def best(fn) -> float:  # noqa: ANN001
        fn()
        ts = []
        for _ in range(repeats):
            t = time.process_time()  # CPU time: what other jobs on the machine do not stretch
            fn()
            ts.append(time.process_time() - t)
        return statistics.median(ts)

    torch.manual_seed(0)
    out: dict = {}
    rows = 4096
    for name, enc, d_in in (("linear", LinearEncoder(d), D_IN), ("gated_mlp", model(d, seed=0)[0], 784)):
        x = torch.rand(rows, d_in)

        def fwd(enc: nn.Module = enc, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                enc(x)

        def fwd_bwd(enc: nn.Module = enc, x: torch.Tensor = x) -> None:
            mean, _ = enc(x)
            mean.sum().backward()

        out[f"enc_{name}_fwd_s_per_row"] = best(fwd) / rows
        out[f"enc_{name}_train_s_per_row"] = best(fwd_bwd) / rows
    z = torch.randn(batch, d, requires_grad=True)
    mu = torch.randn(m, d, requires_grad=True)
    lv = torch.zeros((), requires_grad=True)

    def eng_fwd() -> None:
        with torch.no_grad():
            vp.mixture_logsumexp(z, mu, lv).log()

    def eng_train() -> None:
        vp.mixture_logsumexp(z, mu, lv).log().sum().backward()

    out["engine_fwd_s_per_pair"] = best(eng_fwd) / (batch * m)
    out["engine_train_s_per_pair"] = best(eng_train) / (batch * m)
    out["shape"] = dict(rows=rows, batch=batch, m=m, d=d)
    return out


# -- communication and the model -----------------------------------------------------------
def comm_formula(b: int, r: int, d: int, train: bool) -> dict:
    """The library's collectives per ``log_prob`` call of a sharded exemplar prior, per rank: the
    payload of each (all_gather: the gathered output; all_reduce: the reduced tensor)."""
    q = b * r
    ops = [
        ("all_gather", 10 * 8 * r, "row counts of the queries (header)"),
        ("all_gather", q * d * 4, "queries z, B R d float32"),
        ("all_gather", 10 * 8 * r, "row counts of the own indices (header)"),
        ("all_gather", q * 8, "own indices, B R int64 (training: leave-one-out; eval: all -1)"),
        ("all_reduce", q * 4, "max of the partial log-sum-exps, B R"),
        ("all_reduce", q * 4, "sum of the shifted partials, B R"),
    ]
    if train:
        ops += [
            ("all_reduce", q * d * 4, "backward: gradient of the gathered queries, B R d"),
            ("all_reduce", q * 4, "backward: gradient of the partial sums, B R"),
        ]
    return dict(ops=ops, calls=len(ops), bytes=sum(o[1] for o in ops))


def wire_seconds(ops: list, r: int, bandwidth: float, latency: float) -> float:
    """Ring algorithms: an all_gather of S output bytes moves (R-1)/R S per rank, an all_reduce
    of S bytes 2 (R-1)/R S; each collective pays ``latency`` once."""
    t = 0.0
    for op, nbytes, _ in ops:
        factor = (r - 1) / r * (2 if op == "all_reduce" else 1)
        t += latency + factor * nbytes / bandwidth
    return t


def sharding_model(micro: dict, b: int, d: int, links: list[dict], ranks: list[int]) -> list[dict]:
    """Where a sharded exemplar prior beats a replicated one, per rank and training step with
    exemplar subsampling M = N / 2, B queries per rank:

        replicated: M t_enc + B M t_pair                      (no communication)
        sharded:    M/R t_enc + (B R)(M/R) t_pair + T_comm    (the same engine work per rank)

    so sharding pays once M (1 - 1/R) t_enc > T_comm, i.e. N* = 2 T_comm / ((1 - 1/R) t_enc).
    For exact evaluation (cached means) both do Q N / R pairs per rank: sharding costs T_comm
    per call and saves the encoding of N (1 - 1/R) exemplars whenever the encoder changed, and
    the memory of N (1 - 1/R) stored exemplars and means."""
    rows = []
    for link in links:
        for r in ranks:
            ops = comm_formula(b, r, d, train=True)["ops"]
            t_comm = wire_seconds(ops, r, link["bandwidth"], link["latency"])
            ops_eval = comm_formula(b, r, d, train=False)["ops"]
            row = dict(link=link["name"], R=r, B=b, d=d, comm_bytes=sum(o[1] for o in ops), train_comm_s=t_comm,
                       eval_comm_s=wire_seconds(ops_eval, r, link["bandwidth"], link["latency"]))  # fmt: skip
            for enc in ("linear", "gated_mlp"):
                t_enc = micro[f"enc_{enc}_train_s_per_row"]
                row[f"n_star_train_{enc}"] = 2 * t_comm / ((1 - 1 / r) * t_enc)
                row[f"n_star_train_{enc}_x{GPU_FACTOR}"] = GPU_FACTOR * row[f"n_star_train_{enc}"]
            rows.append(row)
    return rows


# -- output ----------------------------------------------------------------------------------
def mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def summarise(cfg: dict, ranks: list[dict]) -> dict:
    r = cfg["R"]
    first = max(x["eval_first_s"] for x in ranks)
    cached = statistics.median(max(x["eval_cached_s"][i] for x in ranks) for i in range(len(ranks[0]["eval_cached_s"])))
    train = statistics.median(max(x["train_s"][i] for x in ranks) for i in range(len(ranks[0]["train_s"])))
    cpu = {k: statistics.median(max(x[k][i] for x in ranks) for i in range(len(ranks[0][k])))
           for k in ("eval_cached_cpu_s", "train_cpu_s")}  # fmt: skip
    return dict(
        **{k: cfg[k] for k in ("scaling", "mode", "R", "n", "m", "q_total", "batch")},
        n_local=[x["n_local"] for x in ranks],
        eval_first_s=first, eval_cached_s=cached, train_s=train,
        eval_first_cpu_s=max(x["eval_first_cpu_s"] for x in ranks), **cpu,
        stored_mib=max(x["stored"] for x in ranks) / 2**20,
        build_peak_mib=max(x["build_peak"] for x in ranks) / 2**20,
        eval_resident_mib=max(x["eval_resident"] for x in ranks) / 2**20,
        eval_peak_mib=max(x["eval_first_peak"] for x in ranks) / 2**20,
        train_peak_mib=max(x["train_peak"] for x in ranks) / 2**20,
        eval_comm_bytes=ranks[0]["eval_comm"]["all_gather_bytes"] + ranks[0]["eval_comm"]["all_reduce_bytes"],
        eval_comm_calls=ranks[0]["eval_comm"]["calls"],
        train_comm_bytes=sum(ranks[0][k]["all_gather_bytes"] + ranks[0][k]["all_reduce_bytes"] for k in ("train_comm_fwd", "train_comm_bwd")),
        train_comm_calls=ranks[0]["train_comm_fwd"]["calls"] + ranks[0]["train_comm_bwd"]["calls"],
        oversubscribed=r > (os.cpu_count() or 1),
    )  # fmt: skip


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    panels = [
        ("strong", "eval_cached_s", "strong: exact eval, cached means (s)"),
        ("strong", "eval_resident_mib", "strong: per-rank resident after eval (MiB)"),
        ("weak", "eval_cached_s", "weak: exact eval, cached means (s)"),
        ("strong", "train_s", "strong: training step, subsampling (s)"),
    ]
    for ax, (scaling, key, title) in zip(axes, panels):
        for mode, colour, marker in (("replicated", "tab:blue", "o"), ("shard", "tab:orange", "s")):
            keys = [(key, "-", "wall")] + ([(key.replace("_s", "_cpu_s"), "--", "CPU")] if key.endswith("_s") else [])
            for k, ls, what in keys:
                pts = sorted((r["R"], r[k]) for r in rows if r["scaling"] == scaling and (r["mode"] == mode or r["R"] == 1))
                if pts:
                    label = f"{mode} ({what})" if key.endswith("_s") else mode
                    ax.plot(*zip(*pts), ls, marker=marker, color=colour, label=label)
        one = [r[key] for r in rows if r["scaling"] == scaling and r["R"] == 1]
        if one and key in ("eval_cached_s", "eval_resident_mib") and scaling == "strong":
            rs = sorted({r["R"] for r in rows})
            ax.plot(rs, [one[0] / x for x in rs], "k:", lw=1, label="1/R")
        ax.set_xlabel("ranks R (R = 3: 2 cores oversubscribed)")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(sorted({r["R"] for r in rows}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"bench_distributed: gloo, 1 thread per rank ({report['meta']['device_name']}, "
                 f"{report['meta']['cpu_count']} cores, load average {report['meta']['load_start']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(report: dict) -> str:
    meta, a = report["meta"], report["meta"]["args"]
    L = [
        f"# Exemplar prior over ranks: gloo on CPU ({meta['device_name']}, {meta['cpu_count']} cores)",
        "",
        f"torch {meta['torch']}, gloo, 1 torch thread per rank, {meta['date']}; load average at start "
        f"{meta['load_start']}, at end {meta['load_end']} (a shared machine; R = 3 oversubscribes its 2 cores). "
        f"Command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} min).",
        "",
        f"Cheap encoder `nn.Linear(40, 2d)`, d = {a['d']}, so that the engine dominates. Eval: Q = {a['queries']} "
        f"queries in all, split over the ranks. Training: B = {a['batch']} per rank, exemplar subsampling "
        f"M = {a['subsample_fraction']} N, DDP, Adam. Times: the slowest rank's wall time (its process CPU time "
        "in brackets: compute plus gloo's threads, which contention does not stretch), median over "
        f"{a['repeats']} cached calls / {a['steps']} steps (and over the repeated jobs of a configuration). "
        "Memory: the largest rank's resident growth above the process before the data was mapped.",
        "",
        "| scaling | mode | R | N | N per rank | eval 1st call s | eval cached s (CPU s) | x R=1 (CPU) | "
        "train step s (CPU s) | stored MiB | resident after eval MiB | eval peak MiB | train peak MiB | "
        "build peak MiB | jobs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        L.append(
            f"| {r['scaling']} | {r['mode']} | {r['R']}{' (over)' if r['oversubscribed'] else ''} | {r['n']} | "
            f"{max(r['n_local'])} | {r['eval_first_s']:.2f} | {r['eval_cached_s']:.2f} ({r['eval_cached_cpu_s']:.2f}) | "
            f"{r['x_one']:.2f} ({r['x_one_cpu']:.2f}) | {r['train_s']:.2f} ({r['train_cpu_s']:.2f}) | {r['stored_mib']:.0f} | {r['eval_resident_mib']:.0f} | {r['eval_peak_mib']:.0f} | "
            f"{r['train_peak_mib']:.0f} | {r['build_peak_mib']:.0f} | {r['jobs']} |"
        )
    t = report["target"]
    L += [
        "",
        f"**Target** (2 ranks, exact evaluation of N = {t['n']}, sharded, cached means): at most 0.6x one "
        f"rank's time. Measured {t['shard_2']:.2f} s against {t['one']:.2f} s: **{t['ratio']:.2f}x, "
        f"{'met' if t['met'] else 'not met'}** (jobs: one rank {', '.join(f'{v:.2f}' for v in t['one_jobs'])} s, "
        f"two {', '.join(f'{v:.2f}' for v in t['shard_2_jobs'])} s; first call, with encoding: {t['ratio_first']:.2f}x). "
        f"Process CPU time per rank: {t['shard_2_cpu']:.2f} s against {t['one_cpu']:.2f} s, {t['ratio_cpu']:.2f}x: "
        "the work each rank does. "
        f"Sharded values vs one process: max |difference| {t['max_abs_diff']:.2e}.",
        "",
        "Per-rank memory (strong scaling, resident after the first eval call: stored exemplars and cached "
        "means) against N/R:",
        "",
        "| mode | R | N/R | MiB | MiB per 1e6 exemplars held |",
        "|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        if r["scaling"] == "strong":
            per = r["eval_resident_mib"] / (max(r["n_local"]) / 1e6)
            L.append(f"| {r['mode']} | {r['R']} | {max(r['n_local'])} | {r['eval_resident_mib']:.0f} | {per:.0f} |")
    L += [
        "",
        f"(One exemplar held costs {2 * D_IN * 4 + 0} bytes here: its 40 float32 inputs and its 40-d float32 mean, "
        f"{2 * D_IN * 4 * 1e6 / 2**20:.0f} MiB per 1e6.)",
        "",
        "## Communication per call (sharded prior; replicated: none in log_prob)",
        "",
        "Per `log_prob` call, each rank: gather the queries of all ranks (B R d float32) and their own "
        "indices (B R int64), each a row-count header gather and a row gather; all-reduce the max and the "
        "shifted sum of the partial log-sum-exps (B R float32 each). Backward (training): all-reduce the "
        "gradient of the gathered queries (B R d) and of the partial sums (B R). Payload = the gathered "
        "output / the reduced tensor. Measured by wrapping the collectives, against the formula:",
        "",
        "| scaling | R | B per rank | eval: calls | eval bytes (measured) | eval bytes (formula) | "
        "train fwd+bwd: calls | bytes (measured) | bytes (formula) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        if r["mode"] == "shard" and r["R"] > 1:
            b_eval = math.ceil(r["q_total"] / r["R"])
            fe = comm_formula(b_eval, r["R"], a["d"], False)
            ft = comm_formula(r["batch"], r["R"], a["d"], True)
            L.append(
                f"| {r['scaling']} | {r['R']} | {b_eval} (eval), {r['batch']} (train) | {r['eval_comm_calls']} | "
                f"{r['eval_comm_bytes']} | {fe['bytes']} | {r['train_comm_calls']} | {r['train_comm_bytes']} | {ft['bytes']} |"
            )
    L += ["", "Formula (B queries per rank, R ranks, d): " + report["comm_formula_text"], ""]
    micro = report["micro"]
    L += [
        "## Model: where sharding pays on 8 to 64 GPUs (from CPU-measured compute; NOT a GPU measurement)",
        "",
        f"Per-rank compute measured here on 1 CPU thread (process CPU time, medians): linear encoder {micro['enc_linear_train_s_per_row'] * 1e9:.0f} ns "
        f"per exemplar fwd+bwd ({micro['enc_linear_fwd_s_per_row'] * 1e9:.0f} fwd), the papers' gated MLP encoder "
        f"{micro['enc_gated_mlp_train_s_per_row'] * 1e6:.1f} us ({micro['enc_gated_mlp_fwd_s_per_row'] * 1e6:.1f} fwd), "
        f"engine {micro['engine_train_s_per_pair'] * 1e9:.1f} ns per (query, exemplar) pair fwd+bwd "
        f"({micro['engine_fwd_s_per_pair'] * 1e9:.1f} fwd). Assumed interconnects: "
        + "; ".join(f"{lk['name']}: {lk['bandwidth'] / 1e9:.0f} GB/s per rank, {lk['latency'] * 1e6:.0f} us "
                    "per collective" for lk in report["links"])
        + ". Ring collectives: an all-gather moves (R-1)/R of its output per rank, an all-reduce 2 (R-1)/R.",
        "",
        "Training step with subsampling M = N/2, B = "
        f"{a['batch']} per rank: the engine work per rank is the same replicated or sharded (B x M pairs); sharding "
        "saves re-encoding M (1 - 1/R) exemplars per step and costs T_comm, so it pays for N > N* = "
        "2 T_comm / ((1 - 1/R) t_enc). A GPU encodes far faster than this CPU thread: N* grows in proportion "
        f"(the last two columns: N* for a GPU assumed {GPU_FACTOR}x faster per exemplar than this CPU thread, "
        "an illustration, not a measurement).",
        "",
        f"| link | R | bytes per step | T_comm train (us) | T_comm eval (us) | N* linear encoder | N* gated MLP encoder | "
        f"N* linear, GPU {GPU_FACTOR}x (assumed) | N* gated MLP, GPU {GPU_FACTOR}x (assumed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["model"]:
        L.append(
            f"| {r['link']} | {r['R']} | {r['comm_bytes']} | {r['train_comm_s'] * 1e6:.0f} | {r['eval_comm_s'] * 1e6:.0f} | "
            f"{r['n_star_train_linear']:.3g} | {r['n_star_train_gated_mlp']:.3g} | "
            f"{r[f'n_star_train_linear_x{GPU_FACTOR}']:.3g} | {r[f'n_star_train_gated_mlp_x{GPU_FACTOR}']:.3g} |"
        )
    L += [
        "",
        "Exact evaluation with cached means does the same Q N / R pairs per rank in both modes: sharding adds "
        "T_comm eval per call and saves N (1 - 1/R) encodings each time the encoder has changed, and the memory: "
        f"a replicated prior holds {2 * D_IN * 4} bytes per exemplar here (inputs + means) on every rank "
        f"({2 * D_IN * 4 * 1e9 / 2**30:.0f} GiB for N = 1e9), a sharded one 1/R of it.",
    ]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute (a smoke run)")
    ap.add_argument("--n", type=int, default=1_000_000, help="strong scaling: N")
    ap.add_argument("--n-per-rank", type=int, default=333_333, help="weak scaling: N / R")
    ap.add_argument("--ranks", default="1,2,3", help="world sizes")
    ap.add_argument("--d", type=int, default=40, help="latent size")
    ap.add_argument("--queries", type=int, default=120, help="eval: queries in all, split over the ranks")
    ap.add_argument("--batch", type=int, default=100, help="training: batch per rank")
    ap.add_argument("--subsample-fraction", type=float, default=0.1,
                    help="training: M = this x N (the papers: 0.5; 0.1 keeps the default run short)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=2, help="cached eval calls per job")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per job")
    ap.add_argument("--target-repeats", type=int, default=3,
                    help="jobs of the target pair (strong, R = 1 and R = 2 sharded), alternating")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up: kill the ranks
    if args.quick:
        args.n, args.n_per_rank, args.ranks, args.queries = 100_000, 50_000, "1,2", 60
        args.repeats, args.steps, args.target_repeats, args.subsample_fraction = 2, 2, 1, 0.1
    ranks = [int(r) for r in args.ranks.split(",")]
    torch.set_num_threads(1)
    load_start = [round(v, 2) for v in os.getloadavg()]
    t_start = time.perf_counter()

    n_file = max(args.n, args.n_per_rank * max(ranks))
    tmp = tempfile.TemporaryDirectory(prefix="vaepriors-bench-dist-data-")
    path = os.path.join(tmp.name, "exemplars.f32")
    torch.randn(n_file, D_IN, generator=torch.Generator().manual_seed(0)).numpy().tofile(path)

    def cfg(scaling: str, mode: str, r: int) -> dict:
        n = args.n if scaling == "strong" else args.n_per_rank * r
        return dict(scaling=scaling, mode=mode, R=r, n=n, m=max(1, int(args.subsample_fraction * n)), q_total=args.queries,
                    batch=args.batch, d=args.d, repeats=args.repeats, steps=args.steps, path=path, n_file=n_file, seed=0)  # fmt: skip

    jobs = []
    for scaling in ("strong", "weak"):
        for r in ranks:
            for mode in (("replicated",) if r == 1 else ("replicated", "shard")):
                jobs.append(cfg(scaling, mode, r))
    if 1 in ranks and 2 in ranks:  # the target pair again, alternating, for side-by-side medians
        for _ in range(args.target_repeats - 1):
            jobs += [cfg("strong", "replicated", 1), cfg("strong", "shard", 2)]
    results: dict[tuple, list] = {}
    for spec in jobs:
        t = time.perf_counter()
        out = run_job(spec["R"], spec, args.timeout)
        key = (spec["scaling"], spec["mode"], spec["R"])
        results.setdefault(key, []).append(out)
        print(f"{key} N={spec['n']}: eval cached {max(max(x['eval_cached_s']) for x in out):.2f} s, train "
              f"{max(max(x['train_s']) for x in out):.2f} s ({time.perf_counter() - t:.0f} s)", file=sys.stderr)  # fmt: skip
    tmp.cleanup()

    summary = []
    for key, outs in results.items():
        rows = [summarise(next(j for j in jobs if (j["scaling"], j["mode"], j["R"]) == key), o) for o in outs]
        row = dict(rows[0])
        for k in ("eval_first_s", "eval_cached_s", "train_s", "eval_first_cpu_s", "eval_cached_cpu_s", "train_cpu_s"):
            row[k] = statistics.median(r[k] for r in rows)
            row[k + "_jobs"] = [r[k] for r in rows]
        row["jobs"] = len(rows)
        summary.append(row)
    for row in summary:
        one = next(r for r in summary if r["scaling"] == row["scaling"] and r["R"] == 1)
        row["x_one"] = row["eval_cached_s"] / one["eval_cached_s"]
        row["x_one_cpu"] = row["eval_cached_cpu_s"] / one["eval_cached_cpu_s"]
        row["x_one_train"] = row["train_s"] / one["train_s"]

    def values(key: tuple) -> torch.Tensor:
        return torch.tensor([v for rank in results[key][0] for v in rank["eval_values"]], dtype=torch.float64)

    one = next(r for r in summary if r["scaling"] == "strong" and r["R"] == 1)
    two = next((r for r in summary if r["scaling"] == "strong" and r["mode"] == "shard" and r["R"] == 2), one)
    diffs = [float((values(k) - values(("strong", "replicated", 1))).abs().max()) for k in results if k[0] == "strong"]
    target = dict(n=args.n, one=one["eval_cached_s"], shard_2=two["eval_cached_s"], ratio=two["eval_cached_s"] / one["eval_cached_s"],
                  ratio_first=two["eval_first_s"] / one["eval_first_s"], max_abs_diff=max(diffs),
                  one_cpu=one["eval_cached_cpu_s"], shard_2_cpu=two["eval_cached_cpu_s"],
                  ratio_cpu=two["eval_cached_cpu_s"] / one["eval_cached_cpu_s"],
                  one_jobs=one["eval_cached_s_jobs"], shard_2_jobs=two["eval_cached_s_jobs"])  # fmt: skip
    target["met"] = target["ratio"] <= 0.6

    micro = microbench(args.d, args.batch, max(1, int(args.subsample_fraction * args.n)))
    links = [dict(name="NVLink-class", bandwidth=100e9, latency=10e-6), dict(name="network", bandwidth=25e9, latency=30e-6)]
    model_rows = sharding_model(micro, args.batch, args.d, links, [8, 16, 32, 64])
    formula_text = (
        "eval: 6 collectives, bytes = B R d 4 (queries) + B R 8 (indices) + 2 B R 4 (max, sum) + 2 x 80 R (headers); "
        "training adds 2 in the backward: B R d 4 (query gradients) + B R 4 (partial-sum gradients)."
    )
    report = dict(
        meta=dict(**machine("cpu"), threads_per_rank=1, load_start=load_start, load_end=[round(v, 2) for v in os.getloadavg()],
                  wall_s=time.perf_counter() - t_start,
                  command=f"python benchmarks/bench_distributed.py {' '.join(sys.argv[1:])}".strip(),
                  args={k: v for k, v in vars(args).items() if k != "out"}),
        summary=summary, target=target, micro=micro, links=links, model=model_rows, comm_formula_text=formula_text,
        comm_formula={f"B={b},R={r},d={args.d}": comm_formula(b, r, args.d, True) for b in (100, 1000) for r in (2, 8, 64)},
        ranks={f"{k[0]}/{k[1]}/R={k[2]}": [[{kk: vv for kk, vv in x.items() if kk != "eval_values"} for x in o] for o in v]
               for k, v in results.items()},
    )  # fmt: skip
    md = write_results(args.out, "distributed_quick_cpu" if args.quick else "distributed_cpu", report, markdown, plot)
    print(md)


if __name__ == "__main__":
    main()
