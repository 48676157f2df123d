"""Stage `models`: resolve the teacher and the initial student.

* Demo models (`path: demo`): built once per demo spec and code version, then reused
  from the store under `demo/<hash>/` (committed by a `manifest.json` written last,
  like a stage). The stage records those objects as its outputs `teacher/*`,
  `student/*`, so every later stage reads them through the checksummed manifest.
* A user's Hugging Face model dir is not copied into the store (a 7B teacher is many
  GB): the stage records its path and a fingerprint (file names and sizes, full
  sha256 of the small files) under `external`, and readers check the fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from opdflow.infra.config import Config
from opdflow.infra.manifest import Ref, Run, StageContext, cache_root, run_stage
from opdflow.infra.provenance import ROOT, dir_fingerprint
from opdflow.infra.store import Store
from opdflow.tasks.common import stage_task


def demo_prefix(config: Config) -> str:
    h = hashlib.sha256()
    h.update(config.demo.model_dump_json().encode())
    h.update((ROOT / "infra" / "demo.py").read_bytes())
    return f"demo/{h.hexdigest()[:16]}"


def demo_models(store: Store, config: Config, progress=lambda f, m="": None) -> dict[str, Ref]:
    """Refs of the demo teacher/student files, building and uploading them if needed."""
    prefix = demo_prefix(config)
    marker = f"{prefix}/manifest.json"
    if store.exists(marker):
        refs = json.loads(store.get_bytes(marker))
        if all(store.exists(r["key"]) for r in refs.values()):
            return refs
    built = local_demo_build(config, progress)
    refs = {}
    for role in ("teacher", "student"):
        d = built / role
        for f in sorted(d.rglob("*")):
            if f.is_file():
                key = f"{prefix}/{role}/{f.relative_to(d).as_posix()}"
                refs[f"{role}/{f.relative_to(d).as_posix()}"] = {
                    "key": key, "sha256": store.put_file(key, f), "size": f.stat().st_size}
    store.put_bytes(marker, json.dumps(refs, indent=2).encode())  # the demo's commit, last
    return refs


def local_demo_build(config: Config, progress=lambda f, m="": None) -> Path:
    """The demo models built on this machine, cached by spec and code (a second store, or
    a second test session, uploads them instead of training them again)."""
    from opdflow.infra.demo import build_demo
    dest = cache_root() / demo_prefix(config)
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
    try:
        build_demo(config.demo, tmp, progress=lambda msg, frac: progress(frac, msg))
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def run(run: Run, stage: str = "models", force: bool = False, progress=None) -> tuple[dict, bool]:
    c = run.config
    if c.teacher.is_demo:
        params = {"demo": c.section("demo"), "teacher": c.section("teacher"), "student": c.section("student")}
        inputs: dict[str, Ref] = {}

        def body(ctx: StageContext) -> None:
            for name, ref in demo_models(run.store, c, ctx.progress).items():
                ctx.link(name, ref)
            ctx.metrics.update(_demo_summaries(run, ctx.outputs))
    else:
        fps = {role: dir_fingerprint(Path(getattr(c, role).path)) for role in ("teacher", "student")}
        params = {"teacher": c.section("teacher"), "student": c.section("student")}
        inputs = {role: {"key": str(Path(getattr(c, role).path).resolve()), "sha256": fp} for role, fp in fps.items()}

        def body(ctx: StageContext) -> None:
            for role in ("teacher", "student"):
                ctx.external[role] = {"path": str(Path(getattr(c, role).path).resolve()), "fingerprint": fps[role]}
    return run_stage(run, stage, params=params, inputs=inputs, body=body, force=force, progress=progress)


def _demo_summaries(run: Run, outputs: dict[str, Ref]) -> dict:
    out = {}
    for name, ref in outputs.items():
        if name.endswith("/demo_summary.json"):
            out[name.split("/")[0]] = json.loads(run.read(ref))
    return out


def report(run: Run, entry: dict) -> str:
    lines = [f"# models — run `{run.run_id}`", ""]
    if entry.get("external"):
        for role, ext in entry["external"].items():
            lines.append(f"- **{role}**: `{ext['path']}` (fingerprint `{ext['fingerprint'][:16]}`)")
    else:
        lines.append("Embedded demo models (built once, reused from the store):")
        for role, summary in entry["metrics"].items():
            lines.append(f"- **{role}**: `{json.dumps(summary)}`")
    return "\n".join(lines)


models_task = stage_task("models", run, report)
