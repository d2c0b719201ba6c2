"""The type-checking gate of `make lint`: certify/ must be mypy-clean, and lipnet/ may keep only the
errors recorded in mypy-baseline.txt, a list that can only shrink.

mypy runs on ``lipnet certify`` with the repository's configuration (``[tool.mypy]`` in
pyproject.toml) and its JSON output. Each error becomes the entry ``file: [code] message``, without
its line or column, so that editing lines above an error does not make it new; a message's own
references to lines ("defined on line 12") are normalised to ``line N`` for the same reason. The
entries are compared with the baseline as a multiset (an error that occurs twice is listed twice):

- an error the baseline does not list fails the gate (it is new: fix it; only a reviewed commit may
  add its line to the baseline by hand);
- a baselined error that no longer occurs fails the gate too, so that a fixed error cannot come
  back unnoticed: ``--update`` (``make mypy-baseline``) deletes those lines and never adds one;
- an error in certify/ fails the gate whatever the baseline says, and a baseline that lists one is
  rejected: certify/ is checked clean.

Exit status: 0 when the errors are exactly the baseline's, 1 when they are not (each difference is
listed with what to do), 2 when the gate could not decide (mypy crashed, unreadable baseline).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "mypy-baseline.txt"
CHECKED = ("lipnet", "certify")
# Packages that may not have a baselined error: their errors always fail the gate.
CLEAN = ("certify",)
MYPY_COMMAND = (sys.executable, "-m", "mypy", "--output", "json", *CHECKED)
UPDATE_COMMAND = "make mypy-baseline"

_HEADER = """\
# mypy errors accepted in lipnet/ when the type-checking gate was introduced (tools/mypy_gate.py).
# One error a line, `file: [code] message`, without line numbers; a repeated error is repeated.
# This list may only shrink: fix an error, then delete its line (`make mypy-baseline` does it).
# certify/ errors are never accepted here.
"""
_LINE_REFERENCE = re.compile(r"\bline \d+\b")
_ENTRY = re.compile(r"^(?P<file>[^:\s][^:]*): \[(?P<code>[a-z0-9-]+)\] (?P<message>.+)$")


class GateError(Exception):
    """The gate cannot decide: mypy did not produce a report, or the baseline file is malformed."""


@dataclass(frozen=True)
class Error:
    """One mypy error: where it is (for the report) and what it is (for the comparison)."""

    file: str
    line: int
    code: str
    message: str

    @property
    def key(self) -> str:
        """The baseline entry of this error: file, code and message, without the line."""
        return f"{self.file}: [{self.code}] {self.message}"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.code}] {self.message}"


def _in_clean_package(entry: str) -> bool:
    return any(entry.startswith(f"{package}/") for package in CLEAN)


def parse_mypy_json(text: str) -> list[Error]:
    """The errors of mypy's ``--output json`` report (one JSON object a line; notes are skipped).

    Raises GateError on a line that is not such an object (mypy crashed or printed something else)
    or on an error without a code (the entry could not be compared reliably).
    """
    errors: list[Error] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            severity, file, line, code, message = (
                record["severity"],
                record["file"],
                record["line"],
                record["code"],
                record["message"],
            )
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise GateError(f"line {number} of mypy's output is not a JSON error record: {raw!r}") from exc
        if severity != "error":
            continue
        if not code:
            raise GateError(f"mypy reported an error without an error code: {raw!r}")
        normalised = _LINE_REFERENCE.sub("line N", " ".join(str(message).split()))
        errors.append(Error(str(file).replace("\\", "/"), int(line), str(code), normalised))
    return errors


def run_mypy(command: Sequence[str] = MYPY_COMMAND, cwd: Path = ROOT) -> str:
    """mypy's JSON report (stdout); GateError when mypy exits with neither 0 (clean) nor 1 (errors)."""
    done = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        output = f"{done.stdout.strip()}\n{done.stderr.strip()}".strip()
        raise GateError(f"mypy exited with status {done.returncode}:\n{output}")
    return done.stdout


def read_baseline(path: Path) -> Counter[str]:
    """The baseline's entries with their multiplicity; an absent file is an empty baseline.

    Raises GateError on a line that is not an entry, or on an entry in a package that must be clean.
    """
    if not path.exists():
        return Counter()
    entries: Counter[str] = Counter()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        if _ENTRY.match(line) is None:
            raise GateError(f"{path.name}:{number}: not a `file: [code] message` entry: {line!r}")
        if _in_clean_package(line):
            raise GateError(
                f"{path.name}:{number}: {', '.join(CLEAN)} must type-check clean and cannot be "
                f"baselined; delete this line and fix the error: {line}"
            )
        entries[line] += 1
    return entries


def write_baseline(path: Path, entries: Iterable[str]) -> None:
    """Write the entries, sorted, under the explanatory header."""
    body = "".join(f"{entry}\n" for entry in sorted(entries))
    path.write_text(_HEADER + body, encoding="utf-8")


@dataclass(frozen=True)
class Comparison:
    """How the current errors differ from the baseline."""

    clean_violations: list[Error]  # errors in a package that must be clean
    new: list[Error]  # errors (beyond their baselined multiplicity) the baseline does not list
    stale: list[str]  # baseline entries (with repetition) that no longer occur
    kept: Counter[str]  # baseline entries that still occur, with the multiplicity that still occurs

    @property
    def ok(self) -> bool:
        return not (self.clean_violations or self.new or self.stale)


def compare(errors: Sequence[Error], baseline: Counter[str]) -> Comparison:
    """Compare the errors with the baseline as multisets of entries."""
    clean_violations = [error for error in errors if _in_clean_package(error.key)]
    remaining = Counter(baseline)
    new: list[Error] = []
    kept: Counter[str] = Counter()
    for error in errors:
        if _in_clean_package(error.key):
            continue
        if remaining[error.key] > 0:
            remaining[error.key] -= 1
            kept[error.key] += 1
        else:
            new.append(error)
    stale = sorted(remaining.elements())
    return Comparison(clean_violations, new, stale, kept)


def report(comparison: Comparison, baseline_name: str, updated: bool) -> str:
    """What differs and exactly what to do about it (empty when nothing differs)."""
    parts: list[str] = []
    if comparison.clean_violations:
        parts.append(
            f"{len(comparison.clean_violations)} mypy error(s) in {', '.join(CLEAN)}/, which must type-check "
            "clean (no baseline applies there); fix them:\n"
            + "".join(f"  {error}\n" for error in comparison.clean_violations)
        )
    if comparison.new:
        parts.append(
            f"{len(comparison.new)} new mypy error(s), not in {baseline_name}; fix them. The baseline may "
            f"only shrink: `{UPDATE_COMMAND}` never adds a line, and accepting an error anyway means adding "
            f"its `file: [code] message` line to {baseline_name} by hand, in a reviewed commit saying why:\n"
            + "".join(f"  {error}\n" for error in comparison.new)
        )
    if comparison.stale and updated:
        parts.append(
            f"{len(comparison.stale)} fixed error(s) deleted from {baseline_name}; commit it:\n"
            + "".join(f"  {entry}\n" for entry in comparison.stale)
        )
    elif comparison.stale:
        parts.append(
            f"{len(comparison.stale)} error(s) listed in {baseline_name} no longer occur; delete these lines "
            f"so that they cannot come back (run `{UPDATE_COMMAND}`, which only deletes lines, or delete "
            "them by hand) and commit the baseline:\n" + "".join(f"  {entry}\n" for entry in comparison.stale)
        )
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--baseline", type=Path, default=BASELINE, help="the baseline file")
    parser.add_argument(
        "--update", action="store_true", help="delete the stale entries of the baseline; never adds one"
    )
    parser.add_argument(
        "--mypy-output", type=Path, help="read mypy's JSON report from this file instead of running mypy"
    )
    args = parser.parse_args(argv)
    try:
        baseline = read_baseline(args.baseline)
        text = args.mypy_output.read_text(encoding="utf-8") if args.mypy_output else run_mypy()
        errors = parse_mypy_json(text)
    except (GateError, OSError) as exc:
        print(f"mypy gate: error: {exc}", file=sys.stderr)
        return 2
    comparison = compare(errors, baseline)
    updated = args.update and bool(comparison.stale)
    if updated:
        write_baseline(args.baseline, comparison.kept.elements())
    message = report(comparison, args.baseline.name, updated)
    if message:
        print(f"mypy gate:\n{message}", file=sys.stderr)
    failed = bool(comparison.clean_violations or comparison.new or (comparison.stale and not updated))
    if not failed:
        print(f"mypy gate: ok ({sum(comparison.kept.values())} baselined error(s) in {args.baseline.name})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
