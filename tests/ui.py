"""See what a person sees in the Prefect UI: headless Chromium against a running `prefect server`.

A helper module for tests (not a test file; pytest runs with --import-mode=importlib, so a test
loads it by path, see tests/test_ui_smoke.py). Typical use::

    dom = capture(artifact_page_url(ui_base, artifact_id), Path("test-output/artifact.png"))
    page = assert_rendered(dom, headings=["Rock token report"], table_headers=["step", "kl"],
                           image_prefix="data:image/png;base64,")

How the page gets rendered: Prefect's UI is a single-page app that first loads `/ui-settings`, then
calls the API. `--virtual-time-budget` lets Chromium run the page's timers in virtual time while it
*waits for pending network requests*, so the SPA's fetches finish and it re-renders before the
screenshot/DOM dump is taken, without a fixed wall-clock sleep. The subprocess is still bounded by
a wall-clock timeout (and its whole process group is killed on expiry).

Facts about Prefect 3.8.8 that these helpers rely on (verified against a live `prefect server`):

* Two UIs are served. V1 (Vue) at the server root, V2 (React) under `/v2`. A browser with no saved
  preference opening `/` is redirected to `/v2` (`server.ui.v2_enabled` defaults to true), but deep
  links such as the "View at .../runs/flow-run/<id>" URL the flow logs print open V1.
* Routes, both UIs: `/artifacts/artifact/<artifact id>` and `/runs/flow-run/<flow run id>`;
  `?tab=Artifacts` selects the flow run's Artifacts tab in V2 only. V1 resets `tab` to `Logs` on a
  cold load (the tab is hidden until the flow run has loaded), so there is no V1 artifacts-tab URL.
* The UI reads the API address from `GET /ui-settings` (`api_url`). `prefect server start --port N`
  alone still advertises `http://127.0.0.1:4200/api`; start the server with `PREFECT_API_URL` or
  `PREFECT_UI_API_URL` set to `http://127.0.0.1:N/api`, else every page shows "Can't connect to
  Server API" over an empty shell. `ui_settings()` lets a test check this up front.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

UI_VERSIONS = ("v1", "v2")
DEFAULT_UI = "v2"  # what a fresh browser opening the dashboard gets in Prefect 3.8.8

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Chromium's stderr noise that says nothing about the page (no D-Bus or GPU in a container).
_NOISE = ("dbus", "unexpected operator", "Fontconfig", "gpu_init", "viz_main", "sandbox")


NO_CHROMIUM = ("chromium not installed: run .ci/install-chromium (apt-get install chromium) "
               "or set OPDFLOW_CHROMIUM to a Chromium/Chrome executable")


def require_chromium() -> str:
    """The Chromium executable, or a pytest skip saying why there is none. A UI check that is
    one part of a bigger test runs in a subtest (`with subtests.test("..."):`), so the skip
    is reported as a skip of that check while the rest of the test passes or fails on its own."""
    exe = chromium_path()
    if exe is None:
        import pytest
        pytest.skip(NO_CHROMIUM)
    return exe


def chromium_path() -> str | None:
    """The Chromium/Chrome executable to use: `$OPDFLOW_CHROMIUM`, else the first on PATH, else None."""
    explicit = os.environ.get("OPDFLOW_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(url: str, extra: list[str], *, width: int, height: int, wait_ms: int,
                  timeout_s: float | None) -> tuple[str, str]:
    """Run headless Chromium once on `url`; return (stdout, filtered stderr)."""
    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no chromium executable found (install it with .ci/install-chromium)")
    timeout_s = timeout_s if timeout_s is not None else 60.0 + 3 * wait_ms / 1000.0
    with tempfile.TemporaryDirectory(prefix="opdflow-chromium-") as profile, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--disable-quic", "--no-proxy-server", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}",
               *extra, url]
        # Files, not pipes: Chromium's helper processes can outlive the browser and hold a pipe open.
        # Own session: on timeout the whole process group (browser, renderer, zygote) is killed.
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise RuntimeError(f"chromium did not finish {url} within {timeout_s:.0f}s") from None
        finally:
            _kill_group(proc)  # stray helpers of a finished browser
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = "\n".join(line for line in err.read().decode(errors="replace").splitlines()
                           if line.strip() and not any(n in line for n in _NOISE))
        if proc.returncode != 0:
            raise RuntimeError(f"chromium exited with {proc.returncode} on {url}:\n{stderr[-3000:]}")
        return stdout, stderr


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def capture(url: str, out_png: Path | None = None, *, width: int = 1400, height: int = 1800,
            wait_ms: int = 8000, timeout_s: float | None = None, chromium_args: tuple[str, ...] = ()) -> str:
    """Render `url` once; save a PNG screenshot to `out_png` (if given) and return the rendered DOM.

    The screenshot and the DOM come from the same page load, so an assertion on the DOM describes
    what is in the picture. `chromium_args`: more Chromium flags (e.g. `--host-resolver-rules=...`).
    """
    extra = ["--dump-dom", *chromium_args]
    if out_png is not None:
        out_png = Path(out_png).resolve()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.unlink(missing_ok=True)  # never mistake an old picture for this one
        extra.append(f"--screenshot={out_png}")
    dom, stderr = _run_chromium(url, extra, width=width, height=height, wait_ms=wait_ms,
                                timeout_s=timeout_s)
    if out_png is not None and not out_png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}:\n{stderr[-3000:]}")
    return dom


def screenshot(url: str, out_png: Path, *, width: int = 1400, height: int = 1800,
               wait_ms: int = 8000, timeout_s: float | None = None) -> Path:
    """Save a PNG of `url` as rendered after `wait_ms` of virtual time; return its path."""
    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.unlink(missing_ok=True)
    _, stderr = _run_chromium(url, [f"--screenshot={out_png}"], width=width, height=height,
                              wait_ms=wait_ms, timeout_s=timeout_s)
    if not out_png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}:\n{stderr[-3000:]}")
    return out_png


def dom_text(url: str, wait_ms: int = 8000, *, width: int = 1400, height: int = 1800,
             timeout_s: float | None = None) -> str:
    """The DOM of `url` (serialized HTML, `--dump-dom`) after the SPA has fetched and rendered."""
    return capture(url, None, width=width, height=height, wait_ms=wait_ms, timeout_s=timeout_s)


# -- Prefect UI routes ----------------------------------------------------------------------

def _ui_root(ui_base: str, ui: str) -> str:
    if ui not in UI_VERSIONS:
        raise ValueError(f"ui must be one of {UI_VERSIONS}, not {ui!r}")
    base = ui_base.rstrip("/")
    if base.endswith("/api"):
        raise ValueError(f"{ui_base!r} is the API URL; pass the server root (without /api)")
    return base + ("/v2" if ui == "v2" else "")


def artifact_page_url(ui_base: str, artifact_id, *, ui: str = DEFAULT_UI) -> str:
    """The page of one artifact (rendered markdown/table/...), e.g. `<base>/v2/artifacts/artifact/<id>`."""
    return f"{_ui_root(ui_base, ui)}/artifacts/artifact/{artifact_id}"


def flow_run_artifacts_url(ui_base: str, flow_run_id, *, ui: str = DEFAULT_UI) -> str:
    """A flow run's page with its Artifacts tab open (V2 only: V1 resets `?tab=` to Logs on load)."""
    if ui == "v1":
        raise ValueError("the V1 UI drops ?tab=Artifacts on a cold load and shows Logs; "
                         "use ui='v2' (or flow_run_url(..., ui='v1') for the V1 run page)")
    return f"{_ui_root(ui_base, ui)}/runs/flow-run/{flow_run_id}?tab=Artifacts"


