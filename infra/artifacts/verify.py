"""`opdflow verify --run-id ID`: check a run's store without running any stage.

Why: readers check every object's sha256 when they read it, but a damaged store should be
found before a stage that needs it is hours into a run, and the damage should be named
exactly. `verify_run(store, run_id)` reads, never writes:

* `run.json` and `execution.json` parse and hold a valid config;
* every manifest entry (`manifest/<stage>.json`) parses; every attempt record parses;
* every committed object is present and has the sha256 its entry recorded (streamed, each
  object once even when several entries link it); a user's model dir recorded by `models`
  still has its fingerprint;
* objects under `runs/<id>/stages/` that no committed entry lists are *orphaned*: left by a
  crashed or superseded attempt, never read (reported with their paths, not a fault);
* an entry whose inputs no longer match the outputs committed upstream is *stale*
  (`opdflow run` recomputes it; reported, not a fault).

Per stage the status is `ok`, `missing`, `corrupt` or `unreadable` (its entry does not
parse), with the exact paths. `repair_stages(report)` names the stages whose outputs must be
recomputed: the stage that wrote each missing or corrupt object (a shard for a shard's part,
`models` for a demo model); `opdflow verify --repair` reruns exactly those through the
stage flow (`flows/lifecycle.py`).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from opdflow.infra.artifacts.store import CorruptObject, ObjectMissing, Store

FAULTS = ("missing", "corrupt", "unreadable")
_OWNER = re.compile(r"^runs/[^/]+/stages/(?P<stage>[^/]+)/")


@dataclass
class Problem:
    kind: str            # missing | corrupt | unreadable | orphaned | stale | changed
    key: str             # the store key (or a model dir's path)
    location: str        # where it is: a path or an s3:// URL
    detail: str = ""


@dataclass
class StageReport:
    name: str
    status: str = "ok"   # ok | missing | corrupt | unreadable
    objects: int = 0
    problems: list[Problem] = field(default_factory=list)

    def add(self, p: Problem) -> None:
        self.problems.append(p)
        if p.kind in FAULTS and (self.status == "ok" or FAULTS.index(p.kind) > FAULTS.index(self.status)):
            self.status = p.kind


@dataclass
class RunReport:
    run_id: str
    store: str
    run: list[Problem] = field(default_factory=list)          # run.json / execution.json / attempts
    stages: list[StageReport] = field(default_factory=list)
    orphaned: list[Problem] = field(default_factory=list)

    @property
    def faults(self) -> int:
        return (sum(1 for p in self.run if p.kind in FAULTS)
                + sum(1 for s in self.stages for p in s.problems if p.kind in FAULTS))

    def to_json(self) -> dict:
        return {**asdict(self), "faults": self.faults, "ok": self.faults == 0}


def _check_object(store: Store, key: str, sha: str, memo: dict[str, Problem | None]) -> Problem | None:
    if key not in memo:
        try:
            actual = store.sha256(key)
            memo[key] = None if actual == sha else Problem(
                "corrupt", key, store.describe(key), f"sha256 {actual}, expected {sha}")
        except ObjectMissing:
            memo[key] = Problem("missing", key, store.describe(key), "committed but not in the store")
    return memo[key]


def verify_run(store: Store, run_id: str) -> RunReport:
    """Check everything committed for `run_id` in `store` (see the module docstring)."""
    from opdflow.infra.artifacts.manifest import Run, RunError
    prefix = f"runs/{run_id}"
    rep = RunReport(run_id, store.uri)
    if not store.exists(f"{prefix}/run.json"):
        raise RunError(f"no run {run_id!r} in store {store.uri}")
    try:
        Run.open(store, run_id)
    except CorruptObject as e:
        rep.run.append(Problem("unreadable", e.key, e.location, e.detail))
    for key in store.list(f"{prefix}/attempts/"):
        try:
            store.get_json(key)
        except CorruptObject as e:
            rep.run.append(Problem("unreadable", key, e.location, e.detail))

    entries: dict[str, dict] = {}
    for key in store.list(f"{prefix}/manifest/"):
        name = key[len(f"{prefix}/manifest/"):]
        if not name.endswith(".json") or "/" in name:
            continue
        name = name[:-len(".json")]
        sr = StageReport(name)
        rep.stages.append(sr)
        try:
            entry = store.get_json(key)
            if not isinstance(entry, dict) or not isinstance(entry.get("outputs"), dict) or "key" not in entry:
                raise CorruptObject(key, store.describe(key), "not a manifest entry (no 'key' and 'outputs')")
        except CorruptObject as e:
            sr.add(Problem("unreadable", key, e.location, e.detail))
            continue
        entries[name] = entry

    memo: dict[str, Problem | None] = {}
    committed: dict[str, str] = {}  # store key -> sha256, over every committed output
    for sr in rep.stages:
        entry = entries.get(sr.name)
        if entry is None:
            continue
        for ref in entry["outputs"].values():
            sr.objects += 1
            committed[ref["key"]] = ref["sha256"]
            problem = _check_object(store, ref["key"], ref["sha256"], memo)
            if problem is not None:
                sr.add(problem)
        for role, ext in (entry.get("external") or {}).items():
            problem = _check_external(role, ext)
            if problem is not None:
                sr.add(problem)
    for sr in rep.stages:  # inputs that no longer match what is committed upstream
        entry = entries.get(sr.name)
        for name, ref in ((entry or {}).get("inputs") or {}).items():
            now = committed.get(ref.get("key"))
            if now is not None and now != ref.get("sha256"):
                sr.problems.append(Problem("stale", ref["key"], store.describe(ref["key"]),
                                           f"input {name!r} was {ref.get('sha256')}, the committed object is now {now}"))
    unreadable = {sr.name for sr in rep.stages if sr.status == "unreadable"}
    for key in store.list(f"{prefix}/stages/"):  # (a stage whose entry does not parse: not orphans, unknown)
        if key not in committed and owner(key, "") not in unreadable:
            rep.orphaned.append(Problem("orphaned", key, store.describe(key), "no committed entry lists it"))
    return rep


def _check_external(role: str, ext: dict) -> Problem | None:
    """A user's model dir recorded by the models stage: still there, same fingerprint."""
    from pathlib import Path

    from opdflow.infra.artifacts.provenance import dir_fingerprint
    path = Path(ext.get("path", ""))
    if not path.is_dir():
        return Problem("missing", str(path), str(path), f"the {role} model dir recorded by the run is gone")
    actual = dir_fingerprint(path)
    if actual != ext.get("fingerprint"):
        return Problem("corrupt", str(path), str(path), f"the {role} model dir changed since the run recorded it "
                       f"(fingerprint {actual}, expected {ext.get('fingerprint')}): start a new run")
    return None


