"""Renderers: a report.Report -> text, JSON, folded stacks, speedscope, pprof (formats,
pprof), an SVG flame graph (flamegraph), an HTML page (html_report, templates/), Prometheus
gauges (prometheus), the --live screen (live); and the rendered report written where the user
asked (write). They compute nothing and read no ELF file: what they show is in the report.
"""
