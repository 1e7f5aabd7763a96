"""Argument checks shared by every module; each raises VAEPriorsError naming the argument."""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
from torch import Tensor

from .errors import VAEPriorsError, validation_enabled


def tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise VAEPriorsError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type == "meta":
        raise VAEPriorsError(f"`{name}` is on the meta device: it holds no values")
    return x


def number(x: object, name: str, *, finite: bool = True) -> float:
    """A real number (a Python number or a one-element tensor) as a float."""
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_complex():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else repr(x)
        raise VAEPriorsError(f"`{name}` must be a number, got {got}")
    x = float(x)
    if finite and not math.isfinite(x):
        raise VAEPriorsError(f"`{name}` must be finite, got {x}")
    return x


def floating(x: object, name: str) -> Tensor:
    x = tensor(x, name)
    if not x.is_floating_point():
        raise VAEPriorsError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    return x


def all_finite(x: Tensor) -> bool:
    """Whether every value of floating ``x`` is finite: one reduction, one host sync.

    A NaN or an infinity anywhere makes the sum NaN or infinite, so a finite sum proves
    every value finite. The converse can fail (finite values whose sum overflows): only
    then are the extremes looked at. No input-sized temporaries (``isfinite()`` makes two,
    270 MB at N = 1e6 means).
    """
    if not x.numel():
        return True
    x = x.detach()
    if math.isfinite(x.sum().item()):
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())


def finite(x: Tensor, name: str) -> Tensor:
    if validation_enabled() and not all_finite(x):
        raise VAEPriorsError(f"`{name}` contains NaN or infinite values")
    return x


def latent(z: object, latent_dim: int | None, name: str = "z") -> Tensor:
    """A floating tensor of shape [*batch, latent_dim] with finite values."""
    z = floating(z, name)
    if z.dim() < 1:
        raise VAEPriorsError(f"`{name}` must have shape [*batch, d], got a scalar")
    if latent_dim is not None and z.shape[-1] != latent_dim:
        raise VAEPriorsError(
            f"`{name}` must have last dimension latent_dim={latent_dim}, got shape {tuple(z.shape)}"
        )
    return finite(z, name)


def index(idx: object, batch_shape: torch.Size, size: int, name: str = "index") -> Tensor:
    """An integer tensor of shape `batch_shape` with values in [0, size) (or -1: none)."""
    idx = tensor(idx, name)
    if idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.is_complex():
        raise VAEPriorsError(f"`{name}` must be an integer tensor, got dtype {idx.dtype}")
    if idx.shape != batch_shape:
        try:
            idx = idx.expand(batch_shape)
        except RuntimeError:
            raise VAEPriorsError(
                f"`{name}` must have shape {tuple(batch_shape)} (the batch shape of the queries)"
                f" or broadcast to it, got {tuple(idx.shape)}"
            ) from None
    if validation_enabled() and idx.numel() and not _checked(idx, size):
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one pass, one host sync
        if lo < -1 or hi >= size:
            raise VAEPriorsError(
                f"`{name}` values must lie in [0, {size}) (or be -1 for no exclusion); got range [{lo}, {hi}]"
            )
        _remember(idx, size)
    return idx.long()


# The index tensor last found in range: a training step passes the batch's index to the
# ELBO, the prior's observe and its log_prob; it is read back once, not three times. It
# is recognised by identity, version counter (in-place edits) and data pointer.
_LAST_INDEX: tuple = (None, None, 0)


def _key(idx: Tensor) -> tuple | None:
    try:
        return idx._version, idx.data_ptr()
    except RuntimeError:  # inference tensors carry no version counter
        return None


def _checked(idx: Tensor, size: int) -> bool:
    ref, key, checked_size = _LAST_INDEX
    return ref is not None and ref() is idx and key == _key(idx) and checked_size <= size


def _remember(idx: Tensor, size: int) -> None:
    global _LAST_INDEX
    key = _key(idx)
    if key is not None:
        try:
            _LAST_INDEX = (weakref.ref(idx), key, size)
        except TypeError:
            pass


def sample_shape(shape: int | Sequence[int] | torch.Size, name: str = "sample_shape") -> torch.Size:
    if isinstance(shape, bool):
        raise VAEPriorsError(f"`{name}` must be an int or a sequence of ints, got a bool")
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = torch.Size(shape)
    except TypeError:
        raise VAEPriorsError(f"`{name}` must be an int or a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise VAEPriorsError(f"`{name}` must not be negative, got {tuple(shape)}")
    return shape


def positive_int(n: object, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VAEPriorsError(f"`{name}` must be a positive int, got {n!r}")
    return n
