"""The ablation verdict: does bypassing the rock tokens' loss harm distillation, help it,
make no difference larger than a declared margin, or can the data not tell?

Part of the `report` stage (tasks/report.py calls `ablation_verdict` and `markdown`).
Per training seed (`ablation.seeds`) there are three arms from the initial student:
uniform (nothing bypassed), rocks bypassed, a random control bypassed; each is evaluated
by lm-eval after every round, and lm-eval's per-item scores (the eval stages'
`samples/part-*.parquet`) are the data. On the last round's scores, `tasks/stats.py`
compares rock vs uniform, random vs uniform and rock vs random directly: mean
difference, 95% hierarchical-bootstrap interval (seeds, then items), a paired sign-flip
test, and TOST against `ablation.margin`; the outcome is harm / benefit / equivalent /
inconclusive. The headline is rock vs uniform.

Beside it, what a reader needs to judge it: accuracy per arm x seed, learning curves
(mean over seeds per round with a 95% band), accuracy against the compute spent (tokens
actually trained on, i.e. loss weight > 0, and wall seconds of the arm's rollout, scoring
and training stages: a seed's first rollout and scoring are shared by its arms and counted
for each, since each arm run alone would need them), and the share of trained tokens the
rock set and the random control took, side by side (drawn to match in round 1; realised
per round).
"""
from __future__ import annotations

import json

import numpy as np

from opdflow.infra.models.lm import derive_seed
from opdflow.infra.artifacts.manifest import Run
from opdflow.tasks import stats
from opdflow.tasks.common import stage_seconds
from opdflow.tasks.plan import (ARMS, LABEL_OF_ARM, UNIFORM, ablation_arms, arm_label, rollout_of, round_stage)

COMPARISONS = (("ablate-rock", UNIFORM), ("ablate-random", UNIFORM), ("ablate-rock", "ablate-random"))
TITLE = {UNIFORM: "uniform", "ablate-rock": "rocks bypassed", "ablate-random": "random bypassed"}
COLOR = {UNIFORM: "#555555", "ablate-rock": "#d62728", "ablate-random": "#1f77b4"}


def item_scores(run: Run, label: str, task: str, metric: str) -> dict | None:
    """{doc_id: score} of one eval stage's per-item results (None if not committed)."""
    from opdflow.tasks.shards import concat_parts
    stage = f"eval.{label}"
    if run.entry(stage) is None:
        return None
    out = {}
    for rec in concat_parts(run, run.outputs_under(stage, "samples"))["record"].to_pylist():
        r = json.loads(rec)
        if r.get("task") == task and r.get(metric) is not None:
            out[r["doc_id"]] = float(r[metric])
    return out


def collect(run: Run, task: str, metric: str) -> dict:
    """{arm: {seed: {round: {doc_id: score}}}} for every committed arm eval."""
    c = run.config
    data: dict = {}
    for arm in ablation_arms(c):
        for s in c.ablation.seeds:
            for r in range(1, c.ablation.rounds + 1):
                sc = item_scores(run, arm_label(arm, s, r), task, metric)
                if sc:
                    data.setdefault(arm, {}).setdefault(s, {})[r] = sc
    return data


def compute_spent(run: Run, arm: str, seed: int) -> list[dict]:
    """Per round, cumulative: tokens trained on (loss weight > 0) and wall seconds."""
    rows, tokens, secs = [], 0, 0.0
    for r in range(1, run.config.ablation.rounds + 1):
        tr = run.entry(round_stage("train", r, arm, seed))
        if tr is None:
            break
        ro, sc = rollout_of(_name(arm, r, seed))
        m = tr["metrics"]
        tokens += m.get("tokens_weighted", m.get("tokens_trained", 0))
        secs += sum(stage_seconds(e) for e in (run.entry(ro), run.entry(sc), tr) if e)
        rows.append({"round": r, "tokens_weighted": tokens, "wall_seconds": round(secs, 2),
                     "bypassed_fraction": m.get("bypassed_fraction")})
    return rows


def _name(arm: str, r: int, seed: int):
    from opdflow.tasks.plan import StageName
    return StageName(arm, "train", r, seed=seed)


def shares(run: Run, arm: str, seed: int) -> dict | None:
    e = run.entry(round_stage("train", 1, arm, seed))
    return e["metrics"].get("bypass") if e else None


