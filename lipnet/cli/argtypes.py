"""Argument types shared by the ``lipnet`` sub-commands: each turns a string into a value or raises
``argparse.ArgumentTypeError`` with a message that says what was expected; and the check of an output
path, made before a command does any work."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from certify.radius import parse_eps

__all__ = [
    "AUTOATTACK_ATTACKS",
    "Parser",
    "autoattack_list",
    "check_output_path",
    "eps_list",
    "float_list",
    "increasing_eps_list",
    "json_object",
    "name_list",
    "non_negative_int",
    "one_line",
    "positive_float",
    "positive_float_list",
    "positive_int",
    "seed_list",
    "unit_fraction",
]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit 2), as for every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(err: BaseException) -> str:
    """An exception's message on one line (its class name when the message is empty)."""
    return " ".join(str(err).split()) or type(err).__name__


def _items(text: str, parse: Callable[[str], Any], example: str) -> list[Any]:
    try:
        values = [parse(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{err}; expected a comma-separated list such as {example}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one value, such as {example}")
    return values


def float_list(text: str) -> list[float]:
    """``"0.1,1,10"`` -> ``[0.1, 1.0, 10.0]``."""
    return _items(text, float, "0.1,1,10")


def eps_list(text: str) -> list[float]:
    """``"36/255,0.5"`` -> radii as floats (fractions allowed; :func:`certify.radius.parse_eps`)."""
    return _items(text, parse_eps, "36/255,72/255")


def increasing_eps_list(text: str) -> list[float]:
    """Like :func:`eps_list`, and the radii must be strictly increasing."""
    values = eps_list(text)
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise argparse.ArgumentTypeError(
            f"expected strictly increasing radii such as 36/255,72/255, got {text!r}"
        )
    return values


def name_list(text: str) -> list[str]:
    """``"apgd-ce,apgd-t"`` -> ``["apgd-ce", "apgd-t"]``."""
    return _items(text, str, "apgd-ce,apgd-t")


#: The attacks pyautoattack's ``version="custom"`` runs. It rejects another name only when it attacks,
#: after the bound and the certificates have been computed, so ``--attacks`` is checked on parsing.
AUTOATTACK_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


def autoattack_list(text: str) -> list[str]:
    """``"apgd-ce,apgd-t"`` -> ``["apgd-ce", "apgd-t"]``, each one of :data:`AUTOATTACK_ATTACKS`."""
    names = name_list(text)
    unknown = [n for n in names if n not in AUTOATTACK_ATTACKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown AutoAttack attack(s) {', '.join(unknown)}; choose from {', '.join(AUTOATTACK_ATTACKS)}"
        )
    return names


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct integers >= 0 (random seeds)."""
    values = _items(text, lambda v: _int_at_least(v, 0), "0,1,2")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct seeds such as 0,1,2, got {text!r}")
    return values


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a temperature, a time in seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def positive_float_list(text: str) -> list[float]:
    """``"0.5,5,50"`` -> ``[0.5, 5.0, 50.0]``: finite numbers > 0 (temperatures, say)."""

    def one(value: str) -> float:
        number = float(value)
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"expected finite numbers > 0, got {value!r}")
        return number

    return _items(text, one, "0.5,5,50")


def unit_fraction(text: str) -> float:
    """A number in ``[0, 1]`` (a fraction of the steps, a difficulty setting)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def json_object(text: str) -> dict[str, Any]:
    """A JSON object such as ``'{"width": 16}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 16}}', got {text!r}")
    return value


def check_output_path(path: str | Path, flag: str, *, folder: bool) -> None:
    """Raise ``ValueError`` (naming ``flag``) unless ``path`` can become the output folder (``folder``)
    or file: it is not a file where a folder is wanted or the reverse, and its nearest existing
    ancestor is a writable folder. Nothing is created: the command creates what it needs once every
    other argument has been checked, so bad input leaves no empty folder behind."""
    target = Path(path)
    if folder and target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {target}: is a file, expected a folder")
    if not folder and target.is_dir():
        raise ValueError(f"{flag} {target}: is a folder, expected a file name")
    # an existing output file is replaced (atomically, by the command): its folder must be writable
    ancestor = target if target.exists() and folder else target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {target}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {target}: {ancestor} is not writable")
