"""The report's layout: one self-contained HTML page (plotly.js inlined, works offline).

The page records its own health for headless checks: script errors and console errors land in
`body[data-errors]` and the number of rendered charts in `body[data-charts]`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

GENERATOR = "dtlab report"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2937;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#cbd5e1;font-size:13px}main{padding:8px 32px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;margin:18px 0;padding:12px 20px}
h2{font-size:18px;margin:6px 0 8px}p.blurb{color:#555;font-size:13px;margin:0 0 8px}
table{border-collapse:collapse;font-size:12px;margin:8px 0;display:block;overflow-x:auto}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:right;white-space:nowrap}th{background:#f3f4f6}
td:first-child,th:first-child{text-align:left}.note{color:#92400e;background:#fffbeb;border:1px solid #fde68a;
padding:8px 12px;border-radius:6px;font-size:13px}ul.problems li{margin:2px 0;font-size:13px}
nav a{color:#93c5fd;margin-right:14px;font-size:13px}p.lead{font-size:14px;margin:16px 0 0}
"""

HEALTH_HEAD = """<script>
window.__dtlabErrors = [];
window.addEventListener('error', function (e) { window.__dtlabErrors.push(String(e.message || e)); });
(function () { var ce = console.error; console.error = function () {
  window.__dtlabErrors.push(Array.prototype.map.call(arguments, String).join(' '));
  ce.apply(console, arguments); }; })();
</script>"""

HEALTH_TAIL = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  document.body.setAttribute('data-errors', JSON.stringify(window.__dtlabErrors));
  document.body.setAttribute('data-charts', String(document.querySelectorAll('.plotly-graph-div .main-svg').length
    ? document.querySelectorAll('.plotly-graph-div').length : 0));
}, 0); });
</script>"""


@dataclass
class Section:
    title: str
    blurb: str = ""
    items: list[Any] = field(default_factory=list)  # plotly figures, DataFrames, or str notes


def _table(df: pd.DataFrame) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != v:
                return ""
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return html.escape(str(v)) if v is not None else ""

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(title: str, subtitle: str, sections: list[Section], problems: list[str], plotly_js: str,
           lead: str = "") -> tuple[str, int]:
    """The page and the number of charts on it; `lead` is said first, above everything else."""
    charts = 0
    parts = []
    for i, sec in enumerate(sections):
        body = [f"<h2 id='s{i}'>{html.escape(sec.title)}</h2>"]
        if sec.blurb:
            body.append(f"<p class='blurb'>{html.escape(sec.blurb)}</p>")
        for item in sec.items:
            if isinstance(item, pd.DataFrame):
                body.append(_table(item) if not item.empty else "<p class='note'>no data</p>")
            elif isinstance(item, str):
                body.append(f"<p class='note'>{html.escape(item)}</p>")
            else:
                charts += 1
                body.append(item.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{charts}",
                                         config={"displaylogo": False, "responsive": True}))
        parts.append(f"<section>{''.join(body)}</section>")
    nav = "".join(f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections))
    prob = ""
    if problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
        prob = f"<section><h2>What is missing or odd</h2><ul class='problems'>{items}</ul></section>"
    lead_html = f"<p class='lead'>{html.escape(lead)}</p>" if lead else ""
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='generator' content='{GENERATOR}'>"
            f"<meta name='dtlab-charts' content='{charts}'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style>{HEALTH_HEAD}<script>{plotly_js}</script></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{nav}</nav></header>"
            f"<main>{lead_html}{prob}{''.join(parts)}</main>{HEALTH_TAIL}</body></html>")
    return page, charts
