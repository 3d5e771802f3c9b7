"""The report: a static HTML view of a diff (overview, the paper's figures, a latent table,
a panel per latent), plus the figures alone as PNG and SVG. See docs/report.md."""

from crossdiff.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "build_report": "crossdiff.report.build",
    "draw_figures": "crossdiff.report.figures",
    "write_figures": "crossdiff.report.figures",
    "Analysis": "crossdiff.report.inputs",
    "find_analyses": "crossdiff.report.inputs",
})
