"""The browsable report: one self-contained ``index.html`` (inline CSS, script and data; no server,
network or CDN) over PNGs in ``images/``, so it opens from a local folder or a CI artifact.

It shows the query grid; for the selected query (click, the arrow keys, or ``index.html#q=3``),
the query enlarged with its condition (class or caption), and each method's top-k side by side with rank,
name (file, caption, class or index), score and, for influence methods, the predicted rise of the
query's measurement (named) were the image removed (a ranking more than a size);
per-hit artifacts (e.g. an ensemble's exact counterfactual) appear beside each hit, and the
groups of largest summed score above the hits when the run has groups. Images load
lazily, so a report of 1,000 queries opens at once.

:func:`write_run_report` writes one run's report beside its ``topk.json`` (``wherefrom attribute``
does); :func:`merge_reports` puts several runs over the same queries into one
(the ``wherefrom view`` command); :func:`inline_report` is the same page with the images
embedded, for notebooks (:func:`wherefrom.view`, ``Attribution._repr_html_``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from wherefrom.errors import WherefromError
from wherefrom.io import atomic_path, to_uint8, write_bytes, write_json

IMAGES = "images"


def png_bytes(image: Tensor, scale: int = 1) -> bytes:
    """One image ([-1, 1], C x H x W) as PNG bytes, upscaled ``scale`` x (nearest)."""
    from PIL import Image

    arr = to_uint8(image[None])[0].repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A PNG embedded in the page itself."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def run_images(top: dict[str, Any], queries: Tensor, train_images: Tensor, artifacts: dict[str, Tensor],
               show: Callable[[Tensor], Tensor], save: Callable[[str, bytes], str]) -> dict[str, Any]:  # fmt: skip
    """The report's data for one run (``top``: its ``topk.json``), each image passed once to
    ``save(name, png)``, which returns how the page refers to it (a relative path or a data URI)."""
    refs: dict[str, str] = {}

    def image(name: str, x: Tensor) -> str:
        if name not in refs:
            refs[name] = save(name, png_bytes(show(x[None])[0]))
        return refs[name]

    rows = []
    for row in top["queries"]:
        q = row["query"]
        hits = [{"index": i, "score": s, "image": image(f"train_{i}.png", train_images[i])} for i, s in zip(row["indices"], row["scores"])]
        for key in ("names", "predicted_change"):
            for hit, value in zip(hits, row.get(key, [])):
                hit[key.removesuffix("s")] = value
        for name, images in artifacts.items():  # per-hit rows in rank order, e.g. an ensemble's counterfactual without each hit
            for r, hit in enumerate(hits[: images.shape[1]]):
                hit.setdefault("artifacts", {})[name] = image(f"{name}_{q}_{r}.png", images[q, r])
        extra = {key: row[key] for key in ("groups", "condition") if key in row}
        rows.append({"query": image(f"query_{q}.png", queries[q]), "hits": hits, **extra})
    models = [m["name"] for m in top.get("models", [])]
    return {"method": top["method"], "unit": top.get("unit", ""), "measurement": top.get("measurement", "measurement"), "models": models, "rows": rows}


def page(runs: Sequence[dict[str, Any]], title: str, figures: Sequence[str] = ()) -> str:
    """The report page over ``runs`` (:func:`run_images`' data; the queries are the first run's),
    with evaluation ``figures`` (image references) below."""
    # no "<" in the data block: a name such as "</script><!--<script>" cannot end or comment it out
    data = json.dumps({"title": title, "runs": list(runs), "figures": list(figures)}).replace("<", "\\u003c")
    return PAGE.replace("{{title}}", html.escape(title)).replace("{{data}}", data)


def write_run_report(out: str | Path, top: dict[str, Any], queries: Tensor, train_images: Tensor, artifacts: dict[str, Tensor],
                     show: Callable[[Tensor], Tensor]) -> Path:  # fmt: skip
    """Write ``out/index.html`` and ``out/images/`` for one run (``top``: its ``topk.json``)."""
    out = Path(out)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)

    def save(name: str, png: bytes) -> str:
        write_bytes(out / IMAGES / name, png)
        return f"{IMAGES}/{name}"

    run = run_images(top, queries, train_images, artifacts, show, save)
    write_json(out / IMAGES / "run.json", run)  # what `wherefrom view` merges
    write_bytes(out / "index.html", page([run], f"wherefrom: {top['method']}"))
    return out / "index.html"


def merge_reports(runs: Sequence[str | Path], out: str | Path, figures: Sequence[str | Path] = ()) -> Path:
    """One report of several runs over the same queries (each written by ``wherefrom attribute``):
    ``out/index.html`` with the runs' images copied into ``out/images/<k>/``, and evaluation
    ``figures`` (PNGs, e.g. the demo's or a benchmark's) shown below them."""
    out = Path(out)
    missing = [str(f) for f in figures if not Path(f).is_file()]
    if missing:
        raise WherefromError(f"figure {missing[0]!r} does not exist; pass PNG files")
    loaded = []
    for run in map(Path, runs):  # everything is read and checked before anything is written
        path = run / IMAGES / "run.json"
        try:
            data = json.loads(path.read_text())
            files = [run / r["query"] for r in data["rows"]] + [run / f for r in data["rows"] for h in r["hits"] for f in (h["image"], *h.get("artifacts", {}).values())]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WherefromError(f"{str(run)!r} holds no readable report ({path}: {e}); pass folders written by `wherefrom attribute`") from None
        gone = next((f for f in files if not f.is_file()), None)
        if gone is not None:
            raise WherefromError(f"the report in {str(run)!r} lacks its image {str(gone)!r}; rerun the attribution that wrote it")
        loaded.append((run, data))
    digests = [[hashlib.sha256((run / row["query"]).read_bytes()).hexdigest() for row in data["rows"]] for run, data in loaded]
    for (run, _), d in zip(loaded[1:], digests[1:]):
        if d != digests[0]:
            raise WherefromError(f"{str(run)!r} attributes other queries than {str(loaded[0][0])!r}; merge runs over the same queries")
    merged = []
    for k, (run, data) in enumerate(loaded):
        target = out / IMAGES / str(k)
        target.mkdir(parents=True, exist_ok=True)

        def moved(rel: str, run: Path = run, target: Path = target, k: int = k) -> str:
            with atomic_path(target / Path(rel).name) as tmp:
                shutil.copyfile(run / rel, tmp)
            return f"{IMAGES}/{k}/{Path(rel).name}"

        for row in data["rows"]:
            row["query"] = moved(row["query"])
            for hit in row["hits"]:
                hit["image"] = moved(hit["image"])
                hit["artifacts"] = {n: moved(p) for n, p in hit.get("artifacts", {}).items()}
        merged.append(data)
    shown = []
    for k, figure in enumerate(map(Path, figures)):
        with atomic_path(out / IMAGES / f"figure_{k}{figure.suffix}") as tmp:
            shutil.copyfile(figure, tmp)
        shown.append(f"{IMAGES}/figure_{k}{figure.suffix}")
    write_bytes(out / "index.html", page(merged, "wherefrom: " + ", ".join(d["method"] for d in merged), shown))
    return out / "index.html"


def inline_report(top: dict[str, Any], queries: Tensor, train_images: Tensor, artifacts: dict[str, Tensor], show: Callable[[Tensor], Tensor]) -> str:
    """The report page of one run with every image embedded (a notebook cell's HTML)."""
    return page([run_images(top, queries, train_images, artifacts, show, lambda name, png: data_uri(png))], f"wherefrom: {top['method']}")


class Report:
    """A report page shown inline by a notebook (in an ``iframe``, so its script and style stay
    apart from the notebook's); :meth:`save` writes it as one self-contained HTML file."""

    def __init__(self, page: str) -> None:
        self.page = page

    def _repr_html_(self) -> str:
        return f'<iframe srcdoc="{html.escape(self.page, quote=True)}" style="width: 100%; height: 640px; border: 0"></iframe>'

    def save(self, path: str | Path) -> Path:
        write_bytes(path, self.page)
        return Path(path)


def summary_html(table: dict[str, Any], queries: Tensor, limit: int = 8) -> str:
    """A static table of the first ``limit`` queries' top-k (``table``: ``topk.json``'s content):
    each query's image beside its hits' ranks, names, scores and predicted changes."""
    uri = lambda x: data_uri(png_bytes(x, scale=4))  # noqa: E731
    change = "predicted_change" in (table["queries"][0] if table["queries"] else {})
    measurement = table.get("measurement", "measurement")
    head = "<tr><th>#</th><th>training image</th><th>score</th>" + (f"<th>query {html.escape(measurement)} without it</th>" if change else "") + "</tr>"
    parts = [f"<p><b>{html.escape(table['method'])}</b>: {html.escape(table.get('unit', ''))}</p>"]
    for row in table["queries"][:limit]:
        names = row.get("names", [str(i) for i in row["indices"]])
        lines = [
            f"<tr><td>{r + 1}</td><td>{html.escape(n)} ({i})</td><td>{s:.4g}</td>" + (f"<td>{row['predicted_change'][r]:.3g}</td>" if change else "") + "</tr>"
            for r, (i, n, s) in enumerate(zip(row["indices"], names, row["scores"]))
        ]
        parts.append(f'<div style="display: inline-block; vertical-align: top; margin: 0 1em 1em 0"><img src="{uri(queries[row["query"]])}" '
                     f'alt="query {row["query"]}" style="image-rendering: pixelated"><table>{head}{"".join(lines)}</table></div>')  # fmt: skip
    if len(table["queries"]) > limit:
        parts.append(f"<p>... {len(table['queries']) - limit} more queries (wherefrom.view(result, data) shows them all)</p>")
    return "".join(parts)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1em; color: #222; }
#queries { display: flex; flex-wrap: wrap; gap: 4px; max-height: 40vh; overflow-y: auto; }
#queries button { padding: 1px; border: 2px solid transparent; background: none; cursor: pointer; }
#queries button.selected { border-color: #d33; }
img { image-rendering: pixelated; width: 64px; height: 64px; object-fit: contain; background: #eee; }
#methods { display: flex; gap: 2em; margin-top: 1em; align-items: flex-start; }
.method h2 { font-size: 1.1em; margin: 0; } .unit { color: #666; max-width: 24em; font-size: 0.85em; }
.hit { display: flex; gap: 0.5em; margin: 4px 0; align-items: center; }
img.figure { width: auto; height: auto; max-width: 100%; image-rendering: auto; background: none; margin-top: 1em; }
#selected { display: flex; gap: 1em; align-items: center; margin-top: 1em; } #selected img { width: 160px; height: 160px; }
.hit figcaption span { display: block; } .score, .change { font-variant-numeric: tabular-nums; color: #444; }
</style></head>
<body>
<h1>{{title}}</h1>
<p>Queries: click one, or use the arrow keys. Each column: a method's top-k training images for the selected query.</p>
<div id="queries"></div>
<div id="selected"><img id="query-large" alt="the selected query"><div><h2 id="current"></h2><p id="condition"></p></div></div>
<div id="methods"></div>
<div id="figures"></div>
<script id="data" type="application/json">{{data}}</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const runs = data.runs, count = runs[0].rows.length;
const el = (tag, attrs = {}, text) => { const e = document.createElement(tag); Object.assign(e, attrs); if (text !== undefined) e.textContent = text; return e; };
const img = (src, alt) => el("img", {src, alt, title: alt, loading: "lazy"});
const grid = document.getElementById("queries");
runs[0].rows.forEach((row, q) => { const b = el("button", {title: "query " + q}); b.dataset.query = q; b.append(img(row.query, "query " + q)); b.onclick = () => select(q); grid.append(b); });
function select(q) {
  q = Math.max(0, Math.min(count - 1, q));
  grid.querySelectorAll("button").forEach(b => b.classList.toggle("selected", +b.dataset.query === q));
  document.getElementById("current").textContent = "query " + q;
  document.getElementById("query-large").src = runs[0].rows[q].query;
  const condition = runs[0].rows[q].condition;
  document.getElementById("condition").textContent = condition === undefined ? "" : "conditioned on: " + condition;
  const methods = document.getElementById("methods"); methods.replaceChildren();
  for (const run of runs) {
    const col = el("section", {className: "method"}); col.dataset.method = run.method;
    col.append(el("h2", {}, run.method), el("p", {className: "unit"}, run.unit));
    if ((run.models || []).length) col.append(el("p", {className: "models"}, "averaged over " + run.models.length + " models: " + run.models.join(", ")));
    if (run.rows[q].hits.some(h => h.predicted_change !== undefined))
      col.append(el("p", {className: "unit"}, "Predicted change: how much the query's " + run.measurement + " would rise were the image removed and the model retrained; it ranks the images, its size is rough."));
    if (run.rows[q].groups) {
      const list = el("ol", {className: "groups", title: "groups by summed score"});
      for (const g of run.rows[q].groups) { const li = el("li", {}, g.group + ": " + g.total.toPrecision(4)); li.dataset.group = g.group; li.dataset.total = g.total; list.append(li); }
      col.append(el("p", {className: "unit"}, "groups, by summed score:"), list);
    }
    run.rows[q].hits.forEach((hit, r) => {
      const fig = el("figure", {className: "hit"}); fig.dataset.index = hit.index; fig.dataset.score = hit.score;
      fig.append(img(hit.image, "training image " + hit.index));
      for (const [name, src] of Object.entries(hit.artifacts || {})) fig.append(img(src, name));
      const cap = el("figcaption");
      cap.append(el("span", {className: "rank"}, "#" + (r + 1)), el("span", {className: "name"}, hit.name ?? String(hit.index)),
                 el("span", {className: "score"}, "score " + hit.score.toPrecision(4)));
      if (hit.predicted_change !== undefined)
        cap.append(el("span", {className: "change"}, "query " + run.measurement + " without it: " + (hit.predicted_change >= 0 ? "+" : "") + hit.predicted_change.toPrecision(3)));
      fig.append(cap); col.append(fig);
    });
    methods.append(col);
  }
  history.replaceState(null, "", "#q=" + q); current = q;
}
for (const src of data.figures || []) { const f = el("img", {src, alt: "evaluation figure", loading: "lazy"}); f.className = "figure"; document.getElementById("figures").append(f); }
let current = 0;
document.addEventListener("keydown", e => { if (e.key === "ArrowRight" || e.key === "ArrowDown") select(current + 1); if (e.key === "ArrowLeft" || e.key === "ArrowUp") select(current - 1); });
const m = location.hash.match(/q=(\\d+)/);
if (count) select(m ? +m[1] : 0); else document.getElementById("current").textContent = "no queries";
</script></body></html>
"""

__all__ = ["Report", "inline_report", "summary_html", "merge_reports", "page", "png_bytes", "run_images", "write_run_report"]
