"""Command-line values that make sense, or one line saying what was expected: argparse types for
counts and real numbers, and a parser whose errors are a single line (exit code 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, its errors one line: `s2flash sample: error: argument --steps: ...` (the
    usage is in --help). Subcommands' parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def count(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (no upper bound when high is None)."""
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def real(low: float | None = None) -> Callable[[str], float]:
    """A finite real number, >= low when low is given (nan and inf are refused: they sample black images)."""
    expected = "a finite number" + ("" if low is None else f" >= {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and value < low):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse
