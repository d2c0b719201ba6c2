"""The type-checking gate of `make lint` (tools/mypy_gate.py), on small fake mypy reports.

mypy itself never runs here (it takes too long for the suite): every test feeds the gate a JSON report
through ``--mypy-output`` or calls its functions directly, except one that runs a stand-in command to
check how a crashed mypy is reported.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
Capture = pytest.CaptureFixture[str]


def _load_gate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mypy_gate", ROOT / "tools" / "mypy_gate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


gate = _load_gate()


def record(file: str, line: int, code: str | None, message: str, severity: str = "error") -> str:
    """One line of mypy's ``--output json`` report."""
    return json.dumps(
        {
            "file": file,
            "line": line,
            "column": 4,
            "end_line": line,
            "end_column": 9,
            "message": message,
            "hint": None,
            "code": code,
            "severity": severity,
        }
    )


ARG_TYPE = 'Argument 1 to "f" has incompatible type "str"; expected "int"'
A = record("lipnet/a.py", 10, "arg-type", ARG_TYPE)
B = record("lipnet/b.py", 20, "operator", '"Tensor" not callable')
C = record("lipnet/c.py", 30, "index", "Value of type Module is not indexable")
CERTIFY = record("certify/x.py", 5, "attr-defined", 'Module has no attribute "y"')


def run_gate(tmp_path: Path, report: list[str], baseline: str | None, *extra: str) -> tuple[int, Path]:
    """Run the gate on ``report`` against a baseline file holding ``baseline`` (absent when None)."""
    output = tmp_path / "mypy.json"
    output.write_text("\n".join(report) + "\n", encoding="utf-8")
    path = tmp_path / "mypy-baseline.txt"
    if baseline is not None:
        path.write_text(baseline, encoding="utf-8")
    return gate.main(["--baseline", str(path), "--mypy-output", str(output), *extra]), path


def entries(*lines: str) -> str:
    return "".join(f"{gate.parse_mypy_json(line)[0].key}\n" for line in lines)


def test_errors_are_keyed_without_line_numbers_and_notes_are_skipped() -> None:
    note = record("lipnet/a.py", 11, None, "See https://mypy.readthedocs.io/", severity="note")
    redef = record("lipnet/b.py", 40, "no-redef", 'Name "history" already defined on line 31')
    errors = gate.parse_mypy_json("\n".join([A, note, "", redef]))
    assert [e.key for e in errors] == [
        'lipnet/a.py: [arg-type] Argument 1 to "f" has incompatible type "str"; expected "int"',
        # a line the message names is normalised too: it moves with every edit above it
        'lipnet/b.py: [no-redef] Name "history" already defined on line N',
    ]
    assert str(errors[0]).startswith("lipnet/a.py:10: [arg-type] ")  # the report keeps the line


def test_exact_baseline_passes_and_moved_lines_do_not_matter(tmp_path: Path, capsys: Capture) -> None:
    moved = record("lipnet/a.py", 99, "arg-type", ARG_TYPE)
    code, path = run_gate(tmp_path, [moved, B], entries(A, B))
    assert code == 0
    assert "ok (2 baselined error(s)" in capsys.readouterr().out
    assert path.read_text(encoding="utf-8") == entries(A, B)  # a passing run writes nothing


def test_a_new_error_fails_and_is_listed_with_its_line(tmp_path: Path, capsys: Capture) -> None:
    code, _ = run_gate(tmp_path, [A, B, C], entries(A, B))
    assert code == 1
    err = capsys.readouterr().err
    assert "1 new mypy error(s)" in err
    assert "lipnet/c.py:30: [index] Value of type Module is not indexable" in err
    assert "lipnet/a.py" not in err


def test_the_baseline_is_a_multiset(tmp_path: Path, capsys: Capture) -> None:
    # The same error a second time (another call with the same mistake) is new.
    again = record("lipnet/a.py", 50, "arg-type", ARG_TYPE)
    code, _ = run_gate(tmp_path, [A, again], entries(A))
    assert code == 1
    assert "lipnet/a.py:50: [arg-type]" in capsys.readouterr().err
    # and listed twice, it is accepted twice
    assert run_gate(tmp_path, [A, again], entries(A, A))[0] == 0


