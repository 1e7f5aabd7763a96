"""The IDX reader, MNIST with the dynamic-binarisation protocol, and the built-in dataset."""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
from pathlib import Path

import pytest
import torch

from vaepriors import VAEPriorsError
from vaepriors import data as D

# -- IDX files written by the test itself -----------------------------------------------
_CODES = {torch.uint8: (0x08, "B"), torch.int8: (0x09, "b"), torch.int16: (0x0B, "h"),
          torch.int32: (0x0C, "i"), torch.float32: (0x0D, "f"), torch.float64: (0x0E, "d")}  # fmt: skip


def idx_bytes(t: torch.Tensor) -> bytes:
    """The IDX encoding of `t`, written independently of the reader with struct (big-endian)."""
    code, fmt = _CODES[t.dtype]
    header = bytes([0, 0, code, t.dim()]) + b"".join(struct.pack(">I", s) for s in t.shape)
    values = t.flatten().tolist()
    return header + struct.pack(f">{len(values)}{fmt}", *values)


def write_idx(path: Path, t: torch.Tensor, compress: bool) -> Path:
    raw = idx_bytes(t)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize(
    "t",
    [
        torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4),
        torch.tensor([7, 0, 255], dtype=torch.uint8),
        torch.tensor([[-5, 3], [1000, -32768]], dtype=torch.int16),
        torch.tensor([-(2**31), 2**31 - 1, 12345678], dtype=torch.int32),
        torch.tensor([[1.5, -2.25e-3], [3e30, 0.0]], dtype=torch.float32),
        torch.tensor([math.pi, -1e-300], dtype=torch.float64),
    ],
    ids=["u8-3d", "u8-1d", "i16", "i32", "f32", "f64"],
)
def test_read_idx_round_trip(tmp_path, t, compress):
    # The name says nothing about compression: the reader looks at the content.
    path = write_idx(tmp_path / "file.bin", t, compress)
    got = D.read_idx(path)
    assert got.dtype == t.dtype and got.shape == t.shape
    assert torch.equal(got, t)


def test_read_idx_corrupt_files(tmp_path):
    good = idx_bytes(torch.arange(12, dtype=torch.uint8).reshape(3, 4))
    cases = {
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "magic": b"\x01\x00" + good[2:],
        "type": good[:2] + b"\x42" + good[3:],
        "header": good[:6],
        "empty": b"",
        "gzip": gzip.compress(good)[:20],
    }
    for name, raw in cases.items():
        path = tmp_path / f"{name}.idx"
        path.write_bytes(raw)
        with pytest.raises(VAEPriorsError, match=name + ".idx"):
            D.read_idx(path)
    with pytest.raises(VAEPriorsError, match="cannot read"):
        D.read_idx(tmp_path / "missing.idx")


