"""A test harness that runs a function on several processes joined by a gloo process group.

    from tests._distributed import run_ranks, needs_gloo

    def _check(rank, world_size, n):   # module level: the children import it by name
        ...                            # torch.distributed is initialised here
        return result                  # anything picklable

    @needs_gloo
    def test_something():
        results = run_ranks(_check, 2, 5)   # [rank 0's result, rank 1's result]

Each call starts fresh processes. They come from a fork server (start method "forkserver"):
a process started like "spawn" (a new interpreter, nothing inherited from the test process, no
CUDA state) that imports torch and vaepriors once and then forks each child. Plain "spawn"
imports torch anew in every child, 3 to 5 s each on a loaded 2-core machine, against 0.1 s.
Set VAEPRIORS_TEST_START_METHOD=spawn to use it anyway (where there is no fork server, it is
the default). Rendezvous goes through a FileStore in a fresh temporary directory, so no TCP
port can collide. A rank's exception fails the test with that rank's traceback; the harness
kills every child by the deadline and never hangs.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Collection

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankFailure", "needs_gloo", "run_ranks"]

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

START_METHOD = os.environ.get(
    "VAEPRIORS_TEST_START_METHOD", "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
)
PRELOAD = ["torch", "torch.distributed", "vaepriors", "pytest", "hypothesis"]  # imported once, by the fork server
PG_TIMEOUT = 30.0  # seconds: rendezvous and any collective not waited with a shorter timeout
GRACE = 1.0  # seconds the other ranks get to report once one rank has failed


class RankFailure(AssertionError):
    """One or more ranks raised, died or did not finish; the message holds their tracebacks."""


def _child(fn: Callable, rank: int, world_size: int, tmp: str, args: tuple, kwargs: dict) -> None:
    try:
        torch.set_num_threads(1)
        store = dist.FileStore(os.path.join(tmp, "store"), world_size)
        timeout = timedelta(seconds=PG_TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        outcome = ("ok", fn(rank, world_size, *args, **kwargs))
        data = pickle.dumps(outcome)
    except BaseException:
        data = pickle.dumps(("error", traceback.format_exc()))
    path = os.path.join(tmp, f"result{rank}")
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)  # the parent never reads half a file
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the process group's destructor: it waits for any collective still pending (one a
    # test made time out, say) until the group's own timeout.
    os._exit(0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    exits: Collection[int] = (),
    **kwargs: Any,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` fresh processes and
    returns their results in rank order.

    ``fn`` must be defined at module level (the children import it). Ranks in ``exits`` may end
    without a result (a test that makes a rank die); theirs is ``None``. Raises
    :class:`RankFailure` if a rank raises or dies, or if the ranks are not all done within
    ``timeout`` seconds; every child is killed before it returns. ``timeout`` and ``exits``
    are the harness's own keywords, not passed to ``fn``.
    """
    ctx = mp.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (first call)
    with tempfile.TemporaryDirectory(prefix="vaepriors-dist-") as tmp:
        procs = [
            ctx.Process(target=_child, args=(fn, rank, world_size, tmp, args, kwargs), daemon=True)
            for rank in range(world_size)
        ]
        outcomes: dict[int, tuple[str, Any]] = {}
        cut = False
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout
            while len(outcomes) < world_size and time.monotonic() < deadline:
                for rank, p in enumerate(procs):
                    if rank in outcomes:
                        continue
                    path = os.path.join(tmp, f"result{rank}")
                    exitcode = p.exitcode  # read before the file: a result is written before exit
                    if os.path.exists(path):
                        with open(path, "rb") as f:
                            outcomes[rank] = pickle.load(f)
                    elif exitcode is not None:
                        outcomes[rank] = ("exit", exitcode)
                failed = any(o[0] == "error" or (o[0] == "exit" and r not in exits) for r, o in outcomes.items())
                if failed and not cut:
                    deadline, cut = min(deadline, time.monotonic() + GRACE), True
                time.sleep(0.02)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
    problems = []
    for rank in range(world_size):
        kind, value = outcomes.get(rank, ("hung", None))
        if kind == "error":
            problems.append(f"--- rank {rank} raised:\n{value}")
        elif kind == "exit" and rank not in exits:
            problems.append(f"--- rank {rank} exited with code {value} without a result")
        elif kind == "hung":
            why = "still running after another rank failed" if cut else f"did not finish within {timeout:g} s"
            problems.append(f"--- rank {rank} {why} (killed)")
    if problems:
        raise RankFailure(f"{fn.__name__} on {world_size} ranks failed:\n" + "\n".join(problems))
    return [outcomes[r][1] if outcomes[r][0] == "ok" else None for r in range(world_size)]
