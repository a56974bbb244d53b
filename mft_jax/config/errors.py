"""The error every user mistake in a config ends as, and the one-line choice check."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and says how to fix it."""


def choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{key} is {value!r}; choose one of {list(options)}")
