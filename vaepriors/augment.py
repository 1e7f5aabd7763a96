r"""Generative data augmentation with an Exemplar VAE: decoded exemplar-conditioned samples that
carry their exemplar's label, to mix into a classifier's batches."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from . import _checks
from .errors import VAEPriorsError
from .exemplar import ExemplarPrior, ToInput, decoded_input

__all__ = ["ExemplarAugmenter", "augment_batch"]

Decoder = Callable[[Tensor], Any]


def _decode(decoder: Decoder, z: Tensor, to_input: ToInput, input_shape: torch.Size) -> Tensor:
    x = decoded_input(decoder(z), to_input)
    if x.shape != (z.shape[0], *input_shape):
        raise VAEPriorsError(
            f"the decoded inputs have shape {tuple(x.shape)}, expected [n, *input_shape] = "
            f"{(z.shape[0], *input_shape)}; pass a `to_input` callable that reshapes them"
        )
    return x


def augment_batch(
    prior: ExemplarPrior,
    decoder: Decoder,
    x: Tensor,
    y: Tensor,
    *,
    n_per_exemplar: int = 1,
    to_input: ToInput = "mean",
) -> tuple[Tensor, Tensor]:
    r"""Exemplar-conditioned samples of the inputs ``x``, labelled with ``y``.

    For each input :math:`x_b` (used as an exemplar) it draws ``n_per_exemplar`` latents
    :math:`z \sim \mathcal N(\mu(x_b), \sigma^2 I)` (:meth:`ExemplarPrior.sample_around`),
    decodes them, and gives each decoded sample the label :math:`y_b`. No gradients.

    Arguments:
        prior: a bound :class:`~vaepriors.ExemplarPrior` (its encoder and :math:`\sigma^2`).
        decoder: ``z [n, d] ->`` a Distribution over x (batch + event shape
            ``[n, *input_shape]``, as for :class:`~vaepriors.ExemplarELBO`), or a tensor in
            input space.
        x: inputs ``[B, *input_shape]``, e.g. a classifier's batch.
        y: their labels ``[B, ...]`` (class indices, one-hot rows, ...).
        n_per_exemplar: samples per input.
        to_input: how the decoder's output becomes an input: ``"mean"`` (e.g. Bernoulli
            probabilities, grey levels), ``"sample"``, or a callable (see
            :func:`~vaepriors.decoded_input`).

    Returns:
        ``(x_aug, y_aug)``: ``[n_per_exemplar * B, *input_shape]`` and
        ``[n_per_exemplar * B, ...]``; row ``r`` comes from input ``r % B``.

    Example:
        >>> enc = torch.nn.Linear(4, 4)
        >>> prior = ExemplarPrior(torch.rand(10, 4)).bind(lambda x: enc(x).chunk(2, -1))
        >>> dec = lambda z: torch.distributions.Bernoulli(logits=z @ torch.ones(2, 4))
        >>> xa, ya = augment_batch(prior, dec, torch.rand(3, 4), torch.tensor([0, 1, 2]), n_per_exemplar=2)
        >>> xa.shape, ya.tolist()
        (torch.Size([6, 4]), [0, 1, 2, 0, 1, 2])

    References:
        Norouzi et al., "Exemplar VAE" (NeurIPS 2020), generative data augmentation experiments.
    """
    if not callable(decoder):
        raise VAEPriorsError(f"`decoder` must be callable, got {type(decoder).__name__}")
    if not callable(getattr(prior, "sample_around", None)):
        raise VAEPriorsError(
            f"`prior` must be an exemplar prior (with sample_around), got {type(prior).__name__}"
        )
    x = _checks.floating(x, "x")
    y = _checks.tensor(y, "y")
    if y.dim() < 1 or x.dim() < 1 or y.shape[0] != x.shape[0]:
        raise VAEPriorsError(f"`y` must hold one label per input: [B, ...] with B = {x.shape[0] if x.dim() else 0}, got {tuple(y.shape)}")
    n = _checks.positive_int(n_per_exemplar, "n_per_exemplar")
    with torch.no_grad():
        z = prior.sample_around(x, (n,))  # [n, B, d]
        xa = _decode(decoder, z.reshape(-1, z.shape[-1]), to_input, x.shape[1:])
    ya = y.expand(n, *y.shape).reshape(n * y.shape[0], *y.shape[1:])
    return xa, ya


class ExemplarAugmenter:
    r"""An iterable of augmented batches drawn from the prior's own (labelled) exemplar set.

    Each batch picks ``batch_size`` exemplars uniformly, draws one latent around each
    (:meth:`ExemplarPrior.sample_with_index`), decodes it, and labels it with its exemplar's
    label: ``(x_aug [batch_size, *input_shape], y_aug [batch_size, ...])``. It never stops
    unless ``n_batches`` is given. No gradients; the prior's ``generator`` drives the draws.

    Arguments:
        prior: a bound :class:`~vaepriors.ExemplarPrior`.
        decoder: as for :func:`augment_batch`.
        labels: the exemplars' labels ``[N, ...]``, aligned with ``prior.exemplars``.
        batch_size: samples per batch.
        n_batches: batches per iteration (``None``: endless).
        to_input: as for :func:`augment_batch`.

    Example:
        >>> enc = torch.nn.Linear(4, 4)
        >>> prior = ExemplarPrior(torch.rand(10, 4)).bind(lambda x: enc(x).chunk(2, -1))
        >>> dec = lambda z: torch.distributions.Bernoulli(logits=z @ torch.ones(2, 4))
        >>> aug = ExemplarAugmenter(prior, dec, torch.arange(10) % 2, batch_size=5, n_batches=3)
        >>> [xa.shape for xa, ya in aug]
        [torch.Size([5, 4]), torch.Size([5, 4]), torch.Size([5, 4])]

    References:
        Norouzi et al., "Exemplar VAE" (NeurIPS 2020), generative data augmentation experiments.
    """

    def __init__(
        self,
        prior: ExemplarPrior,
        decoder: Decoder,
        labels: Tensor,
        batch_size: int,
        *,
        n_batches: int | None = None,
        to_input: ToInput = "mean",
    ) -> None:
        if not isinstance(prior, ExemplarPrior):
            raise VAEPriorsError(f"`prior` must be an ExemplarPrior, got {type(prior).__name__}")
        if not callable(decoder):
            raise VAEPriorsError(f"`decoder` must be callable, got {type(decoder).__name__}")
        self.prior, self.decoder = prior, decoder
        self.labels = _checks.tensor(labels, "labels")
        self._check_labels()
        self.batch_size = _checks.positive_int(batch_size, "batch_size")
        self.n_batches = None if n_batches is None else _checks.positive_int(n_batches, "n_batches")
        self.to_input = to_input

    def _check_labels(self) -> None:
        n = self.prior.n_exemplars
        if self.labels.dim() < 1 or self.labels.shape[0] != n:
            raise VAEPriorsError(
                f"`labels` must hold one label per exemplar: [N, ...] with N = {n}, got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        if self.n_batches is None:
            raise TypeError("an endless ExemplarAugmenter has no length (give n_batches)")
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        count = 0
        while self.n_batches is None or count < self.n_batches:
            yield self.sample()
            count += 1

    def sample(self) -> tuple[Tensor, Tensor]:
        r"""One batch ``(x_aug, y_aug)``."""
        self._check_labels()  # the exemplar set may have been swapped
        with torch.no_grad():
            z, j = self.prior.sample_with_index((self.batch_size,))
            xa = _decode(self.decoder, z, self.to_input, self.prior.input_shape)
        return xa, self.labels[j.to(self.labels.device)]
