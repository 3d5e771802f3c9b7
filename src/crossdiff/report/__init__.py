"""The report: a static HTML view of a diff (overview, the paper's figures, a latent table,
a panel per latent), plus the figures alone as PNG and SVG. See docs/report.md."""

from crossdiff.report.build import build_report
from crossdiff.report.figures import draw_figures, write_figures
from crossdiff.report.inputs import Analysis, find_analyses

__all__ = ["Analysis", "build_report", "draw_figures", "find_analyses", "write_figures"]
