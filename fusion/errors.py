"""The fusion stage's named exceptions: one base, under the project's `EmbedcacheError`.

The CLIs turn exactly these (and embedcache's own) into a one-line message and exit code 2;
anything else is a bug and is reported as one. Each class also derives from ValueError so that
code catching ValueError around a config keeps working.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from embedcache.errors import EmbedcacheError

T = TypeVar("T")


class FusionError(EmbedcacheError, ValueError):
    """Base class of every error the fusion stage raises on purpose; the message names file, key and value."""


class ConfigError(FusionError):
    """An option, a config file or a config value that cannot be used."""


class RunError(FusionError):
    """A run directory that is missing, unfinished or malformed."""


def checked_config(cls: Callable[..., T], what: str, **values: Any) -> T:
    """`cls(**values)` with the config's own ValueError (its __post_init__ checks) as a ConfigError.

    Only ValueError is converted: a TypeError (a wrong field name) is a bug, not a user value.
    """
    try:
        return cls(**values)
    except FusionError:
        raise
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from e
