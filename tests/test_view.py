"""The browsable report: opened in headless Chromium, the page shows for the selected query exactly
the top-k names and scores of ``topk.json``; ``wherefrom view`` merges runs over the same queries."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import wherefrom
from wherefrom import cli
from wherefrom.attribution.baseline import Pixel, Random
from wherefrom.attribution.report import write_attribution
from wherefrom.datamodules import DigitsDataModule, FolderDataModule

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (.ci/run installs Debian's: apt-get install chromium)")


class Hits(HTMLParser):
    """Each method section's hits (index, score, name, predicted change) in a rendered page."""

    def __init__(self) -> None:
        super().__init__()
        self.methods: dict[str, list[dict]] = {}
        self.groups: dict[str, list[dict]] = {}  # per method: the groups of largest summed score
        self.large, self.condition, self.notes = None, "", []  # the selected query enlarged, its condition, the methods' notes
        self._method, self._span, self._p = None, None, None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "section" and "data-method" in a:
            self._method = a["data-method"]
            self.methods[self._method] = []
        elif tag == "li" and "data-group" in a:
            self.groups.setdefault(self._method, []).append({"group": a["data-group"], "total": float(a["data-total"])})
        elif tag == "figure" and self._method:
            self.methods[self._method].append({"index": int(a["data-index"]), "score": float(a["data-score"])})
        elif tag == "span":
            self._span = a.get("class")
        elif tag == "img" and a.get("id") == "query-large":
            self.large = a.get("src")
        elif tag == "p":
            self._p = a.get("id") or a.get("class")

    def handle_data(self, data: str) -> None:
        if self._span in ("name", "change"):
            self.methods[self._method][-1][self._span] = data
        elif self._p == "condition":
            self.condition += data
        elif self._p == "unit" and data.startswith("Predicted change"):
            self.notes.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._span = None
        elif tag == "p":
            self._p = None


def rendered(page: Path, query: int) -> Hits:
    """The page as Chromium renders it with ``query`` selected (``#q=``, as a click or the arrow keys do)."""
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom", f"{page.resolve().as_uri()}#q={query}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    parser = Hits()
    parser.feed(dom)
    return parser


def folder_data(root: Path) -> FolderDataModule:
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / f"class{i % 2}" / f"img{i}.png")
    dm = FolderDataModule(str(root), mode="L")
    dm.setup()
    return dm


@browser
def test_the_report_shows_topk_json_for_the_selected_query(tmp_path):
    dm = folder_data(tmp_path / "data")
    result = Pixel().attribute(None, dm, dm.images[[4, 1, 2]] * 0.5)
    # as an influence method's: the predicted change is shown; names with markup stay text
    names = [f"</script><!--<script>{n} & <b>" for n in result.names]
    conditions = ["a four", "a one", "a <two>"]  # issue 38, item 9: what each query was conditioned on, shown with it
    result = dataclasses.replace(result, removal_scale=0.5, names=names, conditions=conditions, info={"measurement": "loss"})
    write_attribution(tmp_path / "run", result, dm.images, top_k=3)
    top = json.loads((tmp_path / "run" / "topk.json").read_text())["queries"]
    for q in (0, 2):
        page = rendered(tmp_path / "run" / "index.html", q)
        hits = page.methods["pixel"]
        assert page.large == f"images/query_{q}.png" and page.condition == f"conditioned on: {conditions[q]}" == f"conditioned on: {top[q]['condition']}"
        assert page.notes == ["Predicted change: how much the query's loss would rise were the image removed and the model retrained; it ranks the images, its size is rough."]
        assert all(h["change"].startswith("query loss without it: ") for h in hits)
        assert [h["index"] for h in hits] == top[q]["indices"] and [h["score"] for h in hits] == top[q]["scores"]
        assert [h["name"] for h in hits] == top[q]["names"] == [names[i] for i in top[q]["indices"]]
        assert all(n.split(">")[-2].endswith(".png & <b") for n in top[q]["names"])  # each folder file's name inside the markup
        assert [float(h["change"].split(": ")[1]) for h in hits] == pytest.approx(top[q]["predicted_change"], rel=5e-3)  # 3 digits shown


@browser
def test_view_merges_two_methods_over_the_same_queries(tmp_path, capsys):
    dm = DigitsDataModule(subset=list(range(40)), groups="labels")
    dm.setup()
    queries = dm.images[[3, 7, 11]] * 0.9
    runs = [tmp_path / m.name for m in (Pixel(), Random())]
    for method, run in zip((Pixel(), Random()), runs):
        write_attribution(run, method.attribute(None, dm, queries), dm.images, top_k=4, group_ids=dm.group_ids)
    cli.main(["view", *map(str, runs), "--out", str(tmp_path / "merged")])
    page = rendered(tmp_path / "merged" / "index.html", 2)
    shown = page.methods
    assert list(shown) == ["pixel", "random"]
    # per-group totals: the summed scores of each digit class's training images, largest first
    scores = np.load(runs[0] / "scores.npy")[2]
    totals = {str(c): float(sum(scores[i] for i in range(40) if dm.labels[i] == c)) for c in set(dm.labels[:40].tolist())}
    want = sorted(totals.items(), key=lambda kv: -kv[1])[:4]
    assert [(g["group"], g["total"]) for g in page.groups["pixel"]] == [(k, pytest.approx(v, rel=1e-6)) for k, v in want]
    for run in runs:
        row = json.loads((run / "topk.json").read_text())["queries"][2]
        hits = shown[run.name]
        assert [h["index"] for h in hits] == row["indices"] and [h["score"] for h in hits] == row["scores"] and [h["name"] for h in hits] == row["names"]
    # another run's queries, or an existing report, are refused before anything is written
    write_attribution(tmp_path / "other", Pixel().attribute(None, dm, queries[:2]), dm.images, top_k=4)
    before = (tmp_path / "merged" / "index.html").read_bytes()
    (tmp_path / "broken").mkdir()
    for args, message in ((["view", str(runs[0]), str(tmp_path / "other"), "--out", str(tmp_path / "m2")], "other queries"),
                          (["view", str(runs[0]), str(tmp_path / "broken"), "--out", str(tmp_path / "m2")], "no readable report"),
                          (["view", *map(str, runs), "--out", str(tmp_path / "merged")], "--overwrite")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            cli.main(args)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m2").exists() and (tmp_path / "merged" / "index.html").read_bytes() == before


def test_notebook_views_embed_their_images():
    dm = DigitsDataModule(subset=list(range(30)))
    dm.setup()
    result = Pixel().attribute(None, dm, dm.images[[5, 6]])
    page = wherefrom.view(result, dm, top_k=3)
    assert page.page.count('"image": "data:image/png;base64,') == 2 * 3 and "images/" not in page.page
    assert page._repr_html_().startswith("<iframe srcdoc=")
    table = result._repr_html_()
    idx, _ = result.topk(5)
    assert table.count("<tr>") == 2 * 6 and all(f"{DigitsDataModule.class_names[dm.labels[i]]} ({i})" in table for i in idx.ravel())
