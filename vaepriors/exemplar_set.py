r"""Exemplars as the user stores them: a tensor of any dtype or a Dataset, read in chunks.

An exemplar prior encodes its exemplars chunk by chunk; :class:`ExemplarSet` is where those
chunks come from. The storage is kept as given (uint8 images stay uint8, a Dataset is never
stacked), and each chunk is moved to the model's device and turned into encoder inputs by a
transform only when it is encoded.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import VAEPriorsError

__all__ = ["ExemplarSet", "IndexedDataset", "default_transform"]

Transform = Callable[[Tensor], Tensor]


def default_transform(x: Tensor, dtype: torch.dtype) -> Tensor:
    r"""Stored exemplars -> encoder inputs of the model's floating ``dtype``.

    uint8 tensors are read as 8-bit pixel intensities and scaled to ``[0, 1]`` (as
    torchvision's ``ToTensor`` does); other integer and bool tensors are converted as they
    are; floating tensors are cast.

    Example:
        >>> default_transform(torch.tensor([0, 51, 255], dtype=torch.uint8), torch.float32)
        tensor([0.0000, 0.2000, 1.0000])
    """
    if x.dtype == torch.uint8:
        return x.to(dtype).div_(255)  # in place: one float copy of the chunk, not two
    return x.to(dtype)


def _first(item: Any) -> Any:
    if isinstance(item, (tuple, list)):
        if len(item) == 0:
            raise VAEPriorsError("a dataset item is an empty tuple; expected x or (x, y, ...)")
        return item[0]
    return item


def _collate(items: list) -> Tensor:
    # Module-level (picklable) so that DataLoader workers can use it.
    xs = [torch.as_tensor(_first(i)) for i in items]
    shape = xs[0].shape
    for x in xs:
        if x.shape != shape:
            raise VAEPriorsError(f"dataset items must all have one shape; got {tuple(shape)} and {tuple(x.shape)}")
    return torch.stack(xs)


class ExemplarSet:
    r"""N exemplars kept as the user stores them, read as encoder inputs in chunks.

    Arguments:
        data: a tensor ``[N, *shape]`` of any dtype (kept as it is: uint8 images stay
            uint8), or a :class:`~torch.utils.data.Dataset` of ``x`` or ``(x, y, ...)`` items
            (read through a :class:`~torch.utils.data.DataLoader` chunk by chunk, never
            stacked whole). A ``TensorDataset`` is read as its first tensor.
        transform: stored chunk -> encoder inputs, applied on the model's device after the
            move (so uint8 crosses to a GPU as uint8). ``None``: :func:`default_transform`
            to the model's dtype. A given transform's output is used as it is.
        device: where a tensor storage lives. ``None``: it follows the prior's ``.to()``
            (like a buffer); a device (e.g. ``"cpu"``): it stays there and only the chunks
            being encoded move to the model's device.
        num_workers: DataLoader workers for a Dataset.
        name: the argument's name in error messages.

    Example:
        >>> images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
        >>> s = ExemplarSet(images)
        >>> len(s), s.stored_dtype, s.rows(torch.tensor([0, 3]), torch.float32, "cpu").dtype
        (10, torch.uint8, torch.float32)
    """

    def __init__(
        self,
        data: Tensor | Dataset,
        transform: Transform | None = None,
        *,
        device: torch.device | str | None = None,
        num_workers: int = 0,
        name: str = "data",
    ) -> None:
        if isinstance(data, TensorDataset):
            data = data.tensors[0]
        if transform is not None and not callable(transform):
            raise VAEPriorsError(f"`transform` must be callable or None, got {type(transform).__name__}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise VAEPriorsError(f"`num_workers` must be an int >= 0, got {num_workers!r}")
        self.transform = transform
        self.num_workers = num_workers
        self.name = name
        self.pinned = device is not None
        if isinstance(data, Tensor):
            if data.dim() < 2:
                raise VAEPriorsError(
                    f"`{name}` must have shape [N, *input_shape] with at least one input dimension, got "
                    f"{tuple(data.shape)} (for scalar inputs use data[:, None])"
                )
            if data.is_complex():
                raise VAEPriorsError(f"`{name}` must be a real tensor, got dtype {data.dtype}")
            if data.device.type == "meta":
                raise VAEPriorsError(f"`{name}` is on the meta device: it holds no values")
            self.storage: Tensor | Dataset = data if device is None else data.to(device)
        elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            self.storage = data
        else:
            raise VAEPriorsError(
                f"`{name}` must be a tensor [N, *input_shape] or a Dataset of x or (x, y) items, "
                f"got {type(data).__name__}"
            )
        if len(self) == 0:
            raise VAEPriorsError(f"`{name}` must hold at least one exemplar, got none")

    # -- what is stored ----------------------------------------------------------------
    def __len__(self) -> int:
        return self.storage.shape[0] if isinstance(self.storage, Tensor) else len(self.storage)

    @property
    def is_tensor(self) -> bool:
        """Whether the storage is a tensor (random access without a DataLoader)."""
        return isinstance(self.storage, Tensor)

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The storage's dtype (``None`` for a Dataset)."""
        return self.storage.dtype if self.is_tensor else None

    @property
    def nbytes(self) -> int:
        """Bytes of a tensor storage (0 for a Dataset, which holds its own)."""
        return self.storage.numel() * self.storage.element_size() if self.is_tensor else 0

    def version(self) -> int:
        """Changes when a tensor storage is edited in place (its version counter)."""
        if not self.is_tensor:
            return 0
        try:
            return self.storage._version
        except RuntimeError:  # inference tensors carry no counter: they never change
            return -1

    def to_device_of(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Follows a module's ``_apply(fn)`` in device only (never in dtype), unless pinned."""
        if self.is_tensor and not self.pinned:
            target = fn(torch.empty(0, device=self.storage.device)).device
            if target != self.storage.device:
                self.storage = self.storage.to(target)

    # -- reading -----------------------------------------------------------------------
    def prepare(self, x: Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """Stored rows -> encoder inputs on ``device`` (moved first, then transformed)."""
        x = x.to(device, non_blocking=True)
        if self.transform is None:
            return default_transform(x, dtype)
        out = self.transform(x)
        if not isinstance(out, Tensor):
            raise VAEPriorsError(f"`transform` must return a tensor, got {type(out).__name__}")
        return out

    def _raw(self, index: Tensor) -> Tensor:
        if self.is_tensor:
            return self.storage[index.to(self.storage.device)]
        return _collate([self.storage[int(i)] for i in index.tolist()])

    def rows(self, index: Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """Encoder inputs of the exemplars ``index`` ``[n]``."""
        return self.prepare(self._raw(index), dtype, device)

    def chunks(
        self,
        chunk_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        index: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Encoder inputs of the exemplars ``index`` (all when ``None``), in order, at most
        ``chunk_size`` at a time."""
        n = len(self) if index is None else index.numel()
        if self.is_tensor or (index is not None and n <= chunk_size):
            for s in range(0, n, chunk_size):
                if index is None:
                    raw = self.storage[s : s + chunk_size]
                else:
                    raw = self._raw(index[s : s + chunk_size])
                yield self.prepare(raw, dtype, device)
            return
        ds = self.storage if index is None else Subset(self.storage, index.tolist())
        loader = DataLoader(
            ds, batch_size=chunk_size, shuffle=False, num_workers=self.num_workers, collate_fn=_collate,
            pin_memory=torch.device(device).type == "cuda",
        )
        for raw in loader:
            yield self.prepare(raw, dtype, device)

    def first(self, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """The encoder input of exemplar 0, ``[1, *input_shape]``."""
        return self.rows(torch.zeros(1, dtype=torch.long), dtype, device)

    # -- splitting ---------------------------------------------------------------------
    def subset(self, start: int, stop: int) -> "ExemplarSet":
        """The exemplars ``start:stop`` as a set of their own (a tensor storage is copied,
        so the rest of it can be freed)."""
        data = self.storage[start:stop].clone() if self.is_tensor else Subset(self.storage, range(start, stop))
        out = ExemplarSet.__new__(ExemplarSet)
        out.__dict__.update(self.__dict__, storage=data)
        return out

    def __repr__(self) -> str:
        kind = f"{self.storage.dtype} tensor" if self.is_tensor else type(self.storage).__name__
        return f"ExemplarSet(n={len(self)}, {kind})"


class IndexedDataset(Dataset):
    r"""Wraps a Dataset so that its items come with their index: ``(*item, index)``.

    Priors built on the training set leave each point out of its own prior in training mode,
    which needs each batch's dataset indices; wrapping the training set makes an ordinary
    :class:`~torch.utils.data.DataLoader` (any sampler, shuffling, ``DistributedSampler``)
    yield them, with no change to the dataset itself.

    Arguments:
        dataset: any map-style Dataset; its items may be ``x`` or tuples ``(x, y, ...)``.

    Example:
        >>> ds = IndexedDataset(torch.utils.data.TensorDataset(torch.rand(6, 3), torch.arange(6)))
        >>> x, y, index = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)))
        >>> bool((y == index).all())
        True
    """

    def __init__(self, dataset: Dataset) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise VAEPriorsError(f"`dataset` must be a map-style Dataset, got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        return (*item, i) if isinstance(item, (tuple, list)) else (item, i)
