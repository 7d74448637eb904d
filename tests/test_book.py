"""The book: it builds with warnings as errors (executing every chapter), and every built page
passes a check in a real browser (headless Chromium driven by playwright).

The build happens once per test session (fixture ``built_book``) and the browser test runs on it.
Screenshots of every page land in ``tests/_artifacts/screenshots`` for review.
"""
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "_artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.slow


def toc_files():
    """Every page listed in _toc.yml, as paths relative to the root, without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        for ch in part.get("chapters", []):
            files.append(ch["file"])
            files += [s["file"] for s in ch.get("sections", [])]
    return files


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """Build the whole book once into a temporary folder; return (html_dir, seconds, log)."""
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).with_name("jupyter-book")
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # chapters show inline figures
    proc = subprocess.run([str(jb), "build", str(ROOT), "-W", "-n", "--keep-going", "--path-output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.time() - t0
    log = proc.stdout + proc.stderr
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "book_build.log").write_text(log)
    assert proc.returncode == 0, f"jupyter-book build failed ({proc.returncode}):\n{log[-6000:]}"
    return out / "_build" / "html", seconds, log


def test_book_builds_every_page(built_book):
    html, seconds, log = built_book
    print(f"book built in {seconds:.0f} s")
    for f in toc_files():
        assert (html / f"{f}.html").exists(), f"{f}.html missing from the build"
    # a chapter whose execution failed shows a traceback instead of failing silently
    for page in html.rglob("*.html"):
        text = page.read_text(errors="replace")
        assert "Traceback (most recent call last)" not in text, f"{page} shows a traceback"
        # a role the parser did not see (e.g. inside inline code) is printed as typed
        for role in ("{glue:", "{numref}", "{doc}", "{cite}"):
            assert role not in text, f"{page} shows an unrendered {role} role"
        # a command typeset as prose turns "--force" into "–force", which no shell accepts
        dashed = re.search(r"ddetr_minimal [a-z-]+[^<\n]*?\s[\u2013\u2014][a-z]", text)
        assert dashed is None, f"{page} prints a command with a typographic dash: {dashed and dashed.group(0)}"


def test_every_figure_a_chapter_shows_is_in_the_page(built_book):
    """Chapters that plot leave images in their executed notebook, and every one reaches the page."""
    import nbformat

    html = built_book[0]
    executed = html.parent / "jupyter_execute"
    for f in toc_files():
        if not (ROOT / f"{f}.ipynb").exists():
            continue
        source = nbformat.read(ROOT / f"{f}.ipynb", as_version=4)
        shows = sum(c.source.count("plt.show()") for c in source.cells if c.cell_type == "code")
        nb = nbformat.read(executed / f"{f}.ipynb", as_version=4)
        figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        if shows:
            assert figures > 0, f"{f}: calls plt.show() {shows} times but its executed notebook holds no image"
        page = (html / f"{f}.html").read_text()
        images = len(re.findall(r'<img[^>]+src="[^"]*_images/', page))
        assert images >= figures, f"{f}: {figures} figures when executed but only {images} images in the page"


def test_notebooks_stored_without_outputs():
    for nb_path in (ROOT / "book").glob("*.ipynb"):
        import nbformat

        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{nb_path.name} stores outputs"


def test_chapters_install_the_package_in_colab_and_have_a_launch_button(built_book):
    html, _, _ = built_book
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = cfg["repository"]["url"].rstrip("/")
    owner_repo = urlparse(repo).path.strip("/")
    branch = cfg["repository"].get("branch", "main")
    import nbformat

    for f in toc_files():
        if not (ROOT / f"{f}.ipynb").exists():
            continue
        nb = nbformat.read(ROOT / f"{f}.ipynb", as_version=4)
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert "google.colab" in first_code.source and repo in first_code.source, f"{f}: first cell must install {repo} in Colab"
        page = (html / f"{f}.html").read_text()
        expected = f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/{f}.ipynb"
        assert expected in page, f"{f}.html has no Colab launch button pointing at {expected}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def served_book(built_book):
    html = built_book[0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield html, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


PAGE_CHECKS = r"""
() => {
  const problems = [];
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) problems.push('broken image: ' + img.src);
    else if (img.naturalWidth < 20 || img.naturalHeight < 20) problems.push('empty figure: ' + img.src);
  }
  const main = document.querySelector('main') || document.body;
  const clone = main.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, .highlight').forEach(e => e.remove());
  const text = clone.innerText;
  if (text.includes('\\(') || text.includes('\\[') || /\$\$/.test(text)) problems.push('unrendered math in text');
  if (/with 0 Axes/.test(main.innerText)) problems.push('empty matplotlib figure');
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
  return {problems, links, mathjax: !!(window.MathJax && window.MathJax.startup)};
}
"""

# At desktop width: what a reader would have to scroll or squint at.
LAYOUT_CHECKS = r"""
() => {
  const problems = [];
  const visible = e => e.offsetParent !== null && e.getBoundingClientRect().width > 0;
  // setup code is folded or removed: no visible input installs the package or wires up glue
  document.querySelectorAll('div.cell_input pre').forEach(pre => {
    if (visible(pre) && /"pip", "install"|\*pip|from myst_nb import|def glue\(/.test(pre.textContent))
      problems.push('setup code shown: ' + pre.textContent.trim().slice(0, 60));
  });
  document.querySelectorAll('details').forEach(d => d.open = true);  // folded code must fit too
  document.querySelectorAll('mjx-container[display="true"]').forEach(m => {
    if (m.scrollWidth > m.clientWidth + 1) problems.push('display equation clipped by '
      + (m.scrollWidth - m.clientWidth) + ' px: ' + m.textContent.slice(0, 40));
  });
  document.querySelectorAll('pre').forEach(pre => {
    if (visible(pre) && pre.scrollWidth > pre.clientWidth + 1) problems.push('code block scrolls sideways: '
      + (pre.textContent.split('\n').find(l => l.length > 70) || '').slice(0, 60));
  });
  document.querySelectorAll('main img').forEach(img => {
    const shown = img.getBoundingClientRect().width;
    if (visible(img) && img.naturalWidth > 1.03 * shown) problems.push('figure shrunk to '
      + Math.round(100 * shown / img.naturalWidth) + '% (its text with it): ' + img.src.split('/').pop());
  });
  return problems;
}
"""


def _anchor_ids(path: Path, cache={}):
    if path not in cache:
        cache[path] = set(re.findall(r'id="([^"]+)"', path.read_text(errors="replace")))
    return cache[path]


def test_every_page_in_a_browser(served_book):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's Chromium is missing; run: sudo apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    html, base = served_book
    shots = ARTIFACTS / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    pages = sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html") if "_static" not in p.parts)
    failures = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        for rel in pages:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            failed = []
            page.on("requestfailed", lambda r: failed.append(f"request failed: {r.url} ({r.failure})"))
            page.on("response", lambda r: failed.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            page.goto(base + rel, wait_until="load")
            try:  # let MathJax typeset before looking for raw TeX
                page.wait_for_function("!window.MathJax || (MathJax.startup && MathJax.startup.promise)", timeout=10000)
                page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
            except Exception as exc:  # noqa: BLE001 - reported as a page failure below
                failed.append(f"MathJax did not start: {exc}")
            page.wait_for_load_state("networkidle")
            result = page.evaluate(PAGE_CHECKS)
            page.screenshot(path=str(shots / (rel.replace("/", "__") + ".png")), full_page=True)
            problems = failed + result["problems"] + page.evaluate(LAYOUT_CHECKS)
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.goto(base + rel, wait_until="load")
            phone.wait_for_load_state("networkidle")
            try:
                phone.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
            except Exception:  # noqa: BLE001 - the desktop pass reports MathJax problems
                pass
            width = phone.evaluate("() => document.documentElement.scrollWidth")
            if width > 390:
                problems.append(f"at 390 px the page scrolls sideways ({width} px wide)")
            phone.screenshot(path=str(shots / (rel.replace("/", "__") + ".390.png")), full_page=True)
            phone.close()
            for link in result["links"]:
                u = urlparse(link)
                if not link.startswith(base):
                    continue
                target = html / unquote(u.path[len(urlparse(base).path):])
                if target.is_dir():
                    target = target / "index.html"
                if not target.exists():
                    problems.append(f"dead link: {link}")
                elif u.fragment and target.suffix == ".html" and u.fragment not in _anchor_ids(target):
                    problems.append(f"dead anchor: {link}")
            if problems:
                failures.append(f"{rel}:\n  " + "\n  ".join(sorted(set(problems))))
            page.close()
        browser.close()
    assert not failures, "pages with problems:\n" + "\n".join(failures)
