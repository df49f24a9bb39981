"""The one exception type for mistakes a user can fix.

Library code raises `UserError` with a message that says what is wrong and how to fix it; only the
CLI prints it (one line on stderr, exit code 2). It subclasses ValueError so that callers of the
Python API can catch it as the usual bad-argument error.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

__all__ = ["Interrupted", "UserError", "closest_match_hint"]


class UserError(ValueError):
    """A mistake in the user's input: a bad argument, file, config key or checkpoint."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during long work, with what the user needs next (where to resume); the CLI prints its
    message, one line, and exits 130 as for any interrupt."""


def closest_match_hint(name: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """' (did you mean "x"?)' for the nearest of `choices`, or '' when nothing is close. `aliases` maps
    other names of a choice (what another library calls it: learning_rate for lr) to the choice, so a
    misspelt alias finds its choice too, which spelling alone never would ("lerning_rate" is far from
    "lr")."""
    aliases = dict(aliases or {})
    choices = list(choices)
    match = difflib.get_close_matches(name, choices + [a for a in aliases if a not in choices], n=1, cutoff=0.5)
    return f' (did you mean "{aliases.get(match[0], match[0])}"?)' if match else ""
