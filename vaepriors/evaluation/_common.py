r"""Plumbing every evaluation shares: reading the model, batches, devices, budgets, ranks."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .. import _checks
from .. import distributed as dist
from ..elbo import ExemplarELBO
from ..encoder import Posterior, read_posterior
from ..errors import VAEPriorsError

__all__: list[str] = []

# On CPU, chunks whose temporaries stay below glibc's 32 MB mmap threshold reuse heap memory;
# larger ones are page-faulted afresh every chunk (measured: 3x more system time at 256 MiB).
DEFAULT_MEMORY_BUDGET = 64 * 2**20
"""Bytes of temporaries a chunk of work may use by default on CPU (64 MiB); on a CUDA
device the default is a quarter of its free memory."""

_LOG_2PI = math.log(2 * math.pi)



class _Parts(NamedTuple):
    encode: Callable[[Tensor], Posterior]
    decoder: Callable[[Tensor], Any] | None
    prior: Any
    roots: list[nn.Module]


def _parts(model: Any) -> _Parts:
    """Reads an ExemplarELBO-like object, an ``(encoder, decoder, prior)`` triple, or an encoder."""
    if isinstance(model, (tuple, list)):
        if len(model) != 3:
            raise VAEPriorsError(f"`model` as a sequence must be (encoder, decoder, prior), got {len(model)} items")
        encoder, decoder, prior = model
        if not callable(encoder):
            raise VAEPriorsError(f"`model` encoder must be callable, got {type(encoder).__name__}")
        roots = [m for m in model if isinstance(m, nn.Module)]
        return _Parts(lambda x: read_posterior(encoder(x), "encoder"), decoder, prior, roots)
    if hasattr(model, "encode"):
        roots = [model] if isinstance(model, nn.Module) else []
        prior = getattr(model, "prior", None)
        roots += [prior] if isinstance(prior, nn.Module) else []
        return _Parts(
            lambda x: read_posterior(model.encode(x), "encoder"), getattr(model, "decoder", None), prior, roots
        )
    if callable(model):
        roots = [model] if isinstance(model, nn.Module) else []
        return _Parts(lambda x: read_posterior(model(x), "encoder"), None, None, roots)
    raise VAEPriorsError(
        "`model` must be an ExemplarELBO (or any object with encode), a triple (encoder, decoder, prior) "
        f"or an encoder callable; got {type(model).__name__}"
    )


def _elbo_model(model: Any) -> Any:
    """An object with ``encode``, ``log_likelihood`` and ``prior`` (wrapping a triple)."""
    if isinstance(model, (tuple, list)):
        if len(model) != 3:
            raise VAEPriorsError(f"`model` as a sequence must be (encoder, decoder, prior), got {len(model)} items")
        return ExemplarELBO(*model)
    if not all(hasattr(model, a) for a in ("encode", "log_likelihood", "prior")):
        raise VAEPriorsError(
            "`model` must be an ExemplarELBO (or any object with encode, log_likelihood and prior) or a "
            f"triple (encoder, decoder, prior); got {type(model).__name__}"
        )
    return model


@contextmanager
def _evaluating(roots: Sequence[nn.Module]) -> Iterator[None]:
    """Evaluation mode and no gradients inside; every module's own mode restored after."""
    saved: dict[nn.Module, bool] = {}
    for root in roots:
        for m in root.modules():
            saved.setdefault(m, m.training)
    try:
        with _keeping_eval_caches(saved):
            for root in roots:
                root.eval()  # through eval(), so that modules overriding train() see the switch
        with torch.no_grad():
            yield
    finally:
        with _keeping_eval_caches(saved):
            for root in roots:
                root.train(saved[root])
            for m, mode in saved.items():
                m.training = mode


@contextmanager
def _keeping_eval_caches(modules) -> Iterator[None]:
    """Mode switches inside keep the evaluation caches of modules that have one
    (``ExemplarPrior``'s encoded means, which its ``train()`` drops): no user code runs
    between the evaluation functions' own switches, and each entry is still checked against
    the encoder's versions and modes when used."""
    caches = {m: m._eval_cache for m in modules if getattr(m, "_eval_cache", None) is not None}
    yield
    for m, cache in caches.items():
        m._eval_cache = cache


