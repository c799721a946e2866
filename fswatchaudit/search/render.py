"""The report's faces: aligned tables and bar charts on a terminal (rich), and one
self-contained HTML page (inline CSS, an inline SVG timeline drawn here, a few lines
of inline JavaScript; nothing is fetched from the network).  Every name goes through
``escape`` first (control characters, raw bytes), then the markup's own escaping."""
from __future__ import annotations

import html
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table
from rich.text import Text

from ..sinks.encode import escape

BAR_WIDTH = 30


def _bar(n: int, most: int, width: int = BAR_WIDTH) -> str:
    if most <= 0 or n <= 0:
        return ""
    eighths = max(1, round(n / most * width * 8))
    full, part = divmod(eighths, 8)
    return "█" * full + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[part]


def _t(value: Any) -> Text:
    """A cell: escaped text, never read as rich markup."""
    return Text(escape(str(value)))


def _table(title: str, columns: list[str], rows: list[list[Any]], counts: list[int],
           ) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold",
                  show_edge=False, pad_edge=False, box=None, header_style="bold")
    for c in columns:
        if c == "path":
            table.add_column(c, min_width=24, overflow="fold")
        else:
            table.add_column(c, justify="right" if c == "count" else "left", no_wrap=True)
    table.add_column("", style="cyan", no_wrap=True, min_width=BAR_WIDTH)
    most = max(counts, default=0)
    for row, n in zip(rows, counts, strict=True):
        table.add_row(*[_t(v) for v in row], _bar(n, most))
    return table


def _tree_lines(node: dict[str, Any], depth: int = 0) -> list[tuple[str, int]]:
    name = node["name"] + ("/" if node["children"] and node["name"] != "/" else "")
    out = [("  " * depth + name, node["count"])]
    for child in node["children"]:
        out += _tree_lines(child, depth + 1)
    return out


def terminal(data: dict[str, Any], out: TextIO, color: bool | None = None,
             width: int | None = None) -> None:
    console = Console(file=out, force_terminal=color, no_color=color is False,
                      width=width, highlight=False, soft_wrap=False)
    if width is None and not console.is_terminal:
        console.width = 120
    console.print(Text(f"{data['events']} events from {data['first_iso']} to "
                       f"{data['last_iso']}", style="bold"))
    console.print()
    sections = [
        ("Events per alias and operation", ["alias", "op", "count"],
         [[r["alias"], r["op"], r["count"]] for r in data["per_alias_op"]]),
        ("Events per key", ["key", "count"],
         [[r["key"], r["count"]] for r in data["per_key"]]),
        ("Events per program", ["exe", "count"],
         [[r["exe"], r["count"]] for r in data["per_program"]]),
        ("Events per user", ["login user", "user", "count"],
         [[r["loginuser"], r["user"], r["count"]] for r in data["per_user"]]),
        (f"Failed attempts: {data['failed']['count']}", ["result", "path", "exe",
                                                          "login user", "count"],
         [[r["result"], r["path"], r["exe"], r["loginuser"], r["count"]]
          for r in data["failed"]["top"]]),
        ("Events per container", ["container", "count"],
         [[r["container"], r["count"]] for r in data["per_container"]]),
    ]
    for title, cols, rows in sections:
        counts = [r[-1] for r in rows]
        console.print(_table(title, cols, rows, counts))
        console.print()
    tree = _tree_lines(data["path_tree"])
    console.print(_table("Most changed paths (a directory counts all below it)",
                         ["path", "count"], [list(x) for x in tree],
                         [n for _, n in tree]))
    console.print()
    hist = data["histogram"]
    console.print(_table(f"Events per {hist['unit']}", ["from", "count"],
                         [[b["label"], b["count"]] for b in hist["buckets"]],
                         [b["count"] for b in hist["buckets"]]))
    scanned = data.get("scanned")
    if scanned:
        console.print()
        console.print(Text(rich_escape(_scanned_line(scanned)), style="dim"))


def _scanned_line(s: dict[str, Any]) -> str:
    line = (f"{s.get('records', 0)} records scanned in {s.get('files', 0)} files "
            f"({s.get('files_skipped', 0)} skipped by time)")
    lost = sum((s.get("lost") or {}).values())
    if lost or s.get("dropped"):
        line += f"; events lost by the auditor: {lost}, not stored: {s.get('dropped', 0)}"
    return line


# -- HTML ------------------------------------------------------------------------------
def _h(value: Any) -> str:
    return html.escape(escape(str(value)), quote=True)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
 color:#1d2330;background:#f5f6f8}
header{background:#1d2d44;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;opacity:.85}
main{padding:20px 28px;display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));
 gap:20px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:14px 18px}
