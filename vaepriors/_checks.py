"""Argument checks shared by every module; each raises VAEPriorsError naming the argument."""

from __future__ import annotations

import math
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


def finite(x: Tensor, name: str) -> Tensor:
    # NaN and +-inf show up in the extremes: no input-sized temporaries (isfinite() makes
    # two, 270 MB at N = 1e6 means), one host sync.
    if validation_enabled() and x.numel():
        extremes = torch.stack(torch.aminmax(x.detach()))
        if not bool(torch.isfinite(extremes).all()):
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
    if validation_enabled() and idx.numel() and bool(((idx < -1) | (idx >= size)).any()):
        raise VAEPriorsError(
            f"`{name}` values must lie in [0, {size}) (or be -1 for no exclusion); "
            f"got range [{int(idx.min())}, {int(idx.max())}]"
        )
    return idx.long()


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
