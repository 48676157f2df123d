"""UI smoke test: what a person sees in the Prefect UI for a flow run's artifacts.

A real `prefect server` (the session `prefect_server` fixture: own PREFECT_HOME, loopback port,
analytics off), a real flow run in a subprocess that publishes a markdown artifact (heading, table,
embedded base64 PNG) and a table artifact, then headless Chromium renders the artifact pages and
the flow run's Artifacts tab. Screenshots (+ the DOM they came from) go to test-output/ for a human
to look at; the assertions check the DOM of the same page load shows the content, not an empty
SPA shell, an error page or a login page.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test-output"


import opdflow_tests_ui as ui  # noqa: E402  (registered by conftest.py)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(ui.chromium_path() is None, reason=ui.NO_CHROMIUM),
]

HEADING = "Rock token report"

FLOW = textwrap.dedent('''
    import base64, io, json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.runtime import flow_run

    @flow(name="ui-smoke")
    def ui_smoke():
        fig, ax = plt.subplots(figsize=(4, 2.5), dpi=80)
        ax.plot([0, 1, 2, 3], [0.9, 0.5, 0.35, 0.3])
        ax.set_title("reverse KL per step")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        png = base64.b64encode(buf.getvalue()).decode()
        create_markdown_artifact(
            "# HEADING\\n\\n"
            "| step | reverse_kl | rock_tokens |\\n|---|---|---|\\n"
            "| 1 | 0.900 | 17 |\\n| 2 | 0.350 | 9 |\\n\\n"
            f"![plot](data:image/png;base64,{png})\\n",
            key="ui-smoke-report", description="markdown with a table and an embedded PNG")
        create_table_artifact([{"token": "the", "count": 41}, {"token": "rock", "count": 7}],
                              key="ui-smoke-table", description="top tokens")
        print("UI_SMOKE " + json.dumps({"flow_run_id": str(flow_run.id)}), flush=True)

    if __name__ == "__main__":
        ui_smoke()
''').replace("HEADING", HEADING)


def _artifacts_of(api_url: str, flow_run_id: str) -> dict[str, object]:
    """The flow run's artifacts by key, read back through the Prefect client.

    Not `client.read_artifacts(...)` / `Artifact.get(key)`: prefect 3.8.8's client sends every
    omitted argument as JSON null, and this server (FastAPI 0.154) answers 422; an empty
    `task_run_filter` to avoid the null would drop flow-level artifacts. So the client's own HTTP
    session posts the filter with the omitted fields left out.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.objects import Artifact
    from prefect.settings import PREFECT_API_URL, temporary_settings

    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter", json={
            "artifacts": flt.model_dump(mode="json", exclude_unset=True),
            "sort": "CREATED_DESC", "limit": 50, "offset": 0})
    return {a.key: a for a in Artifact.model_validate_list(response.json())}


def _check_png(path: Path) -> None:
    assert path.is_file(), f"no screenshot at {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert path.stat().st_size > 10_000, f"{path} is only {path.stat().st_size} bytes: a blank page?"


def test_artifacts_render_in_prefect_ui(prefect_server, tmp_path):
    t0 = time.monotonic()
    api_url = prefect_server.url
    ui_base = api_url[: -len("/api")]

    # The UI learns the API address from /ui-settings; a wrong one gives "Can't connect" pages.
    assert ui.ui_settings(ui_base)["api_url"].rstrip("/") == api_url, ui.ui_settings(ui_base)

    script = tmp_path / "ui_smoke_flow.py"
    script.write_text(FLOW)
    env = {**os.environ, "PREFECT_API_URL": api_url, "MPLCONFIGDIR": str(tmp_path / "mpl"),
           "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))}
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"flow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    marker = re.search(r"^UI_SMOKE (\{.*\})$", proc.stdout, re.M)
    assert marker, f"flow printed no ids:\n{proc.stdout[-3000:]}"
    flow_run_id = json.loads(marker.group(1))["flow_run_id"]

    artifacts = _artifacts_of(api_url, flow_run_id)
    assert {"ui-smoke-report", "ui-smoke-table"} <= set(artifacts), sorted(artifacts)
    report, table = artifacts["ui-smoke-report"].id, artifacts["ui-smoke-table"].id
    assert artifacts["ui-smoke-report"].type == "markdown"
    assert artifacts["ui-smoke-table"].type == "table"

    OUT.mkdir(exist_ok=True)
    shots = {
        # The default (V2) UI, what the dashboard opens.
        "ui-artifact-markdown": (ui.artifact_page_url(ui_base, report),
                                 dict(headings=[HEADING], table_headers=["step", "reverse_kl", "rock_tokens"],
                                      image_prefix="data:image/png;base64,", text=["0.350"])),
        "ui-artifact-table": (ui.artifact_page_url(ui_base, table),
                              dict(table_headers=["token", "count"], text=["rock"])),
        "ui-flow-run-artifacts": (ui.flow_run_artifacts_url(ui_base, flow_run_id),
                                  dict(text=["ui-smoke-report", "ui-smoke-table", "markdown with a table"])),
        # The V1 UI, what the "View at ..." link in the flow's log opens.
        "ui-artifact-markdown-v1": (ui.artifact_page_url(ui_base, report, ui="v1"),
                                    dict(headings=[HEADING], table_headers=["step", "reverse_kl"],
                                         image_prefix="data:image/png;base64,")),
    }
    for name, (url, expected) in shots.items():
        png = OUT / f"{name}.png"
        dom = ui.capture(url, png)
        (OUT / f"{name}.html").write_text(dom)
        _check_png(png)
        try:
            ui.assert_rendered(dom, **expected)
        except AssertionError as e:
            raise AssertionError(f"{name} ({url}), screenshot {png}: {e}") from None
        if "image_prefix" in expected:
            assert re.search(r'<img\b[^>]*\bsrc="data:image/png;base64,', dom), name

    # The shell/error detection itself: an unknown artifact must not pass as rendered content.
    missing = ui.capture(ui.artifact_page_url(ui_base, "00000000-0000-0000-0000-000000000000"))
    with pytest.raises(AssertionError):
        ui.assert_rendered(missing, headings=[HEADING])
    assert ui.page_problems(missing), "a not-found artifact page should be reported as a problem"

    print(f"ui smoke: {time.monotonic() - t0:.1f}s after server start; screenshots in {OUT}")
