"""`--prometheus ADDR:PORT`: the latest report as Prometheus gauges, served over HTTP while
tracing, for a fleet's monitoring to scrape and alert on (docs/fleet.md)."""

from __future__ import annotations

import hashlib
import ipaddress
import threading
from typing import List, Tuple

from probedsl.errors import ProbedslError
from probedsl.report import Report

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
COUNTERS = {
    "acquired": "acquisitions seen",
    "released": "releases seen",
    "unknown_releases": "releases of keys never seen acquired",
    "untracked": "acquisitions lost: the live table was full",
    "replaced": "keys acquired again without a release",
    "no_stack": "live entries whose stack the kernel did not keep",
    "unaccounted": "live entries the report could not account for",
}


def parse_address(text: str) -> Tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not 0 < int(port) < 65536:
            raise ValueError
        ipaddress.ip_address(host or "0.0.0.0")
    except ValueError:
        raise ProbedslError(f"--prometheus {text!r}: write ADDRESS:PORT, e.g. 127.0.0.1:9464 or 0.0.0.0:9464") from None
    return host or "0.0.0.0", int(port)


class Exporter:
    """Serves /metrics from the report last published; nothing is read at scrape time."""

    def __init__(self, address: str):
        import http.server  # (here: 15 ms of every start otherwise)

        host, port = parse_address(address)
        exporter = self
        self.text = "# probedsl: no report yet\n"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = exporter.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        try:
            self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ProbedslError(f"--prometheus {address}: cannot listen there: {exc.strerror}") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="probedsl-prometheus", daemon=True)
        self.thread.start()

    def publish(self, report: Report) -> None:
        self.text = metrics(report)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def stack_id(signature: str) -> str:
    """A stable id for a stack across runs and hosts: its symbolic signature, hashed."""
    return hashlib.sha1(signature.encode()).hexdigest()[:16]


def short_stack(entry, depth: int = 3) -> str:
    """The innermost named frames outside the C library, leaf first: what a graph legend shows."""
    frames = [f for f in entry.stack + entry.kernel_stack if not f.inlined and not f.truncated]
    own = [f for f in frames if "libc.so" not in f.module] or frames
    return ";".join(f.name for f in own[:depth])


def metrics(report: Report) -> str:
    out: List[str] = []

    def family(name: str, kind: str, help_text: str, samples) -> None:
        samples = list(samples)
        if not samples:
            return
        out.append(f"# HELP probedsl_{name} {help_text}")
        out.append(f"# TYPE probedsl_{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(str(v))}"' for k, v in labels.items())
            out.append(f"probedsl_{name}{{{text}}} {value}")

    base = {"recipe": report.recipe, "target": report.target}
    resources = report.resources.items()
    family(
        "live_bytes",
        "gauge",
        "bytes of live resources",
        (({**base, "resource": r}, c["live_bytes"]) for r, c in resources if "live_bytes" in c),
    )
    family(
        "live",
        "gauge",
        "live resources (blocks, descriptors...)",
        (({**base, "resource": r}, c["live_blocks"]) for r, c in resources),
    )
    for counter, help_text in COUNTERS.items():
        kind, name = ("counter", f"{counter}_total") if counter in ("acquired", "released") else ("gauge", counter)
        family(name, kind, help_text, (({**base, "resource": r}, c[counter]) for r, c in resources if counter in c))
    family(
        "leak_bytes",
        "gauge",
        "bytes by leak kind (--reachability)",
        (
            ({**base, "resource": r, "kind": k}, v["bytes"])
            for r, c in resources
            for k, v in c.get("reachability", {}).items()
        ),
    )
    family(
        "leak_blocks",
        "gauge",
        "blocks by leak kind (--reachability)",
        (
            ({**base, "resource": r, "kind": k}, v["blocks"])
            for r, c in resources
            for k, v in c.get("reachability", {}).items()
        ),
    )
    stacks = [(s, e) for s in report.sections if s.kind == "outstanding" for e in s.entries[: s.top or None]]
    labels = lambda s, e: {**base, "resource": s.resource, "stack_id": stack_id(e.signature()), "stack": short_stack(e)}
    for column in dict.fromkeys(c for s, _ in stacks for c in s.columns):
        family(
            f"stack_{column}",
            "gauge",
            f"{column} outstanding by stack (the report's top entries)",
            ((labels(s, e), e.values[column]) for s, e in stacks if column in e.values),
        )
    family(
        "stack_growing",
        "gauge",
        "1 when the stack grew in each of the last --growth-intervals reports",
        ((labels(s, e), int(e.growing)) for s, e in stacks),
    )
    family(
        "report_duration_seconds",
        "gauge",
        "seconds traced when the report was taken",
        [(base, round(report.duration_s, 3))],
    )
    return "\n".join(out) + "\n"