def owner(key: str, stage: str) -> str:
    """The stage that wrote an object: the one whose directory holds it (a shard, for a part a
    stage links), `models` for the demo models, else the stage that lists it."""
    m = _OWNER.match(key)
    if m:
        return m["stage"]
    return "models" if key.startswith("demo/") else stage


def repair_stages(rep: RunReport) -> list[str]:
    """Stages to recompute, each once, in the order found: the writers of every missing or
    corrupt object, and stages whose entry does not parse. A user's changed model dir or a
    bad run.json cannot be repaired by rerunning a stage (they are left out)."""
    out: list[str] = []
    for sr in rep.stages:
        for p in sr.problems:
            if p.kind == "unreadable":
                name = sr.name
            elif p.kind in ("missing", "corrupt") and not p.key.startswith("/"):
                name = owner(p.key, sr.name)
            else:
                continue
            if name not in out:
                out.append(name)
    return out


def format_report(rep: RunReport) -> str:
    lines = [f"verify run {rep.run_id} in {rep.store}"]
    for p in rep.run:
        lines.append(f"  {p.kind:<10} {p.location}: {p.detail}")
    for sr in rep.stages:
        lines.append(f"  {sr.name:<32} {sr.status:<10} {sr.objects} objects")
        for p in sr.problems:
            lines.append(f"      {p.kind}: {p.location}" + (f" ({p.detail})" if p.detail else ""))
    if rep.orphaned:
        lines.append(f"  orphaned: {len(rep.orphaned)} objects no committed entry lists (from crashed or superseded "
                     "attempts; never read):")
        lines += [f"      {p.location}" for p in rep.orphaned]
    lines.append(f"{rep.faults} faults" if rep.faults else "ok: every committed object is present and intact")
    return "\n".join(lines)


__all__ = ["verify_run", "repair_stages", "format_report", "RunReport", "StageReport", "Problem", "owner"]