section.wide{grid-column:1/-1}
h2{font-size:16px;margin:0 0 10px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums;width:5em}
td.p{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
td.b{width:35%} .hbar{display:inline-block;height:10px;background:#4f7cc2;border-radius:2px}
.fail .hbar{background:#c8473f}
svg .bar{fill:#4f7cc2} svg .bar:hover{fill:#f0a030} svg text{font-size:11px;fill:#555}
ul.tree{list-style:none;padding-left:16px;margin:0;font-family:ui-monospace,Menlo,monospace}
ul.tree li{margin:1px 0} .cnt{color:#666;margin-left:8px}
summary{cursor:pointer} .muted{color:#777}
"""

JS = """
(function(){
  // bars the browser really drew: standing on the axis, as tall as their count says
  var bars=document.querySelectorAll('#timeline rect.bar'), drawn=0;
  var axis=document.getElementById('axis').getBoundingClientRect();
  var most=Math.max.apply(null,Array.prototype.map.call(bars,function(b){
    return +b.getAttribute('data-count');}).concat([1]));
  var full=null;
  bars.forEach(function(b){var r=b.getBoundingClientRect(), n=+b.getAttribute('data-count');
    if(n===most) full=r.height;});
  bars.forEach(function(b){var r=b.getBoundingClientRect(), n=+b.getAttribute('data-count');
    if(r.width>0&&Math.abs(r.bottom-axis.bottom)<2&&full>0&&Math.abs(r.height-full*n/most)<2)
      drawn++;});
  document.documentElement.setAttribute('data-bars-drawn', String(drawn));
  var tip=document.getElementById('tip');
  bars.forEach(function(b){b.addEventListener('mousemove',function(e){
    tip.textContent=b.getAttribute('data-label')+': '+b.getAttribute('data-count');
    tip.style.left=(e.pageX+12)+'px'; tip.style.top=(e.pageY-10)+'px';
    tip.style.display='block';});
    b.addEventListener('mouseleave',function(){tip.style.display='none';});});
})();
"""


def timeline_svg(hist: dict[str, Any], width: int = 1100, height: int = 240) -> str:
    buckets = hist["buckets"]
    left, bottom, top = 50, 40, 10
    plot_w, plot_h = width - left - 10, height - bottom - top
    most = max((b["count"] for b in buckets), default=0) or 1
    n = max(len(buckets), 1)
    step = plot_w / n
    bw = max(step * 0.8, 1.0)
    parts = [f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="100%" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="events per '
             f'{_h(hist["unit"])}">',
             f'<line id="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 10}" '
             f'y2="{top + plot_h}" stroke="#999"/>']
    for frac in (0.5, 1.0):
        y = top + plot_h - plot_h * frac
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{round(most * frac)}</text>')
    label_every = max(1, n // 8)
    for i, b in enumerate(buckets):
        h = plot_h * b["count"] / most
        x = left + i * step + (step - bw) / 2
        y = top + plot_h - h
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" '
                     f'height="{h:.1f}" data-label="{_h(b["label"])}" '
                     f'data-count="{b["count"]}"><title>{_h(b["label"])}: {b["count"]}'
                     '</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}">'
                         f'{_h(b["label"][5:16].replace("T", " "))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _html_table(columns: list[str], rows: list[list[Any]], counts: list[int],
                cls: str = "") -> str:
    most = max(counts, default=0) or 1
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{_h(c)}</th>" for c in columns)
           + "<th></th></tr>"]
    for row, n in zip(rows, counts, strict=True):
        cells = "".join(f'<td class="{"n" if c == "count" else "p"}">{_h(v)}</td>'
                        for c, v in zip(columns, row, strict=True))
        out.append(f'<tr>{cells}<td class="b"><span class="hbar" '
                   f'style="width:{100 * n / most:.1f}%"></span></td></tr>')
    if not rows:
        out.append(f'<tr><td class="muted" colspan="{len(columns) + 1}">none</td></tr>')
    out.append("</table>")
    return "".join(out)


def _html_tree(node: dict[str, Any], depth: int = 0) -> str:
    label = (f'<span class="p">{_h(node["name"])}</span>'
             f'<span class="cnt">{node["count"]}</span>')
    if not node["children"]:
        return f"<li>{label}</li>"
    inner = "".join(_html_tree(c, depth + 1) for c in node["children"])
    return (f'<li><details{" open" if depth < 4 else ""}><summary>{label}</summary>'
            f'<ul class="tree">{inner}</ul></details></li>')


def html_page(data: dict[str, Any], title: str = "fswatchaudit report") -> str:
    hist = data["histogram"]
    sections = [
        ("Events per alias and operation", ["alias", "op", "count"],
         [[r["alias"], r["op"], r["count"]] for r in data["per_alias_op"]], ""),
        ("Events per key", ["key", "count"],
         [[r["key"], r["count"]] for r in data["per_key"]], ""),
        ("Who: programs", ["exe", "count"],
         [[r["exe"], r["count"]] for r in data["per_program"]], ""),
        ("Who: users", ["login user", "user", "count"],
         [[r["loginuser"], r["user"], r["count"]] for r in data["per_user"]], ""),
        (f"Failed attempts ({data['failed']['count']})",
         ["result", "path", "exe", "login user", "count"],
         [[r["result"], r["path"], r["exe"], r["loginuser"], r["count"]]
          for r in data["failed"]["top"]], "fail"),
        ("Containers", ["container", "count"],
         [[r["container"], r["count"]] for r in data["per_container"]], ""),
    ]
    body = [f'<section class="wide"><h2>Events per {_h(hist["unit"])}</h2>'
            f'{timeline_svg(hist)}</section>',
            '<section class="wide"><h2>Most changed paths</h2><p class="muted">'
            'Directories count everything under them.</p><ul class="tree" id="paths">'
            f'{_html_tree(data["path_tree"])}</ul></section>']
    for name, cols, rows, cls in sections:
        body.append(f"<section><h2>{_h(name)}</h2>"
                    f"{_html_table(cols, rows, [r[-1] for r in rows], cls)}</section>")
    scanned = data.get("scanned")
    foot = f'<p class="muted">{_h(_scanned_line(scanned))}</p>' if scanned else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_h(title)}</title>"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">"
            f"<style>{CSS}</style></head><body>"
            f"<header><h1>{_h(title)}</h1><p>{data['events']} events from "
            f"{_h(data['first_iso'])} to {_h(data['last_iso'])}</p>{foot}</header>"
            f"<main>{''.join(body)}</main>"
            '<div id="tip" style="position:absolute;display:none;background:#1d2d44;'
            'color:#fff;padding:2px 6px;border-radius:3px;font-size:12px"></div>'
            f"<script>{JS}</script></body></html>\n")
