"""The ``lipnet`` command line (:mod:`lipnet.cli.main`), one module per command.

``main(argv)`` runs the command and returns its exit code; ``build_parser()`` is its argument parser.
``python -m lipnet.cli`` runs it too (:mod:`lipnet.cli.__main__`).
"""

from lipnet.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