def ablation_verdict(run: Run, task: str, metric: str) -> dict | None:
    """Everything the verdict artifact shows, JSON-able; None without arm evaluations."""
    c = run.config
    a = c.ablation
    data = collect(run, task, metric)
    R = a.rounds
    final = {arm: {s: rounds[R] for s, rounds in seeds.items() if R in rounds} for arm, seeds in data.items()}
    if UNIFORM not in final or not final[UNIFORM]:
        return None
    out: dict = {"task": task, "metric": metric, "rounds": R, "seeds": list(a.seeds), "margin": a.margin,
                 "position": a.position, "n_resamples": a.n_resamples, "arms": {}, "comparisons": [], "curves": {},
                 "compute": {}, "shares": {}}
    for arm in ablation_arms(c):
        if arm not in final:
            continue
        acc = {s: float(np.mean(list(v.values()))) for s, v in final[arm].items()}
        out["arms"][arm] = {"label": LABEL_OF_ARM[arm], "accuracy_per_seed": acc,
                            "accuracy_mean": float(np.mean(list(acc.values())))}
        out["curves"][arm] = [{"round": r, **_curve_point(data[arm], r, a.n_resamples, derive_seed(c.seed, "curve", arm, r))}
                              for r in range(1, R + 1) if any(r in v for v in data[arm].values())]
        out["compute"][arm] = {s: compute_spent(run, arm, s) for s in a.seeds}
        out["shares"][arm] = {s: shares(run, arm, s) for s in a.seeds}
    for x, y in COMPARISONS:
        if x in final and y in final:
            cmp = stats.compare(final[x], final[y], a.margin, a.n_resamples, derive_seed(c.seed, "verdict", x, y))
            out["comparisons"].append({"a": x, "b": y, "what": f"{TITLE[x]} vs {TITLE[y]}", **cmp,
                                       "text": stats.describe(cmp, f"{TITLE[x]} vs {TITLE[y]}", metric)})
    head = next((cm for cm in out["comparisons"] if cm["a"] == ARMS["rock"] and cm["b"] == UNIFORM), None)
    out["outcome"] = head["outcome"] if head else None
    out["text"] = " ".join(cm["text"] for cm in out["comparisons"]) or "no bypass arm was evaluated"
    return out