def test_a_fixed_error_fails_until_its_line_is_deleted(tmp_path: Path, capsys: Capture) -> None:
    code, path = run_gate(tmp_path, [A], entries(A, B))
    assert code == 1
    err = capsys.readouterr().err
    assert "1 error(s) listed in mypy-baseline.txt no longer occur" in err
    assert "make mypy-baseline" in err  # exactly what to run
    assert 'lipnet/b.py: [operator] "Tensor" not callable' in err
    assert path.read_text(encoding="utf-8") == entries(A, B)  # the check alone never rewrites it


def test_update_deletes_fixed_lines_and_keeps_the_header(tmp_path: Path, capsys: Capture) -> None:
    header = "# a comment\n"
    code, path = run_gate(tmp_path, [A], header + entries(A, B), "--update")
    assert code == 0
    assert "1 fixed error(s) deleted" in capsys.readouterr().err
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# ") and "may only shrink" in text
    assert gate.read_baseline(path) == {gate.parse_mypy_json(A)[0].key: 1}
    assert run_gate(tmp_path, [A], text)[0] == 0


def test_update_never_adds_a_line(tmp_path: Path, capsys: Capture) -> None:
    code, path = run_gate(tmp_path, [A, C], entries(A, B), "--update")
    assert code == 1
    err = capsys.readouterr().err
    assert "1 new mypy error(s)" in err and "lipnet/c.py:30" in err
    # the fixed entry (B) is deleted, the new one (C) is not added
    assert gate.read_baseline(path) == {gate.parse_mypy_json(A)[0].key: 1}
    # without a baseline file every error is new, and --update creates nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    code, path = run_gate(empty, [A], None, "--update")
    assert code == 1 and not path.exists()


def test_certify_errors_always_fail(tmp_path: Path, capsys: Capture) -> None:
    code, _ = run_gate(tmp_path, [A, CERTIFY], entries(A))
    assert code == 1
    err = capsys.readouterr().err
    assert "must type-check clean" in err and "certify/x.py:5: [attr-defined]" in err
    # a baseline that lists a certify error is refused outright
    code, _ = run_gate(tmp_path, [A, CERTIFY], entries(A, CERTIFY))
    assert code == 2
    assert "certify must type-check clean and cannot be baselined" in capsys.readouterr().err


def test_a_malformed_baseline_or_report_stops_the_gate(tmp_path: Path, capsys: Capture) -> None:
    assert run_gate(tmp_path, [A], "lipnet/a.py:10: not an entry\n")[0] == 2
    assert "not a `file: [code] message` entry" in capsys.readouterr().err
    assert run_gate(tmp_path, ["Traceback (most recent call last):"], entries(A))[0] == 2
    assert "is not a JSON error record" in capsys.readouterr().err
    assert run_gate(tmp_path, [record("lipnet/a.py", 1, None, "no code")], "")[0] == 2
    assert "without an error code" in capsys.readouterr().err


def test_a_crashed_mypy_is_an_error_of_the_gate() -> None:
    crash = [sys.executable, "-c", "import sys; print('INTERNAL ERROR', file=sys.stderr); sys.exit(2)"]
    with pytest.raises(gate.GateError, match="exited with status 2:\nINTERNAL ERROR"):
        gate.run_mypy(crash, ROOT)
    assert gate.run_mypy([sys.executable, "-c", f"print({A!r}); raise SystemExit(1)"], ROOT).strip() == A


def test_the_committed_baseline_is_well_formed_and_lint_runs_the_gate() -> None:
    baseline = gate.read_baseline(ROOT / "mypy-baseline.txt")  # raises on a malformed or certify line
    assert all(entry.startswith("lipnet/") for entry in baseline)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "tools/mypy_gate.py" in lint
    assert "tools/mypy_gate.py --update" in makefile.split("\nmypy-baseline:", 1)[1].split("\n\n", 1)[0]
