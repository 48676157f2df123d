"""Stage `models`: resolve the teacher and the initial student.

* Built-in models (`path: demo`, or `path: planted` for the planted-rock testbed, see
  infra/testbeds/builtin.py): built once per spec and code version, then reused from the store
  under `demo/<hash>/` (committed by a `manifest.json` written last, like a stage). The
  stage records those objects as its outputs `teacher/*`, `student/*`, so every later
  stage reads them through the checksummed manifest. Its metrics are the models'
  training summaries and, for the planted testbed, the calibration check
  (`calibration`: planted-position accuracy of the teacher, the student and the student
  architecture trained long with cross-entropy), measured before any distillation.
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

from opdflow.infra.testbeds.builtin import builtin
from opdflow.infra.config import Config
from opdflow.infra.artifacts.manifest import Ref, Run, StageContext, cache_root, run_stage
from opdflow.infra.artifacts.provenance import dir_fingerprint
from opdflow.infra.artifacts.store import Store
from opdflow.tasks.stage import Stage, single


def demo_prefix(config: Config) -> str:
    """The store prefix of the built-in models: a hash of their spec and code."""
    b = builtin(config.teacher.path)
    h = hashlib.sha256()
    if b.name != "demo":
        h.update(b.name.encode())
    h.update(getattr(config, b.name).model_dump_json().encode())
    for f in b.files:
        h.update(f.read_bytes())
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
    b = builtin(config.teacher.path)
    dest = cache_root() / demo_prefix(config)
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
    try:
        b.build_models(getattr(config, b.name), tmp, progress=lambda msg, frac: progress(frac, msg))
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def run(run: Run, stage: str = "models", force: bool = False, progress=None) -> tuple[dict, bool]:
    c = run.config
    if c.teacher.is_builtin:
        params = {c.teacher.path: c.section(c.teacher.path), "teacher": c.section("teacher"),
                  "student": c.section("student")}
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
        elif name == "teacher/calibration.json":  # the planted testbed's calibration check
            out["calibration"] = json.loads(run.read(ref))
    return out


def report(run: Run, entry: dict) -> str:
    lines = [f"# models — run `{run.run_id}`", ""]
    if entry.get("external"):
        for role, ext in entry["external"].items():
            lines.append(f"- **{role}**: `{ext['path']}` (fingerprint `{ext['fingerprint'][:16]}`)")
    else:
        lines.append(f"Built-in `{run.config.teacher.path}` models (built once, reused from the store):")
        for role, summary in entry["metrics"].items():
            if role != "calibration":
                lines.append(f"- **{role}**: `{json.dumps(summary)}`")
        if "calibration" in entry["metrics"]:
            lines += ["", calibration_markdown(entry["metrics"]["calibration"])]
    return "\n".join(lines)


def testbed_markdown(run: Run) -> str | None:
    """The planted testbed's section of the run report: the calibration (models stage) and the
    rock set against the planted truth (rock stage); None on any other task."""
    if run.config.teacher.path != "planted" or run.entry("models") is None:
        return None
    from opdflow.infra.models.lm import load_tokenizer
    from opdflow.infra.testbeds.planted import truth_overlap
    lines = ["## Planted testbed", ""]
    cal = run.entry("models")["metrics"].get("calibration")
    if cal:
        lines += [calibration_markdown(cal), ""]
    if run.entry("rock") is not None:
        tok = load_tokenizer(run.materialize("models", "teacher"))
        sets = json.loads(run.read_output("rock", "rock_sets.json"))
        t = truth_overlap(tok, sets["rock"])
        lines += [f"Rock set (selected on `{sets.get('checkpoint', '?')}`): {', '.join(map(repr, t['rock']))}. "
                  f"Planted connectives found: {len(t['found'])} of {len(t['planted'])} "
                  f"({', '.join(map(repr, t['found'])) or 'none'}; missed: {', '.join(map(repr, t['missed'])) or 'none'}); "
                  f"precision {t['precision']:.2f}, recall {t['recall']:.2f}."]
    return "\n".join(lines)


def calibration_markdown(cal: dict) -> str:
    """The planted testbed's calibration check as a table (models stage, run report)."""
    lines = ["Calibration of the planted testbed, before any distillation: teacher-forced accuracy at the planted "
             "connectives (all of them, and the first lookup alone, where a model that only picks one of the "
             f"prompt's connectives scores {cal['chance_first_lookup']:.2f}), and greedy answer accuracy.", "",
             "| model | planted positions | first lookup | picks a connective the prompt shows | answer | n |",
             "|---|---|---|---|---|---|"]
    for name in ("teacher", "student", "student_long_ce"):
        m = cal[name]
        label = {"student_long_ce": f"student architecture, {m.get('steps', '?')} CE steps"}.get(name, name)
        lines.append(f"| {label} | {m['planted_accuracy']:.3f} | {m['first_lookup_accuracy']:.3f} | "
                     f"{m['planted_in_prompt']:.3f} | {m['answer_accuracy']:.3f} | {m['n']} |")
    return "\n".join(lines)


STAGES = (Stage("models", run, instances=single("models"), needs=lambda config, name: [], report=report),)
models_task = STAGES[0].task
