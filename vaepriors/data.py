r"""Datasets for the training command: MNIST from its IDX files, and a small built-in one.

Both follow the *dynamic binarisation* protocol of the VampPrior and Exemplar VAE papers:
the training images are kept in grey levels and binarised afresh for every minibatch
(:class:`BatchLoader` with ``binarize=True``), while validation and test images are
binarised once, with a fixed seed, so every model is scored on the same bits. The
grey-level training images double as the exemplars of exemplar-based priors
(:attr:`Splits.exemplars`).

Example:
    >>> splits = load_dataset("builtin")
    >>> splits.input_shape, len(splits.train), len(splits.valid), len(splits.test)
    ((1, 28, 28), 4000, 1000, 1000)
    >>> x, y, index = next(iter(splits.train_loader(batch_size=100)))
    >>> x.shape, bool(((x == 0) | (x == 1)).all())
    (torch.Size([100, 1, 28, 28]), True)
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import sys
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from . import _checks
from .errors import VAEPriorsError

__all__ = [
    "BatchLoader",
    "DATASETS",
    "CACHE_ENV",
    "MNIST_ENV",
    "Splits",
    "binarize",
    "default_mnist_dir",
    "load_builtin",
    "load_dataset",
    "load_mnist",
    "mnist_root",
    "read_idx",
]

MNIST_ENV = "VAEPRIORS_MNIST"
"""Environment variable naming the folder with the MNIST IDX files."""

CACHE_ENV = "VAEPRIORS_CACHE_DIR"
"""Environment variable naming vaepriors' cache folder (default ``~/.cache/vaepriors``)."""

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes -> (torch dtype, bytes per element); data is stored big-endian.
_IDX_TYPES = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}

# Seed of the one-off binarisation of validation and test images (the value the
# VampPrior and Exemplar VAE code use, so the fixed bits follow the same convention).
BINARIZE_SEED = 777


# -- IDX files -------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VAEPriorsError(f"cannot read IDX file '{path}': {e}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise VAEPriorsError(f"IDX file '{path}' is a corrupt gzip file: {e}") from None
    return raw


def read_idx(path: str | os.PathLike) -> Tensor:
    r"""Reads one IDX file (the format of the MNIST files), gzip-compressed or not.

    The header is two zero bytes, a type code, the number of dimensions and that many
    big-endian 32-bit sizes; the data follows, big-endian, and must fill the file exactly.

    Arguments:
        path: the file; compression is detected from its content, not its name.

    Returns:
        A tensor of the stored type (``uint8`` for MNIST) and the stored shape.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.idx"
        >>> _ = p.write_bytes(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6]))
        >>> read_idx(p)
        tensor([[1, 2, 3],
                [4, 5, 6]], dtype=torch.uint8)

    References:
        LeCun et al., "The MNIST database of handwritten digits" (file format section).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise VAEPriorsError(f"'{path}' is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'}")
    dtype, size = _IDX_TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise VAEPriorsError(f"IDX file '{path}' has a truncated header ({ndim} dimensions)")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(shape) * size
    if len(raw) != expected:
        raise VAEPriorsError(
            f"IDX file '{path}' is corrupt: header says shape {tuple(shape)} ({expected} bytes), "
            f"the file has {len(raw)} bytes"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8) if expected > header else torch.zeros(0, dtype=torch.uint8)
    if size > 1:
        data = data.view(-1, size)
        if sys.byteorder == "little":
            data = data.flip(-1)
        data = data.contiguous().view(dtype)
    else:
        data = data.view(dtype)
    return data.reshape(shape)


# -- binarisation and batches ----------------------------------------------------------
def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""Draws binary images with pixel probabilities ``x`` (grey levels in [0, 1]).

    ``out = 1[u < x]`` with ``u ~ U[0, 1)``, so 0 stays 0 and 1 stays 1. Each call draws
    fresh randomness: call it per minibatch for dynamic binarisation.

    Arguments:
        x: grey levels, any shape, floating.
        generator: an optional :class:`torch.Generator` on ``x``'s device.

    Returns:
        A tensor of ``x``'s shape and dtype with values in {0, 1}.

    Example:
        >>> binarize(torch.tensor([0.0, 1.0]))
        tensor([0., 1.])

    References:
        Salakhutdinov & Murray, "On the quantitative analysis of deep belief networks" (2008).
    """
    x = _checks.floating(x, "x")
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (u < x).to(x.dtype)


