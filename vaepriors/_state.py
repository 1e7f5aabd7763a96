r"""Module state that follows ``.to()`` and ``state_dict`` like a buffer but is not one.

``DistributedDataParallel`` broadcasts every buffer from rank 0 before each forward. The
priors' caches, coresets and exemplar shards are kept consistent across ranks by the priors
themselves (merged, or deliberately different per rank), so they must not be buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["StateModule"]


class StateModule(nn.Module):
    r"""An :class:`~torch.nn.Module` with :meth:`register_state`."""

    def register_state(self, name: str, tensor: Tensor, *, persistent: bool = True, resizable: bool = False) -> None:
        r"""Registers a tensor that follows ``.to()`` and (if ``persistent``) round-trips
        through ``state_dict`` like a buffer, but is not one: ``buffers()`` omits it, so
        ``DistributedDataParallel`` never broadcasts it from rank 0. The prior keeps such
        state consistent across processes itself (see :mod:`vaepriors.distributed`).
        Assign to ``self.<name>`` to replace it. A ``resizable`` state takes the shape of
        the tensor loaded into it (e.g. a cache built lazily)."""
        states = self.__dict__.setdefault("_own_state", {})
        states[name] = (persistent, resizable)
        object.__setattr__(self, name, tensor)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        for name in self.__dict__.get("_own_state", {}):
            object.__setattr__(self, name, fn(getattr(self, name)))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, (persistent, _) in self.__dict__.get("_own_state", {}).items():
            if persistent:
                t = getattr(self, name)
                destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for name, (persistent, resizable) in self.__dict__.get("_own_state", {}).items():
            key = prefix + name
            if not persistent:
                continue
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value, current = state_dict[key], getattr(self, name)
            if resizable and isinstance(value, Tensor) and value.shape != current.shape:
                object.__setattr__(self, name, value.detach().to(current).clone())
                continue
            if not isinstance(value, Tensor) or value.shape != current.shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {got} from checkpoint, "
                                  f"the shape in current model is {tuple(current.shape)}.")
                continue
            with torch.no_grad():
                current.copy_(value)