def _device_of(roots: Sequence[nn.Module], device: torch.device | str | None = None) -> torch.device | None:
    """The caller's ``device`` if given, else the model's (its first tensor), else ``None``."""
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise VAEPriorsError(f"`device` must be a torch.device or a device name like 'cpu', got {device!r}")
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise VAEPriorsError(f"`device` is not a device name: {device!r} ({err})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise VAEPriorsError(f"`device` is {device!r} but this torch has no usable CUDA")
        return dev
    for root in roots:
        for t in (*root.parameters(), *root.buffers()):
            return t.device
    return None


def _budget(memory_budget: object, device: torch.device | None) -> int:
    if memory_budget is None:
        if device is not None and device.type == "cuda":
            return max(DEFAULT_MEMORY_BUDGET, torch.cuda.mem_get_info(device)[0] // 4)
        return DEFAULT_MEMORY_BUDGET
    return _checks.positive_int(memory_budget, "memory_budget")


def _data_tensor(x: object, name: str) -> Tensor:
    x = _checks.tensor(x, name)
    if x.dim() < 1 or x.shape[0] == 0:
        raise VAEPriorsError(f"`{name}` must have shape [N, ...] with N >= 1, got {tuple(x.shape)}")
    return x


def _batches(data: object, batch_size: int) -> tuple[Iterator[Tensor], int | None]:
    """Batches of x from a tensor, or from an iterable of x or (x, y, ...); and the count if known."""
    if isinstance(data, Tensor):
        data = _data_tensor(data, "data")
        return (data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)), data.shape[0]
    if not isinstance(data, Iterable):
        raise VAEPriorsError(
            f"`data` must be a tensor [N, ...] or an iterable (e.g. a DataLoader) of x or (x, y) batches; "
            f"got {type(data).__name__}"
        )
    total = None
    try:
        total = len(data.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        pass

    def gen() -> Iterator[Tensor]:
        for item in data:
            x = item[0] if isinstance(item, (tuple, list)) and len(item) > 0 else item
            if not isinstance(x, Tensor) or x.dim() < 1:
                raise VAEPriorsError(
                    "`data` must yield tensors [B, ...] or tuples whose first item is such a tensor; "
                    f"got {type(x).__name__}"
                )
            yield x

    return gen(), total


def _eval_comm(prior: Any, distributed: bool | None) -> dist.Comm | None:
    """The process group an evaluation splits its work over, or ``None`` (one process).

    ``None`` splits only when the prior is sharded (its every call is collective); ``True``
    whenever torch.distributed is initialised with more than one process."""
    sharded = bool(getattr(prior, "sharded", False))
    if distributed is None:
        distributed = sharded
    if not isinstance(distributed, bool):
        raise VAEPriorsError(f"`distributed` must be True, False or None, got {distributed!r}")
    if sharded and not distributed:
        raise VAEPriorsError(
            "`distributed=False` with a sharded prior: every rank holds only its block of the exemplars, so "
            "every rank must evaluate together (distributed=True or None)"
        )
    return dist.comm() if distributed else None


def _my_rows(data: Any, comm: dist.Comm | None, name: str = "data") -> tuple[Any, int]:
    """This rank's contiguous block of a tensor ``data`` and its first row (all of it alone)."""
    if comm is None:
        return data, 0
    if not isinstance(data, Tensor):
        raise VAEPriorsError(
            f"`{name}` must be a tensor to split the evaluation over ranks (distributed=True); got "
            f"{type(data).__name__}"
        )
    start, stop = dist.shard_range(data.shape[0], comm.rank, comm.world_size)
    return data[start:stop], start


def _location_of(parts: _Parts) -> Callable | None:
    """The point function of the model's prior (``location``), where it has one."""
    return getattr(parts.prior, "location", None)


def _encode_all(
    parts: _Parts, x: Tensor, batch_size: int, device: torch.device | None, comm: dist.Comm | None = None
) -> Tensor:
    """The posteriors' points (means) of ``x``, ``[N, d]``, batch by batch (a block per rank,
    gathered, under ``comm``)."""
    mine, _ = _my_rows(x, comm)
    means = []
    for i in range(0, mine.shape[0], batch_size):
        xb = mine[i : i + batch_size]
        xb = xb.to(device) if device is not None else xb
        means.append(parts.encode(xb).location(_location_of(parts)))
    if comm is None:
        return torch.cat(means)
    if not means:  # a rank with no rows still learns d and dtype from one encoding
        means.append(parts.encode(x[:1].to(device) if device is not None else x[:1]).location(_location_of(parts))[:0])
    return dist.all_gather_rows(torch.cat(means), comm, "evaluation: gathering the encoded points")[0]
def _distributed_flag(distributed: object) -> bool:
    if not isinstance(distributed, bool):
        raise VAEPriorsError(f"`distributed` must be True or False, got {distributed!r}")
    return distributed
