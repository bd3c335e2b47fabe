"""Report generator: MLflow sweep experiment -> paper-style tables and figures.

- :mod:`.collect`  MLflow store -> tidy pandas frame (+ metric histories, artifacts)
- :mod:`.stats`    per-cell summaries, paired NQ − QCFS tests (scipy.stats), Holm
- :mod:`.protocol` protocol choices of the runs next to the paper's
- :mod:`.tables`   pure functions: frames -> Table 1 / Table 2 (markdown, LaTeX)
- :mod:`.latex`    LaTeX layout that fits a 10-pt article (booktabs, multirow, siunitx),
  ``preamble.tex``, and a pdflatex compile check
- :mod:`.figures`  matplotlib figures (Agg)
- :mod:`.cli`      ``run(...)``: the ``harness report`` subcommand (parsed by harness.cli)
"""
from .collect import Collected, ReportError, collect, default_tracking_uri
from .cli import run, write_report

__all__ = ["Collected", "ReportError", "collect", "default_tracking_uri", "run",
           "write_report"]
