"""A report as an interactive flame graph: one self-contained SVG (no network, no library),
the way flamegraph.pl draws one: the root at the bottom, each frame as wide as the bytes (the
first column) of the stacks through it; hover for the numbers, click to zoom (FILE.svg#zoom=NAME
opens zoomed), Ctrl-F or the Search button to highlight a name.

Written here rather than shelling out to flamegraph.pl or inferno: neither is packaged by
Debian or PyPI, and the drawing is a hundred lines.
"""

from __future__ import annotations

import hashlib
from html import escape
from typing import Dict, List

from probedsl.trust.escape import MAX_MESSAGE, for_terminal
from probedsl.report import Report, stack_entries

WIDTH, ROW, FONT = 1200, 16, 12
PAD_TOP, PAD_BOTTOM, PAD_SIDE = 40, 24, 10


class _Node:
    def __init__(self, name: str, kind: str = ""):
        self.name, self.kind = name, kind  # kind: "" | "kernel" | "inlined" | "marker"
        self.value = 0
        self.children: Dict[str, "_Node"] = {}


def _tree(report: Report) -> _Node:
    root = _Node("all")
    for s, frames, weight in stack_entries(report):
        node = root
        node.value += weight
        path = [(s.resource, "")] + [
            (f.name, "kernel" if kernel else "inlined" if f.inlined else "marker" if f.truncated else "")
            for f, kernel in frames
        ]
        for name, kind in path:
            node = node.children.setdefault(name, _Node(name, kind))
            node.value += weight
    return root


def _color(node: _Node) -> str:
    """flamegraph.pl's palettes: warm for user code, orange for the kernel, aqua for inlined
    calls, grey for a cut stack's marker; the shade from the name, so it is stable."""
    h = int(hashlib.md5(node.name.encode()).hexdigest()[:4], 16) / 0xFFFF
    if node.kind == "marker":
        return "rgb(200,200,200)"
    if node.kind == "kernel":
        return f"rgb({200 + int(55 * h)},{120 + int(60 * h)},40)"
    if node.kind == "inlined":
        return f"rgb(80,{170 + int(60 * h)},{170 + int(60 * h)})"
    return f"rgb({205 + int(50 * h)},{int(230 * (1 - h * 0.6))},{int(55 * h)})"


