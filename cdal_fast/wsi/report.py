"""The batch QC report: ``OUT/report.html``, one self-contained page rewritten as inputs finish.

One row per input of the run, in input order: its state (done, complete from an earlier run,
failed with its message, being processed by another run, pending), a thumbnail of the overlay
(objects tinted on the slide), the nucleus-density and vote-uncertainty heatmaps
(:mod:`cdal_fast.wsi.qc`), the counts, IHC positivity, tissue area, timings and warnings. Every
number comes from the input's JSON summary read back from ``OUT`` (the same file a rerun trusts),
so rows of inputs finished by an earlier or a concurrent run show too.

Self-contained: images are ``data:`` URIs (the overlay as a small JPEG, heatmaps as PNGs at one
pixel per cell, scaled up by the browser without smoothing), CSS is inline, there is no script;
while the batch runs the page asks the browser to reload it every :data:`REFRESH_SECONDS`
(``<meta http-equiv="refresh">``), and the final version does not. Written atomically (temporary
name, then rename) after every input, so a viewer never sees half a page. Size: about 20-30 KB per
input (thumbnail and heatmaps). A report that cannot be written is reported once on stderr and never
fails the batch.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..atomic import atomic_output
from .outputs import complete_summary

__all__ = ["REPORT_NAME", "report_name", "BatchReport", "render_page"]

REPORT_NAME = "report.html"
REFRESH_SECONDS = 30
THUMB_SIDE = 320  # px, longest side of the overlay thumbnail
HEATMAP_SIDE = 200  # px, displayed longest side of a heatmap
STATE_LABELS = {"pending": "pending", "done": "done", "skipped": "complete (earlier run)", "failed": "FAILED",
                "locked": "running elsewhere"}


def report_name(summary_name: str) -> str:
    """``report.html`` beside ``run_summary.json``; ``report.shard-I-of-N.html`` for a shard's summary."""
    stem = summary_name[:-5] if summary_name.endswith(".json") else summary_name
    return REPORT_NAME if stem == "run_summary" else "report" + stem[len("run_summary"):] + ".html"


def _data_uri(path: Path, max_side: int, jpeg: bool) -> tuple[str, tuple[int, int]] | None:
    """The image at ``path`` as a data URI (downscaled to ``max_side`` for thumbnails) and its size."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if not jpeg and im.format == "PNG":  # a heatmap PNG as written: its bytes, not a re-encoding
                data, size = path.read_bytes(), im.size
                return f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}", size
            im = im.convert("RGB")
            if jpeg and max(im.size) > max_side:
                k = max_side / max(im.size)
                im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG" if jpeg else "PNG", quality=80)
            size = im.size
    except (OSError, ValueError):
        return None
    mime = "image/jpeg" if jpeg else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", size


def _img(path: Path, alt: str, heatmap: bool) -> str:
    found = _data_uri(path, THUMB_SIDE, jpeg=not heatmap)
    if found is None:
        return '<div class="none">n/a</div>'
    uri, (w, h) = found
    if heatmap:
        k = HEATMAP_SIDE / max(w, h)
        w, h = max(1, round(w * k)), max(1, round(h * k))
    cls = ' class="heat"' if heatmap else ""
    return f'<img{cls} src="{uri}" width="{w}" height="{h}" alt="{html.escape(alt)}">'


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _numbers(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) lines of one input's summary."""
    lines = []
    if "nuclei_count" in s:
        lines.append(("nuclei", f"{_fmt(s['nuclei_count'])} ({_fmt(s.get('nuclei_per_mm2_tissue'))} /mm²)"))
    pos = s.get("positivity")
    if pos:
        counts = pos.get("counts") or {}
        lines.append(("positive", f"{_fmt(pos.get('positive_percent'))} %"))
        lines.append(("H-score", _fmt(pos.get("h_score"))))
        lines.append(("classes", ", ".join(f"{k}\u00a0{_fmt(v)}" for k, v in counts.items())))
    if s.get("tissue_area_um2") is not None:
        lines.append(("tissue", f"{_fmt(s['tissue_area_um2'] / 1e6)} mm²"))
    if "object_fraction" in s:
        lines.append(("object fraction", _fmt(s["object_fraction"])))
    if "tiles_sampled" in s:
        lines.append(("tiles", f"{_fmt(s['tiles_sampled'])} of {_fmt(s.get('tiles_total'))}"))
    timing = f"{_fmt(s.get('seconds'))} s total"
    if s.get("sampler_seconds") is not None:
        timing += f", sampler {_fmt(s['sampler_seconds'])} s"
    nuc = s.get("nuclei")
    if isinstance(nuc, dict) and nuc.get("seconds") is not None:
        timing += f", nuclei {_fmt(nuc['seconds'])} s"
    lines.append(("time", timing))
    return lines


def _legend(s: dict[str, Any], key: str, unit: str) -> str:
    qc = s.get("qc") or {}
    if qc.get(key) is None:
        return ""
    return f'<div class="legend"><span class="ramp"></span>0 – {html.escape(_fmt(qc[key]))} {unit}</div>'


def _row(index: int, name: str, source: str, state: str, message: str, out_dir: Path,
         summary: dict[str, Any] | None) -> str:
    """One input's table row (plain HTML)."""
    esc = html.escape
    cells = [f'<td class="name"><b>{esc(name)}</b><div class="src">{esc(source)}</div></td>',
             f'<td><span class="state {esc(state)}">{esc(STATE_LABELS.get(state, state))}</span></td>']
    if summary is not None:
        base = out_dir / name
        cells.append(f"<td>{_img(base.with_name(base.name + '.overlay.png'), 'overlay of ' + name, False)}</td>")
        cells.append(f"<td>{_img(base.with_name(base.name + '.qc_density.png'), 'density of ' + name, True)}"
                     f"{_legend(summary, 'density_max_per_mm2', 'nuclei/mm²')}</td>")
        cells.append(f"<td>{_img(base.with_name(base.name + '.qc_uncertainty.png'), 'uncertainty of ' + name, True)}"
                     f"{_legend(summary, 'uncertainty_max', 'vote std')}</td>")
        dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _numbers(summary))
        cells.append(f'<td class="num"><dl>{dl}</dl></td>')
    else:
        cells.append('<td colspan="4"></td>')
    notes = [f'<div class="error">{esc(message)}</div>'] if message and state == "failed" else []
    if message and state == "locked":
        notes.append(f"<div>{esc(message)}</div>")
    notes += [f'<div class="warn">{esc(w)}</div>' for w in (summary or {}).get("warnings") or []]
    cells.append(f"<td>{''.join(notes)}</td>")
    return f'<tr id="input-{index}" class="{esc(state)}">' + "".join(cells) + "</tr>"


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} .meta{color:#555;margin-bottom:1em}
table{border-collapse:collapse;background:#fff} th,td{border:1px solid #ddd;padding:6px;vertical-align:top}
th{background:#eee;text-align:left} .src{color:#777;font-size:.85em}
td.name{min-width:9em;max-width:14em;word-break:break-all}
img{display:block} img.heat{image-rendering:pixelated;image-rendering:crisp-edges}
dl{display:grid;grid-template-columns:auto auto;gap:0 .8em;margin:0} dt{color:#666} dd{margin:0}
td.num{min-width:15em;max-width:19em}
.state{padding:2px 6px;border-radius:3px;background:#ddd;white-space:nowrap}
.state.done,.state.skipped{background:#cfe9cf} .state.failed{background:#f4c2c2} .state.pending{background:#eee}
.state.locked{background:#fde9b5} .error{color:#a00;white-space:pre-wrap;overflow-wrap:anywhere;max-width:22em}
.warn{color:#8a5a00;overflow-wrap:anywhere;max-width:22em} .none{color:#999;width:6em}
.legend{font-size:.8em;color:#555;margin-top:2px}
.ramp{display:inline-block;width:60px;height:8px;margin-right:4px;vertical-align:middle;
background:linear-gradient(90deg,#181440,#582480,#aa3c78,#e8783c,#fad678,#fffadc)}
"""


def render_page(rows: Iterable[str], counts: dict[str, int], out_dir: Path, final: bool, seconds: float | None,
                interrupted: bool = False) -> str:
    """The whole page around the rows."""
    refresh = "" if final else f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
    ended = "interrupted" if interrupted else "finished"
    state = (f"{ended} after {seconds:.0f} s" if final and seconds is not None else
             ended if final else f"running: this page reloads itself every {REFRESH_SECONDS} s")
    tally = ", ".join(f"{n} {STATE_LABELS.get(k, k)}" for k, n in counts.items() if n)
    head = ("<tr><th>input</th><th>state</th><th>overlay</th><th>nucleus density</th><th>vote uncertainty</th>"
            "<th>numbers</th><th>warnings / failure</th></tr>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{refresh}'
            f"<title>cdal-fast report: {html.escape(out_dir.name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>cdal-fast batch report</h1><div class=\"meta\">{html.escape(str(out_dir))} · {html.escape(tally)}"
            f" · {html.escape(state)} · updated {time.strftime('%Y-%m-%d %H:%M:%S')}</div>"
            f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></body></html>\n")


class BatchReport:
    """The report of one run over ``files`` (output ``names`` under ``out_dir``), written to ``path``.

    :meth:`record` takes each input's outcome (its ``path``, ``status`` and ``error``); :meth:`write`
    renders the page. Finished rows are rendered once and kept (an input's images and summary do
    not change after it is done), so a rewrite costs the new rows plus joining strings.
    """

    def __init__(self, out_dir: Path, files: list[Path], names: dict[Path, str], path: Path) -> None:
        self.out_dir, self.path = Path(out_dir), Path(path)
        self.inputs = [(str(f), names.get(f, f.stem)) for f in files]
        self.state: dict[str, tuple[str, str]] = {src: ("pending", "") for src, _ in self.inputs}
        self._rows: dict[str, str] = {}
        self.error: str | None = None

    def record(self, source: str, status: str, error: str = "") -> None:
        self.state[source] = (status, error)
        self._rows.pop(source, None)

    def _render_row(self, i: int, source: str, name: str) -> str:
        state, message = self.state.get(source, ("pending", ""))
        if source in self._rows:
            return self._rows[source]
        summary = complete_summary(self.out_dir / f"{name}.json") if state in ("done", "skipped") else None
        row = _row(i, name, source, state, message, self.out_dir, summary)
        if state in ("done", "skipped", "failed"):
            self._rows[source] = row
        return row

    def write(self, final: bool = False, seconds: float | None = None, interrupted: bool = False) -> bool:
        """Render and atomically replace the page; False (and one message on stderr) when it fails.
        ``final``: the run has ended (``interrupted``: by an error or Ctrl-C), no more reloading."""
        try:
            rows = [self._render_row(i, src, name) for i, (src, name) in enumerate(self.inputs)]
            counts: dict[str, int] = {k: 0 for k in STATE_LABELS}
            for state, _ in self.state.values():
                counts[state] = counts.get(state, 0) + 1
            page = render_page(rows, counts, self.out_dir, final, seconds, interrupted)
            with atomic_output(self.path) as tmp:
                tmp.write_text(page, encoding="utf-8")
            return True
        except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
            if self.error is None:
                print(f"warn  {self.path} could not be written: {type(exc).__name__}: {exc}", file=sys.stderr)
            self.error = f"{type(exc).__name__}: {exc}"
            return False