# -- MNIST: errors on a missing or corrupt folder ----------------------------------------
def test_mnist_missing_folder_names_path_and_env(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(VAEPriorsError, match="nowhere") as e:
        D.load_mnist(missing)
    assert D.MNIST_ENV in str(e.value)
    monkeypatch.setenv(D.MNIST_ENV, str(missing))
    with pytest.raises(VAEPriorsError, match=r"\$VAEPRIORS_MNIST"):
        D.load_dataset("mnist")


def test_mnist_missing_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", torch.zeros(2, 28, 28, dtype=torch.uint8), True)
    with pytest.raises(VAEPriorsError, match="train-labels-idx1-ubyte") as e:
        D.load_mnist(tmp_path)
    assert str(tmp_path) in str(e.value) and D.MNIST_ENV in str(e.value)


def _fake_mnist(root: Path, n_train: int = 6, n_test: int = 4) -> None:
    g = torch.Generator().manual_seed(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", torch.randint(256, (n, 28, 28), generator=g, dtype=torch.uint8), True)
        write_idx(root / f"{stem}-labels-idx1-ubyte", torch.randint(10, (n,), generator=g, dtype=torch.uint8), False)


def test_mnist_wrong_content(tmp_path):
    _fake_mnist(tmp_path)  # valid IDX files, but 6 images instead of 60000
    with pytest.raises(VAEPriorsError, match="unexpected content"):
        D.load_mnist(tmp_path)


def test_mnist_checksum_mismatch(tmp_path):
    _fake_mnist(tmp_path)
    good = hashlib.md5((tmp_path / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    (tmp_path / "MD5SUMS").write_text(f"{good}  train-images-idx3-ubyte.gz\n{'0' * 32}  train-labels-idx1-ubyte\n")
    with pytest.raises(VAEPriorsError, match="train-labels-idx1-ubyte.*checksum"):
        D.load_mnist(tmp_path)


# -- MNIST: the real files ----------------------------------------------------------------
def _real_root() -> Path:
    return D.mnist_root()[0]


needs_mnist = pytest.mark.skipif(
    not (_real_root() / "train-images-idx3-ubyte.gz").is_file() and not (_real_root() / "train-images-idx3-ubyte").is_file(),
    reason=f"MNIST not found (set {D.MNIST_ENV})",
)


@pytest.fixture(scope="module")
def mnist():
    return D.load_mnist()


@pytest.fixture(scope="module")
def mnist_raw():
    root = _real_root()
    find = lambda stem: next(p for p in (root / (stem + ".gz"), root / stem) if p.is_file())  # noqa: E731
    return {k: D.read_idx(find(v)) for k, v in D._MNIST_FILES.items()}


@needs_mnist
def test_mnist_protocol(mnist, mnist_raw):
    s = mnist
    assert (len(s.train), len(s.valid), len(s.test)) == (50000, 10000, 10000)
    assert s.input_shape == (1, 28, 28) and s.train.dtype == torch.float32
    # Training images are grey levels: the raw bytes / 255, first 50000 of the file.
    raw = mnist_raw["train_images"]
    assert torch.equal(s.train[:, 0], raw[:50000].double().div(255).float())
    assert s.exemplars is s.train
    assert bool(((s.train > 0) & (s.train < 1)).any())
    assert torch.equal(s.train_labels, mnist_raw["train_labels"][:50000].long())
    # Validation = the last 10000 training images, binarised: ink only where the grey level is > 0.
    assert torch.equal(s.valid_labels, mnist_raw["train_labels"][50000:].long())
    for split, grey in ((s.valid, raw[50000:]), (s.test, mnist_raw["test_images"])):
        assert bool(((split == 0) | (split == 1)).all())
        assert not bool(split[:, 0][grey == 0].any()) and bool(split[:, 0][grey == 255].all())
        # Bernoulli(grey / 255): the ink mass matches within a few standard deviations.
        p = grey.double() / 255
        sd = (p * (1 - p)).sum().sqrt()
        assert abs(split.double().sum() - p.sum()) < 6 * sd


@needs_mnist
def test_mnist_fixed_binarisation_and_split_seed(mnist):
    other = D.load_mnist(binarize_seed=1, split_seed=3)
    assert not torch.equal(other.test, mnist.test)
    again = D.load_mnist(split_seed=3, binarize_seed=1)  # the same seeds give the same data
    for a, b in ((again.train, other.train), (again.valid, other.valid), (again.test, other.test)):
        assert torch.equal(a, b)
    # A seeded random split is a permutation of the same 60000 images.
    counts = lambda s: torch.bincount(torch.cat([s.train_labels, s.valid_labels]), minlength=10)  # noqa: E731
    assert torch.equal(counts(other), counts(mnist))
    assert not torch.equal(other.valid_labels, mnist.valid_labels)


# -- binarisation and batches -------------------------------------------------------------
def test_binarize_values_and_mean():
    p = torch.tensor([0.0, 1.0, 0.3]).repeat(20000)
    b = D.binarize(p, torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) <= {0.0, 1.0} and b.dtype == p.dtype
    assert bool((b[0::3] == 0).all()) and bool((b[1::3] == 1).all())
    assert abs(float(b[2::3].mean()) - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 20000)
    assert D.binarize(torch.full((3,), 0.5, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(VAEPriorsError, match="`x`"):
        D.binarize(torch.ones(3, dtype=torch.long))


def test_dynamic_binarisation_is_fresh_per_batch_and_seeded():
    grey = torch.full((40, 1, 4, 4), 0.5)
    grey[0] = 0.0
    grey[1] = 1.0
    labels = torch.arange(40)
    loader = D.BatchLoader(grey, labels, batch_size=16, shuffle=True, binarize=True, seed=3)
    assert len(loader) == 3

    def one_pass():
        seen = torch.empty_like(grey)
        order = []
        for x, y, index in loader:
            assert torch.equal(y, labels[index])
            seen[index] = x
            order.append(index)
        order = torch.cat(order)
        assert torch.equal(order.sort().values, torch.arange(40))  # every row exactly once
        return seen, order

    a, order_a = one_pass()
    b, order_b = one_pass()
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert not bool(a[0].any()) and bool(a[1].all())  # 0 and 1 are kept
    assert not torch.equal(a, b) and not torch.equal(order_a, order_b)  # fresh bits, fresh order
    # The same seed replays the same batches; a saved state resumes them.
    replay = D.BatchLoader(grey, labels, batch_size=16, shuffle=True, binarize=True, seed=3)
    assert torch.equal(next(iter(replay))[0], next(iter(D.BatchLoader(grey, labels, batch_size=16, shuffle=True, binarize=True, seed=3)))[0])
    state = loader.state_dict()
    first = [x for x, _, _ in loader]
    loader.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(first, (x for x, _, _ in loader)))


def test_batch_loader_options_and_errors():
    data = torch.rand(10, 3)
    assert [len(x) for x, _, _ in D.BatchLoader(data, batch_size=4, drop_last=True)] == [4, 4]
    x, y, index = next(iter(D.BatchLoader(data, batch_size=4)))
    assert y is None and torch.equal(index, torch.arange(4)) and torch.equal(x, data[:4])
    with pytest.raises(VAEPriorsError, match="`labels`"):
        D.BatchLoader(data, torch.zeros(9))
    with pytest.raises(VAEPriorsError, match="`batch_size`"):
        D.BatchLoader(data, batch_size=0)
    with pytest.raises(VAEPriorsError, match="`data`"):
        D.BatchLoader(torch.zeros(10, dtype=torch.long))


# -- the built-in dataset -----------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin():
    return D.load_builtin(300, 60, 60)


def test_builtin_shapes_and_values(builtin):
    s = builtin
    assert s.name == "builtin" and s.input_shape == (1, 28, 28)
    assert (len(s.train), len(s.valid), len(s.test)) == (300, 60, 60)
    assert s.train.dtype == torch.float32 and float(s.train.min()) >= 0 and float(s.train.max()) <= 1
    assert len(s.train.unique()) > 2  # grey levels (anti-aliased edges)
    assert bool((s.train.flatten(1).amax(1) == 1).all())  # every glyph has ink
    assert bool((s.train.flatten(1).mean(1) < 0.5).all())  # ... on a dark background
    for split in (s.valid, s.test):
        assert set(split.unique().tolist()) == {0.0, 1.0}
    labels = torch.cat([s.train_labels, s.valid_labels, s.test_labels])
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    # The class shapes differ: a "1" has far less ink than an "8".
    ink = lambda k: float(s.train[s.train_labels == k].mean())  # noqa: E731
    assert ink(1) < 0.6 * ink(8)


def test_builtin_deterministic(builtin):
    again = D.load_builtin(300, 60, 60)
    for a, b in zip((builtin.train, builtin.valid, builtin.test, builtin.train_labels), (again.train, again.valid, again.test, again.train_labels)):
        assert torch.equal(a, b)
    other = D.load_builtin(300, 60, 60, seed=1)
    assert not torch.equal(other.train, builtin.train)
    # A larger set begins with the same labels (one generator, drawn in order).
    assert torch.equal(D.load_builtin(600, 60, 60).train_labels[:100], D.load_builtin(600, 60, 60).train_labels[:100])
    small = D.load_builtin(20, 10, 10, size=14)
    assert small.input_shape == (1, 14, 14)


def test_builtin_errors():
    with pytest.raises(VAEPriorsError, match="`n_train`"):
        D.load_builtin(0)
    with pytest.raises(VAEPriorsError, match="`size`"):
        D.load_builtin(10, 10, 10, size=4)


def test_splits_subset_to_and_loaders(builtin):
    sub = builtin.subset(100, 20)
    assert (len(sub.train), len(sub.valid), len(sub.test)) == (100, 20, 20)
    assert torch.equal(sub.train, builtin.train[:100]) and torch.equal(sub.test_labels, builtin.test_labels[:20])
    assert torch.equal(builtin.subset().train, builtin.train)
    d = builtin.to(dtype=torch.float64)
    assert d.train.dtype == torch.float64 and d.train_labels.dtype == torch.int64
    batches = list(builtin.eval_loader("valid", 25))
    assert torch.equal(torch.cat([x for x, _, _ in batches]), builtin.valid)  # fixed bits, in order
    x, _, index = next(iter(builtin.train_loader(50, seed=0)))
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert not bool(x[builtin.train[index] == 0].any())
    with pytest.raises(VAEPriorsError, match="`split`"):
        builtin.eval_loader("train")


def test_load_dataset_dispatch_and_errors():
    assert D.load_dataset("builtin", n_train=10, n_valid=5, n_test=5).train.shape == (10, 1, 28, 28)
    with pytest.raises(VAEPriorsError, match="`name`"):
        D.load_dataset("cifar")
    with pytest.raises(VAEPriorsError, match="`root`"):
        D.load_dataset("builtin", root="/tmp")
