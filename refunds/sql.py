"""Statements written with named parameters, run with asyncpg's numbered ones.

A statement built from parts (the state machine's move, a caller's CTEs around it) with
``$1``-style numbers makes every part count the others' placeholders. Here each part names
its own (``$refund_ids``); the numbers are given once, when the statement is built, and
``args`` puts the values in their order, refusing a name that is missing or unknown.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


class Statement:
    """SQL with ``$name`` placeholders; ``text`` has Postgres's ``$1``.. in their place."""

    def __init__(self, text: str):
        numbers: dict[str, int] = {}

        def number(match: re.Match) -> str:
            return f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"

        self.text = _NAME.sub(number, text)
        self.names = tuple(numbers)

    def args(self, **values) -> list:
        """The values in placeholder order."""
        missing = [name for name in self.names if name not in values]
        unknown = sorted(set(values) - set(self.names))
        if missing or unknown:
            raise TypeError(f"statement parameters: missing {missing}, unknown {unknown}")
        return [values[name] for name in self.names]

    def __repr__(self) -> str:
        return f"Statement({self.names})"
