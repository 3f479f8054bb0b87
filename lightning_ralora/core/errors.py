"""The error every command raises for bad input: all problems of a config at once, one line each (exit code 2)."""

from __future__ import annotations


def one_line(text: str) -> str:
    """`text` on one line (a multi-line message's lines joined by a space), for one problem per stderr line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class ConfigError(ValueError):
    """All problems of one config: one problem is one line (`invalid config: <problem>`), several are a header
    line and one line each. `problems` keeps the list."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = [one_line(p) for p in problems]
        if len(self.problems) == 1:
            message = f"invalid config: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"invalid config ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)