def flow_run_url(ui_base: str, flow_run_id, *, ui: str = DEFAULT_UI) -> str:
    """A flow run's page (default tab), the URL Prefect itself logs as "View at ..." (that one is V1)."""
    return f"{_ui_root(ui_base, ui)}/runs/flow-run/{flow_run_id}"


def ui_settings(ui_base: str, timeout: float = 10.0) -> dict:
    """`GET <base>/ui-settings`: what the UI is told, notably `api_url` (must be this server's /api)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(ui_base.rstrip("/") + "/ui-settings", timeout=timeout) as resp:
        return json.load(resp)


# -- what the page shows ---------------------------------------------------------------------

@dataclass
class Page:
    """The parts of a rendered DOM that tell whether content (not just the app shell) is shown."""
    title: str = ""
    text: str = ""                                    # visible text, whitespace-collapsed
    headings: list[str] = field(default_factory=list)  # h1..h6 text
    table_headers: list[str] = field(default_factory=list)  # <th> text
    images: list[str] = field(default_factory=list)    # <img src=...>
    password_inputs: int = 0


class _Collector(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template"}
    _HEAD = {"h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._skip = 0
        self._text: list[str] = []
        self._open: list[tuple[str, list[str]]] = []  # (tag, text parts) for h*/th/title

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in self._SKIP:
            self._skip += 1
        elif tag in self._HEAD or tag in ("th", "title"):
            self._open.append((tag, []))
        elif tag == "img" and a.get("src"):
            self.page.images.append(a["src"])
        elif tag == "input" and (a.get("type") or "").lower() == "password":
            self.page.password_inputs += 1

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
            return
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                _, parts = self._open.pop(i)
                text = " ".join(" ".join(parts).split())
                if tag == "title":
                    self.page.title = text
                elif tag == "th":
                    self.page.table_headers.append(text)
                else:
                    self.page.headings.append(text)
                break

    def handle_data(self, data):
        if self._skip:
            return
        self._text.append(data)
        for _, parts in self._open:
            parts.append(data)

    def result(self) -> Page:
        self.page.text = " ".join(" ".join(self._text).split())
        return self.page


def parse_page(dom: str) -> Page:
    collector = _Collector()
    collector.feed(dom)
    collector.close()
    return collector.result()


# Messages the two UIs show instead of content.
_PROBLEMS = {
    "Can't connect to Server API": "the UI cannot reach the API (check /ui-settings api_url)",
    "Unable to connect to Prefect server": "the UI cannot reach the API (check /ui-settings api_url)",
    "Something went wrong": "the UI shows an error page",
    "Artifact not found": "artifact not found",
    "Flow Run Not Found": "flow run not found",
    "Page Not Found": "unknown UI route (404 page)",
    "Authentication failed": "login required",
}


def page_problems(dom: str | Page) -> list[str]:
    """Reasons the page is not showing content: error/404/login pages, or an empty SPA shell."""
    page = parse_page(dom) if isinstance(dom, str) else dom
    found = list(dict.fromkeys(why for needle, why in _PROBLEMS.items() if needle in page.text))
    if page.password_inputs:
        found.append("a password form (login page)")
    if not page.text or page.text == page.title:
        found.append("no rendered text: an empty SPA shell")
    return found


def assert_rendered(dom: str, *, headings: tuple[str, ...] | list[str] = (),
                    table_headers: tuple[str, ...] | list[str] = (),
                    image_prefix: str | None = None,
                    text: tuple[str, ...] | list[str] = ()) -> Page:
    """Fail unless the page shows real content: no error/shell page, each expected heading and
    table header present as an element (not just as raw-markdown text), an <img> whose src starts
    with `image_prefix`, and each `text` snippet in the visible text. Returns the parsed page."""
    page = parse_page(dom)
    missing = list(page_problems(page))
    missing += [f"heading {h!r}" for h in headings if not any(h in x for x in page.headings)]
    missing += [f"table header {h!r}" for h in table_headers if h not in page.table_headers]
    if image_prefix is not None and not any(src.startswith(image_prefix) for src in page.images):
        missing.append(f"<img src={image_prefix!r}...>")
    missing += [f"text {t!r}" for t in text if t not in page.text]
    if missing:
        raise AssertionError(
            "page did not render the expected content; missing/problems: " + "; ".join(missing)
            + f"\n  title: {page.title!r}\n  headings: {page.headings}\n  table headers: "
            f"{page.table_headers}\n  images: {[s[:40] for s in page.images]}\n  text: {page.text[:800]!r}")
    return page