def _curve_point(seeds: dict, r: int, n_resamples: int, seed: int) -> dict:
    rows = [v[r] for v in seeds.values() if r in v]
    items = sorted(set.intersection(*(set(x) for x in rows)))
    m = stats.mean_ci(np.array([[x[i] for i in items] for x in rows]), n_resamples, seed)
    return {"mean": m["mean"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n_seeds": m["n_seeds"]}


# -- plots ------------------------------------------------------------------------------


def plots(v: dict) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from opdflow.tasks.rock.report import figure_png
    out = {}
    cmp = v["comparisons"]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.7 * len(cmp)))
    m = v["margin"]
    ax.axvspan(-m, m, color="#2ca02c", alpha=0.12, label=f"±margin {m:g}")
    ax.axvline(0, color="k", lw=1)
    for i, cm in enumerate(reversed(cmp)):
        ax.errorbar([cm["diff"]], [i], xerr=[[cm["diff"] - cm["ci_low"]], [cm["ci_high"] - cm["diff"]]], fmt="o",
                    color=COLOR[cm["a"]], capsize=4)
        ax.text(cm["ci_high"], i + 0.18, f"  {cm['outcome']}", fontsize=8, va="bottom")
    ax.set_yticks(range(len(cmp)), [cm["what"] for cm in reversed(cmp)])
    ax.set_ylim(-0.6, len(cmp) - 0.4)
    ax.set_xlabel(f"difference in {v['metric']} (95% CI, hierarchical bootstrap)")
    ax.set_title(f"Ablation after {v['rounds']} rounds, {len(v['seeds'])} seeds")
    ax.legend(loc="lower right", fontsize=8)
    out["forest"] = figure_png(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, pts in v["curves"].items():
        xs = [p["round"] for p in pts]
        ax.plot(xs, [p["mean"] for p in pts], marker="o", color=COLOR[arm], label=TITLE[arm])
        ax.fill_between(xs, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], color=COLOR[arm], alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(v["metric"])
    ax.set_xticks(range(1, v["rounds"] + 1))
    ax.set_title("Learning curves (mean over seeds, 95% band)")
    ax.legend()
    out["curves"] = figure_png(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, per_seed in v["compute"].items():
        pts = v["curves"][arm]
        rows = [rs for rs in per_seed.values() if rs]
        if not rows or not pts:
            continue
        n = min(len(pts), *(len(rs) for rs in rows))
        tok = [np.mean([rs[i]["tokens_weighted"] for rs in rows]) for i in range(n)]
        sec = [np.mean([rs[i]["wall_seconds"] for rs in rows]) for i in range(n)]
        acc = [pts[i]["mean"] for i in range(n)]
        ax1.plot(tok, acc, marker="o", color=COLOR[arm], label=TITLE[arm])
        ax2.plot(sec, acc, marker="o", color=COLOR[arm], label=TITLE[arm])
    ax1.set_xlabel("tokens trained on (weight > 0), cumulative")
    ax2.set_xlabel("wall s (rollout + scoring + training), cumulative")
    fig.suptitle("per round, mean over seeds", fontsize=9, y=0.02)
    ax1.set_ylabel(v["metric"])
    ax1.set_title("Accuracy vs tokens trained")
    ax2.set_title("Accuracy vs wall time")
    ax1.legend()
    out["compute"] = figure_png(fig)
    return out


# -- markdown ---------------------------------------------------------------------------


def markdown(v: dict | None, pngs: dict[str, bytes] | None = None) -> str:
    """The verdict artifact's body (without the page title)."""
    if v is None:
        return "Ablation not evaluated (no uniform-arm evaluation committed)."
    from opdflow.tasks.rock.report import embedded_img
    pngs = pngs if pngs is not None else plots(v)
    seeds = v["seeds"]
    lines = [f"**Outcome (rocks bypassed vs uniform): {v['outcome'] or 'n/a'}.** Margin ±{v['margin']:g} "
             f"absolute {v['metric']} (`ablation.margin`), {len(seeds)} training seeds, {v['rounds']} rounds per "
             f"arm, loss zeroed at the `{v['position']}` position.", ""]
    lines += [f"- {cm['text']}" for cm in v["comparisons"]]
    lines += ["", "How to read it: *harm*/*benefit* = the 95% interval excludes 0 and the paired sign-flip test "
              "rejects at 5%; *equivalent* = both one-sided tests (TOST) reject at 5%, i.e. the 90% interval lies "
              "inside ±margin; *inconclusive* = neither: not evidence of no effect.", "",
              embedded_img(pngs["forest"], "forest plot"), "",
              "| comparison | difference | 95% CI | sign-flip p | TOST p | outcome |", "|---|---|---|---|---|---|"]
    for cm in v["comparisons"]:
        lines.append(f"| {cm['what']} | {cm['diff']:+.4f} | [{cm['ci_low']:+.4f}, {cm['ci_high']:+.4f}] | "
                     f"{cm['p_sign_flip']:.3g} | {cm['tost']['p']:.3g} | **{cm['outcome']}** |")
    lines += ["", f"## {v['metric']} per arm and seed (round {v['rounds']})", "",
              "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for arm, a in v["arms"].items():
        lines.append(f"| {TITLE[arm]} | " + " | ".join(f"{a['accuracy_per_seed'][s]:.3f}"
                                                      if s in a["accuracy_per_seed"] else "" for s in seeds)
                     + f" | {a['accuracy_mean']:.3f} |")
    lines += ["", "## Learning curves", "", embedded_img(pngs["curves"], "learning curves"), "",
              "| arm | " + " | ".join(f"r{r:02d}" for r in range(1, v["rounds"] + 1)) + " |",
              "|---|" + "---|" * v["rounds"]]
    for arm, pts in v["curves"].items():
        by = {p["round"]: p for p in pts}
        lines.append(f"| {TITLE[arm]} | " + " | ".join(
            f"{by[r]['mean']:.3f} [{by[r]['ci_low']:.3f}, {by[r]['ci_high']:.3f}]" if r in by else ""
            for r in range(1, v["rounds"] + 1)) + " |")
    lines += ["", "## Compute", "", embedded_img(pngs["compute"], "accuracy vs compute"), "",
              "| arm | seed | tokens trained (weight > 0) | wall s | bypassed share per round |", "|---|---|---|---|---|"]
    for arm, per_seed in v["compute"].items():
        for s, rows in per_seed.items():
            if rows:
                fr = ", ".join(f"{r['bypassed_fraction']:.1%}" for r in rows if r["bypassed_fraction"] is not None)
                lines.append(f"| {TITLE[arm]} | {s} | {rows[-1]['tokens_weighted']} | {rows[-1]['wall_seconds']:.1f} "
                             f"| {fr} |")
    rock, rnd = v["shares"].get(ARMS["rock"], {}), v["shares"].get(ARMS["random"], {})
    if rnd:
        lines += ["", "## Rock set vs random control: share of trained positions (round 1, at the draw)", "",
                  "| seed | rock share | random share | tolerance met | random ids |", "|---|---|---|---|---|"]
        for s in seeds:
            r = rnd.get(s) or {}
            if r:
                lines.append(f"| {s} | {r.get('target_share', r.get('rock_share', 0)):.1%} | {r.get('share', 0):.1%} | "
                             f"{'yes' if r.get('within_tolerance') else '**no**'} | "
                             f"{r.get('n_ids', '')} ids of {r.get('n_candidates', '')} candidates |")
        if rock:
            lines.append("")
            lines.append("Later rounds sample from each arm's own checkpoint, so the realised shares drift: see "
                         "the bypassed share per round above.")
    return "\n".join(lines)


__all__ = ["ablation_verdict", "markdown", "plots", "collect", "item_scores", "compute_spent"]
