"""Renderers: a report.Report -> text, JSON, folded stacks, speedscope, pprof (formats,
pprof), an SVG flame graph (flamegraph), an HTML page (html_report, templates/), Prometheus
gauges (prometheus), the --live screen (live). They compute nothing and read no file: what
they show is in the report.
"""
