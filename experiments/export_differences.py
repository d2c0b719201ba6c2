"""Exported-vs-model maximum output difference for every model family x layer kind x export format.

    python experiments/export_differences.py [--out experiments/results/export_differences.md]

Builds the test suite's tiny model of each family with each layer kind it takes (tests/test_export.py:
two Adam steps away from the initialisation, so that no weight is at its special initial value), exports
it with :func:`lipnet.export_formats.export_file` in every format (verified on 64 random inputs: loaded
back with its own runtime, outputs compared, radii recomputed by certify from the exported graph) and
writes the largest |exported - model| per cell as a Markdown table. A refused export is shown as its
one-line reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

# The families and the tiny sizes are the test suite's, so the table covers exactly what the tests verify.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_export import CASES, FAMILIES, _trained  # noqa: E402

from lipnet.export_formats import FORMATS, ExportError, export_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/results/export_differences.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, kind in CASES:
            build, shape, _ = FAMILIES[family]
            torch.manual_seed(0)
            model = _trained(build(kind), shape)
            x = torch.rand((64, *shape), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                y = model(x).argmax(dim=1)
            cells = []
            for fmt in FORMATS:
                try:
                    report = export_file(model, Path(tmp) / f"m.{fmt}", fmt, x, y)
                    cells.append(f"{report.max_difference:.2g}")
                except ExportError as err:
                    cells.append(f"refused: {err}")
            rows.append(f"| {family} | {kind} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| family | kind | " + " | ".join(FORMATS) + " |",
            "|---|---|" + "---:|" * len(FORMATS),
            *rows,
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        "Max |exported - model| on 64 random inputs (`python experiments/export_differences.py`).\n\n"
        + table
        + "\n"
    )


if __name__ == "__main__":
    main()
