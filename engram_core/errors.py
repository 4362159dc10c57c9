"""Errors a user can fix. The CLI prints each as one line and exits with status 2.

A `RecipeError` carries the file, the dotted key path and what was expected, so
that a problem deep inside a plugin's factory still points at the recipe line the
user must change. Components raise `ConfigError` (from validators or factories);
the engine adds the file and the table the config came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EngramError(Exception):
    """Base class of every error that the CLI reports as one line, exit 2."""

    exit_code = 2


class ConfigError(EngramError, ValueError):
    """A value a component cannot accept. `key` is relative to the component's table.

    Raise it from attrs validators, `__attrs_post_init__` or a component factory:
    ``raise ConfigError("k", "must be <= the shortest utterance (40 frames), got 64")``.
    """

    def __init__(self, key: str | None, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class RecipeError(EngramError):
    """One or more problems in a recipe, each `(path, message)`; `file` is the recipe."""

    def __init__(self, problems: Iterable[tuple[str, str]], file: str | None = None):
        self.problems = list(problems)
        self.file = file
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        where = f"{self.file}: " if self.file else ""
        return [f"{where}{path}: {msg}" if path else f"{where}{msg}" for path, msg in self.problems]

    def with_file(self, file: str) -> RecipeError:
        return RecipeError(self.problems, file=self.file or file)


class PluginError(EngramError):
    """A plugin is broken (fails to import, registers twice, misspells a hook)."""


class MalformedRegistration(PluginError):
    """A plugin registers a component wrongly (config class not attrs, ...): that plugin is broken."""


class NonFiniteLossError(EngramError):
    """Training produced a NaN/inf loss; the run stops, the last good checkpoint stays."""

    exit_code = 1


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a misspelt word, or None when nothing is close."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or ''."""
    best = closest(word, candidates)
    return f" (did you mean '{best}'?)" if best else ""