def to_svg(report: Report, color: bool = False) -> str:
    root = _tree(report)
    depth = _depth(root)
    height = PAD_TOP + PAD_BOTTOM + ROW * (depth + 1)
    unit = report.sections[0].columns[0] if report.sections and report.sections[0].columns else "value"
    rects: List[str] = []
    scale = (WIDTH - 2 * PAD_SIDE) / root.value if root.value else 0

    def draw(node: _Node, x: float, level: int, path: str) -> None:
        width = node.value * scale
        if width < 0.1:
            return
        y = height - PAD_BOTTOM - ROW * (level + 1)
        share = 100.0 * node.value / root.value if root.value else 0
        name = for_terminal(node.name)  # a traced program's name: visible escapes, capped
        label = f"{name} ({node.value} {unit}, {share:.2f}%)"
        rects.append(
            f'<g class="f" data-x="{x:.2f}" data-w="{width:.2f}" data-path="{escape(path)}">'
            f'<title>{escape(label)}</title>'
            f'<rect x="{x:.2f}" y="{y}" width="{width:.2f}" height="{ROW - 1}" fill="{_color(node)}" '
            f'rx="2"/><text x="{x + 3:.2f}" y="{y + ROW - 4}">{escape(_fit(name, width))}</text></g>'
        )
        child_x = x
        for i, child in enumerate(sorted(node.children.values(), key=lambda c: c.name)):
            draw(child, child_x, level + 1, f"{path}/{i}")
            child_x += child.value * scale

    draw(root, PAD_SIDE, 0, "0")
    title = escape(
        for_terminal(f"probedsl {report.recipe}: outstanding {unit} by stack ({report.target})", MAX_MESSAGE)
    )
    return f"""<?xml version="1.0" standalone="no"?>
<svg version="1.1" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" onload="init(evt)"
 xmlns="http://www.w3.org/2000/svg">
<style>
  text {{ font-family: Verdana, sans-serif; font-size: {FONT}px; fill: #000; pointer-events: none; }}
  .f:hover rect {{ stroke: #000; stroke-width: 0.5; cursor: pointer; }}
  .f.hit rect {{ fill: rgb(230,0,230); }}
  #title {{ font-size: 17px; }}
  .button {{ cursor: pointer; fill: #444; }}
</style>
<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#f8f8f8"/>
<text id="title" x="{WIDTH / 2}" y="24" text-anchor="middle">{title}</text>
<text id="reset" class="button" x="{PAD_SIDE}" y="24" visibility="hidden" onclick="unzoom()">Reset Zoom</text>
<text id="search" class="button" x="{WIDTH - PAD_SIDE}" y="24" text-anchor="end" onclick="search()">Search</text>
<text id="details" x="{PAD_SIDE}" y="{height - 6}"> </text>
{chr(10).join(rects)}
<script type="text/ecmascript"><![CDATA[
var frames, details, full = {WIDTH - 2 * PAD_SIDE}, left = {PAD_SIDE};
function init(evt) {{
  frames = Array.prototype.slice.call(document.querySelectorAll("g.f"));
  details = document.getElementById("details").firstChild;
  frames.forEach(function (g) {{
    g.addEventListener("click", function () {{ zoom(g); }});
    g.addEventListener("mouseover", function () {{ details.nodeValue = g.querySelector("title").textContent; }});
    g.addEventListener("mouseout", function () {{ details.nodeValue = " "; }});
  }});
  window.addEventListener("keydown", function (e) {{
    if ((e.ctrlKey || e.metaKey) && e.key === "f") {{ e.preventDefault(); search(); }}
  }});
  // FILE.svg#zoom=NAME opens zoomed into the first frame so named (a link to one stack)
  var m = /^#zoom=(.*)$/.exec(decodeURIComponent(location.hash));
  var hit = m && frames.filter(function (g) {{ return nameOf(g) === m[1]; }})[0];
  if (hit) zoom(hit);
}}
function nameOf(g) {{ return g.querySelector("title").textContent.replace(/ \\([^()]*\\)$/, ""); }}
function place(g, x, w) {{
  var r = g.querySelector("rect"), t = g.querySelector("text"), name = nameOf(g);
  r.setAttribute("x", x); r.setAttribute("width", Math.max(w, 0));
  t.setAttribute("x", x + 3);
  var fit = Math.floor((w - 6) / {FONT * 0.6});
  t.textContent = fit < 3 ? "" : (name.length <= fit ? name : name.slice(0, fit - 2) + "..");
}}
function zoom(target) {{
  var x0 = parseFloat(target.dataset.x), w0 = parseFloat(target.dataset.w), path = target.dataset.path;
  var ratio = full / w0;
  frames.forEach(function (g) {{
    var p = g.dataset.path, x = parseFloat(g.dataset.x), w = parseFloat(g.dataset.w);
    var inside = p === path || p.indexOf(path + "/") === 0, below = path.indexOf(p + "/") === 0;
    g.style.display = inside || below ? "" : "none";
    if (inside) place(g, left + (x - x0) * ratio, w * ratio);
    else if (below) place(g, left, full);
  }});
  document.getElementById("reset").setAttribute("visibility", "visible");
}}
function unzoom() {{
  frames.forEach(function (g) {{ g.style.display = ""; place(g, parseFloat(g.dataset.x), parseFloat(g.dataset.w)); }});
  document.getElementById("reset").setAttribute("visibility", "hidden");
}}
function search() {{
  var term = prompt("Highlight frames matching (a regular expression)", "");
  if (term === null) return;
  var re = new RegExp(term);
  frames.forEach(function (g) {{
    var name = g.querySelector("title").textContent;
    g.classList.toggle("hit", term !== "" && re.test(name));
  }});
}}
]]></script>
</svg>
"""


def _depth(node: _Node) -> int:
    return 1 + max((_depth(c) for c in node.children.values()), default=0)


def _fit(name: str, width: float) -> str:
    """The name cut to the frame's width (~0.6 em a character), as the script does on zoom."""
    fit = int((width - 6) // (FONT * 0.6))
    if fit < 3:
        return ""
    return name if len(name) <= fit else name[: fit - 2] + ".."
