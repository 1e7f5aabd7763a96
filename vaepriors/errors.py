r"""The one exception type of vaepriors, and the switch for argument validation."""

from __future__ import annotations

__all__ = ["VAEPriorsError", "set_validation", "validation_enabled"]


class VAEPriorsError(ValueError):
    r"""Raised for bad input anywhere in vaepriors.

    The message names the argument and says what was expected. It subclasses
    :class:`ValueError`, so code that already catches ``ValueError`` keeps working.
    """


_VALIDATE = True


def set_validation(enabled: bool) -> None:
    r"""Turns the checks of tensor *values* (finiteness, index ranges) on or off.

    Shape and type checks always run. Value checks read tensors back to the host, which
    synchronises a GPU; switch them off in a tuned training loop once it is known to work,
    as with :meth:`torch.distributions.Distribution.set_default_validate_args`.

    Example:
        >>> import vaepriors
        >>> vaepriors.set_validation(False)
        >>> vaepriors.set_validation(True)
    """
    global _VALIDATE
    _VALIDATE = bool(enabled)


def validation_enabled() -> bool:
    r"""Whether value checks are on (see :func:`set_validation`)."""
    return _VALIDATE
