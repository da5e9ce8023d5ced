"""profiler.html in a real browser: headless Chromium loads it from file:// (no network).

Driven by the ``playwright`` package (dev extras) with Debian's ``chromium`` (``make test``
installs it when it is missing and it can).  Skipped, with the reason, only when either is
unavailable.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest
from qatkit.profiler.report.html import render_html

_spec = importlib.util.spec_from_file_location("_qk_test_html", Path(__file__).with_name(
    "test_html.py"))
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
resnet_like_tables = _fixtures.resnet_like_tables
XSS_SCRIPT, XSS_ATTR = _fixtures.XSS_SCRIPT, _fixtures.XSS_ATTR

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
CHROMIUM = os.environ.get("QATKIT_CHROMIUM") or shutil.which("chromium") or next(
    (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
if CHROMIUM is None:
    pytest.skip("no chromium binary (apt-get install chromium; `make test` does it when it "
                "can, as root with apt-get)", allow_module_level=True)

N_LAYERS = 130  # > 100 rows: the tables paginate


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tables = resnet_like_tables(N_LAYERS, bad=XSS_SCRIPT, extra_names=(XSS_SCRIPT, XSS_ATTR))
    path = render_html(tables, tmp_path_factory.mktemp("report") / "profiler.html",
                       title=f"report {XSS_SCRIPT}", meta={"model 2": XSS_ATTR})
    return path, tables


@pytest.fixture()
def page(browser, report):
    """The report page, with console messages, page errors and dialogs collected."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    events: list[str] = []
    pg.on("console", lambda m: events.append(f"console.{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: events.append(f"pageerror: {e}"))
    pg.on("dialog", lambda d: (events.append(f"dialog: {d.message}"), d.dismiss()))
    pg.on("request", lambda r: None if r.url.startswith(("file:", "data:", "about:"))
          else events.append(f"network: {r.url}"))
    pg.goto(report[0].resolve().as_uri())
    pg.wait_for_load_state("load")
    pg.events = events
    yield pg
    context.close()


def _column(page, section: str, header: str) -> list[str]:
    heads = page.locator(f"#{section} thead th").all_inner_texts()
    j = [h.strip() for h in heads].index(header)
    return page.locator(f"#{section} tbody tr").evaluate_all(
        f"rows => rows.map(r => r.cells[{j}].textContent)")


def _show_all(page, section: str) -> None:
    page.locator(f"#{section} input.qk-all").check()


def test_loads_without_errors_and_screenshots(page, tmp_path: Path) -> None:
    assert page.title() == f"report {XSS_SCRIPT}"
    assert page.locator("#verdict").is_visible()
    assert page.locator("#sec-statistics tbody tr").count() == 100  # first page only
    shot = tmp_path / "profiler.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000, "the screenshot is nearly blank"
    assert page.events == [], page.events


def test_header_click_sorts_numbers_ascending_then_descending(page, report) -> None:
    sec = "sec-similarity-per-layer"
    _show_all(page, sec)
    raw = report[1]["similarity_per_layer"]["Similarity"].tolist()
    before = _column(page, sec, "Similarity")
    assert before == [f"{v:.6f}" for v in raw]  # execution order, 6 decimals
    page.locator(f"#{sec} th", has_text="Similarity").click()
    assert page.locator(f"#{sec} th", has_text="Similarity").get_attribute("aria-sort") == \
        "ascending"
    assert _column(page, sec, "Similarity") == [f"{v:.6f}" for v in sorted(raw)]
    page.locator(f"#{sec} th", has_text="Similarity").click()
    assert _column(page, sec, "Similarity") == [f"{v:.6f}" for v in sorted(raw, reverse=True)]
    assert page.events == [], page.events


def test_sort_uses_raw_values_not_display_text(page, report) -> None:
    sec = "sec-similarity-end-to-end"
    errors = report[1]["similarity_end_to_end"]["Acc Error (float atol)"].tolist()
    page.locator(f"#{sec} th", has_text="Acc Error (float atol)").click()
    cells = _column(page, sec, "Acc Error (float atol)")
    assert len(cells) == 100
    values = [float(c) for c in cells]  # "9.628e-5" and "0.1785" sort as numbers
    assert values == sorted(values) and min(values) == pytest.approx(min(errors), rel=1e-3)
    assert any("e-" in c for c in cells), "the smallest errors are shown in exponent form"


def test_text_columns_sort_naturally(page) -> None:
    sec = "sec-called-count"
    page.locator(f"#{sec} th", has_text="Module Name").click()
    names = _column(page, sec, "Module Name")
    layers = [int(m.group(1)) for n in names if (m := re.match(r"layer(\d+)\.0\.conv1$", n))]
    assert layers == sorted(layers) and layers[:3] == [1, 2, 3] and max(layers) >= 10


def test_filter_box_filters(page, report) -> None:
    sec = "sec-similarity-end-to-end"
    box = page.locator(f"#{sec} input.qk-filter")
    box.fill("layer2.1")
    names = _column(page, sec, "Module Name")
    expected = [n for n in report[1]["similarity_end_to_end"]["Module Name"] if "layer2.1" in n]
    assert names == expected and len(expected) == 4
    assert "of 4 (filtered from" in page.locator(f"#{sec} .qk-status").inner_text()
    box.fill("layer2.1 conv")  # every word must match
    assert _column(page, sec, "Module Name") == ["layer2.1.conv1", "layer2.1.conv2"]
    box.fill("no-such-layer")
    assert page.locator(f"#{sec} tbody tr").count() == 0
    box.fill("")
    assert page.locator(f"#{sec} tbody tr").count() == 100


def test_pagination_and_show_all(page, report) -> None:
    sec = "sec-statistics"
    n = len(report[1]["statistics"])
    first = _column(page, sec, "Module Name")
    stats = report[1]["statistics"]
    assert _column(page, sec, "Scale")[:2] == ["\u2013", f"{stats['Scale'][1]:.4g}"]  # NaN: dash
    assert _column(page, sec, "Arg")[:3] == [str(a) for a in stats["Arg"][:3]]
    page.locator(f"#{sec} .qk-pager button", has_text="Next").click()
    second = _column(page, sec, "Module Name")
    assert len(first) == len(second) == 100
    assert second == report[1]["statistics"]["Module Name"].tolist()[100:200]
    assert page.locator(f"#{sec} .qk-status").inner_text().startswith("Rows 101\u2013200 of")
    _show_all(page, sec)
    assert page.locator(f"#{sec} tbody tr").count() == n


def test_model_strings_stay_text(page) -> None:
    assert page.evaluate("document.scripts.length") == 2
    assert page.evaluate("document.querySelectorAll('[onmouseover]').length") == 0
    assert page.evaluate("""() => [...document.querySelectorAll('*')].filter(
        el => [...el.attributes].some(a => a.name.startsWith('on'))).length""") == 0
    sec = "sec-similarity-end-to-end"
    page.locator(f"#{sec} input.qk-filter").fill("alert")
    assert _column(page, sec, "Module Name") == [XSS_SCRIPT, XSS_ATTR]
    assert XSS_ATTR in page.locator("header .qk-meta").inner_text()
    assert page.locator("#verdict").get_by_text(XSS_SCRIPT).count() >= 1
    assert page.events == [], page.events  # no alert() dialog


def test_shared_rows_are_red(page) -> None:
    row = page.locator("#sec-similarity-end-to-end tbody tr.shared").first
    assert row.locator("td").nth(1).inner_text().endswith(".relu(1)")
    assert row.locator("td").nth(1).evaluate("td => getComputedStyle(td).color") == \
        "rgb(198, 40, 40)"
    plain = page.locator("#sec-similarity-end-to-end tbody tr:not(.shared) td").nth(1)
    assert plain.evaluate("td => getComputedStyle(td).color") != "rgb(198, 40, 40)"


def test_chart_points_show_and_find_layers(page, report) -> None:
    per = report[1]["similarity_per_layer"]
    point = page.locator('#chart circle[data-table="sec-similarity-per-layer"]').nth(12)
    tip = point.locator("title").text_content()
    assert tip.startswith(f"#12 {per['Module Name'][12]} (")
    assert tip.endswith(f"per layer (same input): {per['Similarity'][12]:.6f}")
    point.hover()
    point.click()
    assert page.locator("#sec-similarity-per-layer input.qk-filter").input_value() == \
        per["Module Name"][12]
    assert _column(page, "sec-similarity-per-layer", "Module Name")[0] == per["Module Name"][12]


def test_findings_sort_by_severity(page, report) -> None:
    sec = "sec-findings"
    assert _column(page, sec, "Severity") == ["error", "warning", "warning", "info"]  # as served
    page.locator(f"#{sec} th", has_text="Severity").click()
    page.locator(f"#{sec} th", has_text="Severity").click()
    assert _column(page, sec, "Severity") == ["info", "warning", "warning", "error"]
    assert _column(page, sec, "Module Name")[-1] == XSS_SCRIPT  # the error finding
