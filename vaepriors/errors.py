r"""The one exception type of vaepriors, and the switch for argument validation."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["VAEPriorsError", "set_validation", "user_call", "validation_enabled"]


class VAEPriorsError(ValueError):
    r"""Raised for bad input anywhere in vaepriors.

    The message names the argument and says what was expected. It subclasses
    :class:`ValueError`, so code that already catches ``ValueError`` keeps working.
    """


def user_call(fn: Callable[[Any], Any], arg: Any, who: str, where: str, name: str = "x") -> Any:
    r"""``fn(arg)`` for a callable of the user's (encoder, decoder, ...): an exception it
    raises comes back as a :class:`VAEPriorsError` saying which call of ours made it and
    with what, chained to the original."""
    try:
        return fn(arg)
    except VAEPriorsError:
        raise
    except Exception as err:
        shape = f" of shape {tuple(arg.shape)} and dtype {arg.dtype}" if hasattr(arg, "shape") else ""
        raise VAEPriorsError(f"the {who} failed in {where} on {name}{shape}: {type(err).__name__}: {err}") from err


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