class BatchLoader:
    r"""Minibatches ``(x, y, index)`` of in-memory data, optionally binarised afresh.

    A light replacement for a :class:`~torch.utils.data.DataLoader` over tensors that are
    already on the training device: no per-item Python work. ``index`` holds the rows'
    positions in ``data`` (the training-set indices that leave-one-out priors need).

    Arguments:
        data: ``[N, *shape]`` floating tensor (grey levels in [0, 1] if ``binarize``).
        labels: ``[N]`` or ``None`` (then ``y`` is ``None``).
        batch_size: rows per batch.
        shuffle: a new random order every pass.
        binarize: binarise each batch with fresh randomness (dynamic binarisation).
        drop_last: drop a last, smaller batch.
        seed: seeds the loader's own generator (order and binarisation), on ``data``'s
            device; ``None`` draws a seed from torch's global generator.

    Example:
        >>> loader = BatchLoader(torch.rand(10, 3), batch_size=4, shuffle=True, binarize=True, seed=0)
        >>> [tuple(x.shape) for x, _, _ in loader]
        [(4, 3), (4, 3), (2, 3)]
    """

    def __init__(
        self,
        data: Tensor,
        labels: Tensor | None = None,
        *,
        batch_size: int = 100,
        shuffle: bool = False,
        binarize: bool = False,
        drop_last: bool = False,
        seed: int | None = None,
    ) -> None:
        self.data = _checks.floating(data, "data")
        if self.data.dim() < 1:
            raise VAEPriorsError("`data` must have shape [N, ...], got a scalar")
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape[:1] != data.shape[:1]):
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise VAEPriorsError(f"`labels` must have shape [N] = [{len(data)}], got {got}")
        self.labels = labels
        self.batch_size = _checks.positive_int(batch_size, "batch_size")
        self.shuffle, self.binarize, self.drop_last = bool(shuffle), bool(binarize), bool(drop_last)
        self.generator = torch.Generator(device=data.device)
        self.generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else int(seed))

    def __len__(self) -> int:
        n, b = len(self.data), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
        n, dev = len(self.data), self.data.device
        order = torch.randperm(n, generator=self.generator, device=dev) if self.shuffle else torch.arange(n, device=dev)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.data[index]
            if self.binarize:
                x = binarize(x, self.generator)
            yield x, None if self.labels is None else self.labels[index], index

    def state_dict(self) -> dict:
        """The generator's state, so a resumed run draws the same batches."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())  # a checkpoint loaded onto a GPU moves it


# -- the splits ------------------------------------------------------------------------
@dataclass(frozen=True)
class Splits:
    r"""A dataset split for density estimation.

    Attributes:
        name: the dataset's name.
        train: grey-level training images ``[N, C, H, W]`` in [0, 1]; binarise them per
            batch (:meth:`train_loader` does).
        train_labels: ``[N]`` int64.
        valid: validation images ``[N_v, C, H, W]``, binarised once with a fixed seed.
        valid_labels: ``[N_v]``.
        test: test images ``[N_t, C, H, W]``, binarised once with a fixed seed.
        test_labels: ``[N_t]``.
        binarize_seed: the seed of that fixed binarisation.

    Example:
        >>> s = load_builtin(100, 20, 20)
        >>> s.subset(50, 10)
        Splits('builtin', train=(50, 1, 28, 28), valid=(10, 1, 28, 28), test=(10, 1, 28, 28), dtype=torch.float32, device=cpu)
    """

    name: str
    train: Tensor
    train_labels: Tensor
    valid: Tensor
    valid_labels: Tensor
    test: Tensor
    test_labels: Tensor
    binarize_seed: int = BINARIZE_SEED

    def __repr__(self) -> str:
        return (
            f"Splits({self.name!r}, train={tuple(self.train.shape)}, valid={tuple(self.valid.shape)}, "
            f"test={tuple(self.test.shape)}, dtype={self.train.dtype}, device={self.train.device})"
        )

    @property
    def exemplars(self) -> Tensor:
        """The grey-level training images ``[N, C, H, W]``: the exemplars of exemplar-based
        priors (row ``n`` is training index ``n``, the ``index`` the loader yields)."""
        return self.train

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image, e.g. ``(1, 28, 28)``."""
        return tuple(self.train.shape[1:])

    def subset(self, n_train: int | None = None, n_eval: int | None = None) -> "Splits":
        """The first ``n_train`` training and first ``n_eval`` validation and test images
        (``None``: all), for quick runs."""
        t = slice(None) if n_train is None else slice(_checks.positive_int(n_train, "n_train"))
        e = slice(None) if n_eval is None else slice(_checks.positive_int(n_eval, "n_eval"))
        return replace(
            self,
            train=self.train[t], train_labels=self.train_labels[t],
            valid=self.valid[e], valid_labels=self.valid_labels[e],
            test=self.test[e], test_labels=self.test_labels[e],
        )  # fmt: skip

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Splits":
        """Moves the images (and labels, without changing their dtype) to ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                moved[f.name] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return replace(self, **moved)

    def train_loader(self, batch_size: int = 100, *, seed: int | None = None, binarize: bool = True) -> BatchLoader:
        """Shuffled training batches ``(x, y, index)``, binarised afresh each time."""
        return BatchLoader(self.train, self.train_labels, batch_size=batch_size, shuffle=True, binarize=binarize, seed=seed)

    def eval_loader(self, split: str, batch_size: int = 1000) -> BatchLoader:
        """Batches of the fixed ``"valid"`` or ``"test"`` images, in order."""
        if split not in ("valid", "test"):
            raise VAEPriorsError(f"`split` must be 'valid' or 'test', got {split!r}")
        return BatchLoader(getattr(self, split), getattr(self, f"{split}_labels"), batch_size=batch_size, seed=0)


def _fixed_binarize(valid: Tensor, test: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return binarize(valid, g), binarize(test, g)


# -- MNIST -----------------------------------------------------------------------------
def default_mnist_dir() -> Path:
    r"""Where MNIST is looked for when neither a folder nor ``$VAEPRIORS_MNIST`` is given:
    ``mnist`` in vaepriors' cache folder, ``$VAEPRIORS_CACHE_DIR``, else ``~/.cache/vaepriors``
    (the folder the KeOps check caches its verdicts in). It does not depend on the working
    directory.

    Example:
        >>> default_mnist_dir().name
        'mnist'
    """
    cache = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vaepriors")
    return Path(cache) / "mnist"


def mnist_root(root: str | os.PathLike | None = None, *, root_name: str = "root") -> tuple[Path, str]:
    r"""Where to look for MNIST: ``root`` if given, else ``$VAEPRIORS_MNIST``, else
    :func:`default_mnist_dir`. Returns ``(path, where it came from)``; ``root_name`` is how
    the caller calls ``root`` (messages name it).

    Example:
        >>> mnist_root("/data/mnist")
        (PosixPath('/data/mnist'), '`root`')
    """
    if root is not None:
        return Path(root).expanduser(), f"`{root_name}`"
    env = os.environ.get(MNIST_ENV)
    if env:
        return Path(env).expanduser(), f"${MNIST_ENV}"
    return default_mnist_dir(), f"the default folder (`{root_name}` not given, ${MNIST_ENV} not set)"


def _hint(root_name: str) -> str:
    return (
        f"Pass the folder with the four IDX files (train-images-idx3-ubyte.gz, ...) as `{root_name}`, set "
        f"${MNIST_ENV} to it, or put the files in '{default_mnist_dir()}'."
    )


def _find(root: Path, stem: str, source: str, root_name: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise VAEPriorsError(f"MNIST file '{stem}[.gz]' not found in '{root}' (folder from {source}). {_hint(root_name)}")


def _check_md5(root: Path, path: Path) -> None:
    # An MD5SUMS file next to the data, where there is one, catches silently flipped bytes.
    sums = root / "MD5SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == path.name:
            if hashlib.md5(path.read_bytes()).hexdigest() != parts[0].lower():
                raise VAEPriorsError(f"MNIST file '{path}' does not match its checksum in '{sums}': the file is corrupt")
            return


def load_mnist(
    root: str | os.PathLike | None = None,
    *,
    n_valid: int = 10000,
    split_seed: int | None = None,
    binarize_seed: int = BINARIZE_SEED,
    root_name: str = "root",
) -> Splits:
    r"""MNIST with the dynamic-binarisation protocol of the VampPrior and Exemplar VAE papers.

    The 60000 training images are split into 50000 for training and 10000 for validation:
    by default the *first* 50000 and the *last* 10000, as in the VampPrior protocol (no
    randomness); pass ``split_seed`` for a random split drawn with that seed instead.
    Validation and the 10000 test images are binarised once with ``binarize_seed``
    (validation first, then test, from one generator); training images stay grey-level.

    Arguments:
        root: folder with ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``; default
            ``$VAEPRIORS_MNIST``, else :func:`default_mnist_dir`. An ``MD5SUMS`` file there,
            if any, is checked.
        n_valid: validation images taken from the training file.
        split_seed: ``None`` for the fixed first/last split, or a seed for a random one.
        binarize_seed: seed of the fixed binarisation of validation and test images.
        root_name: how the caller calls ``root``, for messages (the training command:
            ``data_dir``).

    Returns:
        :class:`Splits` with images ``[N, 1, 28, 28]`` float32.

    Example:
        >>> splits = load_mnist()  # doctest: +SKIP
        >>> len(splits.train), len(splits.valid), len(splits.test)  # doctest: +SKIP
        (50000, 10000, 10000)

    References:
        Tomczak & Welling, "VAE with a VampPrior" (2018); Norouzi et al., "Exemplar VAE" (2020).
    """
    path, source = mnist_root(root, root_name=root_name)
    if not path.is_dir():
        raise VAEPriorsError(f"MNIST folder '{path}' (from {source}) does not exist. {_hint(root_name)}")
    arrays = {}
    for key, stem in _MNIST_FILES.items():
        f = _find(path, stem, source, root_name)
        _check_md5(path, f)
        arrays[key] = read_idx(f)
    for split, n in (("train", 60000), ("test", 10000)):
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if img.dtype != torch.uint8 or img.shape != (n, 28, 28) or lab.shape != (n,) or int(lab.max()) > 9:
            raise VAEPriorsError(
                f"MNIST files in '{path}' have unexpected content: {split} images {tuple(img.shape)} {img.dtype}, "
                f"labels {tuple(lab.shape)}; expected ({n}, 28, 28) uint8 and ({n},) labels 0-9"
            )
    if not (isinstance(n_valid, int) and 0 < n_valid < 60000):
        raise VAEPriorsError(f"`n_valid` must be an int in [1, 59999], got {n_valid!r}")

    images = arrays["train_images"].float().div_(255).unsqueeze(1)
    labels = arrays["train_labels"].long()
    if split_seed is not None:
        perm = torch.randperm(60000, generator=torch.Generator().manual_seed(int(split_seed)))
        images, labels = images[perm], labels[perm]
    n_train = 60000 - n_valid
    test = arrays["test_images"].float().div_(255).unsqueeze(1)
    valid, test = _fixed_binarize(images[n_train:], test, binarize_seed)
    return Splits(
        "mnist", images[:n_train].contiguous(), labels[:n_train].contiguous(),
        valid, labels[n_train:].contiguous(), test, arrays["test_labels"].long(), binarize_seed,
    )  # fmt: skip


# -- the built-in dataset --------------------------------------------------------------
# Seven-segment glyphs: vertices of a 1 x 2 box (x right, y down), its seven strokes, and
# which strokes light up for each digit 0-9.
_VERTICES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0], [1.0, 2.0]])
_STROKES = torch.tensor([[0, 1], [1, 3], [3, 5], [4, 5], [2, 4], [0, 2], [2, 3]])  # a b c d e f g
_DIGITS = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 0],  # 0
        [0, 1, 1, 0, 0, 0, 0],  # 1
        [1, 1, 0, 1, 1, 0, 1],  # 2
        [1, 1, 1, 1, 0, 0, 1],  # 3
        [0, 1, 1, 0, 0, 1, 1],  # 4
        [1, 0, 1, 1, 0, 1, 1],  # 5
        [1, 0, 1, 1, 1, 1, 1],  # 6
        [1, 1, 1, 0, 0, 0, 0],  # 7
        [1, 1, 1, 1, 1, 1, 1],  # 8
        [1, 1, 1, 1, 0, 1, 1],  # 9
    ],
    dtype=torch.bool,
)


def _render_glyphs(labels: Tensor, size: int, g: torch.Generator) -> Tensor:
    """Draws one jittered, slanted, rotated seven-segment digit per label; [n, size, size]."""
    n = len(labels)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    # Per-vertex jitter, then centre the 1 x 2 box on the origin.
    v = _VERTICES + 0.12 * (2 * u(n, 6, 2) - 1) - torch.tensor([0.5, 1.0])
    height = size * (0.50 + 0.18 * u(n))  # glyph height in pixels
    width = height * (0.35 + 0.25 * u(n))
    slant = 0.35 * (2 * u(n) - 1)
    angle = 0.25 * (2 * u(n) - 1)
    shift = size * 0.08 * (2 * u(n, 2) - 1)
    thick = size * (0.035 + 0.045 * u(n))  # stroke half-width in pixels
    x = v[..., 0] * width[:, None] + slant[:, None] * v[..., 1] * height[:, None] / 2
    y = v[..., 1] * height[:, None] / 2
    c, s = angle.cos()[:, None], angle.sin()[:, None]
    pts = torch.stack([c * x - s * y, s * x + c * y], -1) + shift[:, None] + size / 2  # [n, 6, 2]

    a, b = pts[:, _STROKES[:, 0]], pts[:, _STROKES[:, 1]]  # [n, 7, 2] stroke ends
    c = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    px, py = c[None, None, None, :], c[None, None, :, None]  # broadcast to [n, 7, size, size]
    ax, ay = a[..., 0, None, None], a[..., 1, None, None]
    dx, dy = (b - a)[..., 0, None, None], (b - a)[..., 1, None, None]
    # Squared distance of each pixel to each stroke (a segment); the sqrt comes after the min.
    t = (((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp_(0, 1)
    d2 = (px - ax - t * dx).square_() + (py - ay - t * dy).square_()
    d2 = d2.masked_fill_(~_DIGITS[labels][:, :, None, None], math.inf)
    dist = d2.amin(1).sqrt_().reshape(n, -1)  # [n, P]
    # Anti-aliased edge: full ink inside the stroke, a one-pixel linear ramp outside.
    ink = (thick[:, None] + 0.5 - dist).clamp(0, 1)
    return ink.reshape(n, size, size)


def load_builtin(
    n_train: int = 4000,
    n_valid: int = 1000,
    n_test: int = 1000,
    *,
    size: int = 28,
    seed: int = 0,
    binarize_seed: int = BINARIZE_SEED,
) -> Splits:
    r"""A small procedurally generated digit dataset that needs no download.

    Seven-segment digits 0-9, each with random stroke-end jitter, width, height, slant,
    rotation, position and stroke thickness, rendered with anti-aliased edges into
    ``size x size`` grey-level images, so that dynamic binarisation has something to do.
    Deterministic given ``seed``; the default 6000 images take well under a second. The
    splits follow :func:`load_mnist`: grey-level training images, validation and test
    binarised once with ``binarize_seed``.

    Arguments:
        n_train, n_valid, n_test: split sizes (labels are drawn uniformly from 0-9).
        size: image side in pixels.
        seed: seed of the generator.
        binarize_seed: seed of the fixed binarisation of validation and test.

    Returns:
        :class:`Splits` named ``"builtin"`` with images ``[N, 1, size, size]`` float32.

    Example:
        >>> s = load_builtin(100, 20, 20, size=14)
        >>> s.train.shape, s.test_labels.shape
        (torch.Size([100, 1, 14, 14]), torch.Size([20]))
    """
    sizes = [_checks.positive_int(k, name) for k, name in ((n_train, "n_train"), (n_valid, "n_valid"), (n_test, "n_test"))]
    size = _checks.positive_int(size, "size")
    if size < 8:
        raise VAEPriorsError(f"`size` must be at least 8 pixels, got {size}")
    g = torch.Generator().manual_seed(int(seed))
    total = sum(sizes)
    labels = torch.randint(10, (total,), generator=g)
    chunks = [_render_glyphs(labels[i : i + 1000], size, g) for i in range(0, total, 1000)]
    images = torch.cat(chunks).unsqueeze(1)
    a, b = sizes[0], sizes[0] + sizes[1]
    valid, test = _fixed_binarize(images[a:b], images[b:], binarize_seed)
    return Splits("builtin", images[:a], labels[:a], valid, labels[a:b], test, labels[b:], binarize_seed)


DATASETS = {"builtin": load_builtin, "mnist": load_mnist}
"""The datasets :func:`load_dataset` knows, by name."""


def load_dataset(name: str = "builtin", root: str | os.PathLike | None = None, **kwargs) -> Splits:
    r"""Loads a dataset by name: ``"builtin"`` (no download) or ``"mnist"``.

    Arguments:
        name: a key of :data:`DATASETS`.
        root: the MNIST folder (see :func:`load_mnist`); must be ``None`` for ``"builtin"``.
        kwargs: passed on to :func:`load_builtin` / :func:`load_mnist` (``root_name``, how the
            caller calls ``root`` in messages, is accepted for both).

    Returns:
        :class:`Splits`.

    Example:
        >>> load_dataset("builtin", n_train=50, n_valid=10, n_test=10).train.shape
        torch.Size([50, 1, 28, 28])
    """
    if name not in DATASETS:
        raise VAEPriorsError(f"`name` must be one of {sorted(DATASETS)}, got {name!r}")
    if name == "mnist":
        return load_mnist(root, **kwargs)
    if root is not None:
        raise VAEPriorsError(f"`{kwargs.get('root_name', 'root')}` is only used by dataset 'mnist'; the built-in dataset needs no files")
    kwargs.pop("root_name", None)
    return DATASETS[name](**kwargs)
