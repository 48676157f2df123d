"""The rock stage's report: plots (embedded PNGs) and markdown. Nothing here changes a number."""
from __future__ import annotations

import base64
import io
import math


from opdflow.infra.artifacts.manifest import Run
from opdflow.infra.artifacts.tables import parquet_to_table
from opdflow.tasks.common import publish_table
from opdflow.tasks.rock.method import category


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def report_plots(aggs, sel, rand, rec, summary) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    final = aggs[list(aggs)[-1]]
    rock, control = set(sel["rock"]), set(sel["control"])
    plots = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    for group, color, lab in ((lambda t: t not in rock and t not in control, "#bbbbbb", "other"),
                              (lambda t: t in control, "#1f77b4", "control"), (lambda t: t in rock, "#d62728", "rock")):
        ts = [t for t in final if group(t)]
        ax.scatter([math.log10(final[t]["freq"]) for t in ts], [final[t]["kl_mean"] for t in ts], s=18, c=color, label=lab)
    ax.set_xlabel("log10 frequency")
    ax.set_ylabel("mean reverse KL (nats)")
    ax.set_title("Funnel: frequency vs mean KL (final checkpoint)")
    ax.legend()
    plots["funnel"] = figure_png(fig)

    labels = list(aggs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in summary["stagnation"].items():
        ax1.plot(labels, [row[lab] for lab in labels], marker="o", label=name)
    ax1.set_ylabel("mean reverse KL")
    ax1.set_title("KL across checkpoints")
    ax1.legend()
    first, last = aggs[labels[0]], aggs[labels[-1]]
    common = [t for t in last if t in first]
    colors = ["#d62728" if t in rock else "#1f77b4" if t in control else "#bbbbbb" for t in common]
    ax2.scatter([first[t]["kl_mean"] for t in common], [last[t]["kl_mean"] for t in common], c=colors, s=18)
    lim = max([first[t]["kl_mean"] for t in common] + [last[t]["kl_mean"] for t in common] + [1e-6])
    ax2.plot([0, lim], [0, lim], "k--", lw=1)
    ax2.set_xlabel(f"mean KL at {labels[0]}")
    ax2.set_ylabel(f"mean KL at {labels[-1]}")
    below = sum(1 for t in common if t in rock and last[t]["kl_mean"] < first[t]["kl_mean"])
    n_rock = sum(1 for t in common if t in rock)
    ax2.set_title(f"Per-token KL, {labels[0]} vs {labels[-1]}: {below} of {n_rock} rocks below the diagonal (KL fell)",
                  fontsize=9)
    plots["trajectories"] = figure_png(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = [("rock", summary["rock"]), ("control", summary["control"]), ("random", summary["random_matched"])]
    metrics = ["token_share", "kl_share", "grad_norm_share"]
    for i, (name, s) in enumerate(groups):
        ax.bar([j + i * 0.27 for j in range(3)], [s[m] for m in metrics], width=0.27, label=name)
    ax.set_xticks([j + 0.27 for j in range(3)], ["tokens", "KL", "grad norm"])
    ax.set_ylabel("share of total")
    ax.set_title("Shares of tokens, KL and gradient norm")
    ax.legend()
    plots["shares"] = figure_png(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    pv = summary["prevalence"]
    ax1.hist(pv["rock_share_per_output"], bins=20, color="#d62728")
    ax1.set_xlabel("share of rock tokens in an output")
    ax1.set_ylabel("outputs")
    ax1.set_title("Rock prevalence per output")
    ax2.hist(pv["nonrock_high_kl_per_output"], bins=20, color="#7f7f7f")
    ax2.set_xlabel("non-rock high-KL events per output")
    ax2.set_title(f"KL > p90 ({pv['high_kl_threshold']:.3f}) on non-rock tokens")
    plots["prevalence"] = figure_png(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    st = summary["stability"]
    ax.plot([s["fraction"] for s in st] + [1.0], [s["jaccard_rock"] for s in st] + [1.0], marker="o", label="Jaccard (rock set)")
    ax.plot([s["fraction"] for s in st] + [1.0], [s["spearman_score"] for s in st] + [1.0], marker="s", label="Spearman (scores)")
    ax.set_xlabel("fraction of probe prompts")
    ax.set_ylim(0, 1.05)
    ax.set_title("Selection stability vs probe-set size")
    ax.legend()
    plots["stability"] = figure_png(fig)
    return plots


def md_text(s: str) -> str:
    """Any string as literal text in a markdown table cell that the Prefect UI renders as
    HTML: `<eos>` stays visible (entities), `|` does not split the cell, newlines and tabs
    show as \\n and \\t instead of breaking the row."""
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("\\", "&#92;").replace("|", "&#124;").replace("`", "&#96;").replace("*", "&#42;").replace("_", "&#95;")
    return s.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def md_token(s: str) -> str:
    """A decoded token as text a reader can see: quoted, whitespace visible (`'\\n'`, `' '`), escaped."""
    return md_text(repr(s))


def stagnation_caption(summary: dict) -> str:
    """What the KL table shows, from its figures: how much rock and control KL changed from
    the first to the last checkpoint, and whether rocks stagnated on this run (their KL fell
    by less than 10% while the controls' fell by at least 10 points more)."""
    rows, labels = summary["stagnation"], summary["checkpoints"]
    if "rock" not in rows or "control" not in rows or not labels:
        return "no rock/control KL to compare"

    def rel(row):
        first = row[labels[0]]
        return row["change"] / first if first else 0.0

    r, c = rel(rows["rock"]), rel(rows["control"])

    def said(x):
        return f"fell {-x:.0%}" if x < 0 else f"rose {x:.0%}"
    stagnant = r > -0.10 and c < r - 0.10
    return (f"rock KL {said(r)} ({rows['rock'][labels[0]]:.2f} → {rows['rock'][labels[-1]]:.2f} nats), "
            f"controls {said(c).split()[-1] if said(c).split()[0] == said(r).split()[0] else said(c)}: "
            f"{'stagnant' if stagnant else 'not stagnant'} on this run")


def categories_text(categories: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def embedded_img(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def render_report(run_id, tok, agg, sel, summary, plots) -> str:
    r, ctl = summary["rock"], summary["control"]
    lines = [f"# Rock-token report — run `{run_id}`", "",
             f"{summary['n_positions']} generated positions on the probe prompts, {summary['n_token_ids']} distinct "
             f"token ids; checkpoints compared: {', '.join(summary['checkpoints'])}.", "",
             "| set | tokens | share of tokens | share of KL | share of grad norm |", "|---|---|---|---|---|"]
    for name, s, ids in (("rock", r, sel["rock"]), ("control", ctl, sel["control"]),
                         ("random (freq-matched)", summary["random_matched"], None)):
        n = len(ids) if ids is not None else "-"
        lines.append(f"| {name} | {n} | {s['token_share']:.1%} | {s['kl_share']:.1%} | {s['grad_norm_share']:.1%} |")
    lines += ["", "## Rock tokens", "", "| rank | id | token | category | freq | mean KL | freq × mean KL |",
              "|---|---|---|---|---|---|---|"]
    for i, t in enumerate(sel["rock"], 1):
        s = tok.decode([t])
        lines.append(f"| {i} | {t} | {md_token(s)} | {category(s)} | {agg[t]['freq']} | {agg[t]['kl_mean']:.4f} | "
                     f"{agg[t]['kl_sum']:.3f} |")
    lines += ["", f"Dropped as most frequent: {', '.join(md_token(tok.decode([t])) for t in sel['dropped'])}", "",
              f"Rock tokens by category: {categories_text(summary['categories'])}", "",
              "## Funnel", "", embedded_img(plots["funnel"], "funnel"), "",
              f"## Stagnation across checkpoints: {stagnation_caption(summary)}", "",
              "| set | " + " | ".join(summary["checkpoints"]) + " | change |",
              "|---|" + "---|" * (len(summary["checkpoints"]) + 1)]
    for name, row in summary["stagnation"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in summary["checkpoints"])
                     + f" | {row['change']:+.4f} |")
    lines += unbiased_stagnation_markdown(summary, tok)
    lines += ["", embedded_img(plots["trajectories"], "trajectories"), "",
              "## Gradient share and direction", "", embedded_img(plots["shares"], "shares"), "",
              "Mean cosine of each position's reverse-KL gradient (logit space) to the corpus-level direction: "
              "the sum of all positions' gradients (frequency-weighted) or of each token id's mean gradient "
              "(frequency-balanced).", "", "| set | freq-weighted | freq-balanced |", "|---|---|---|"]
    for name, row in summary["gradient_cosine"].items():
        lines.append(f"| {name} | {row['freq_weighted']:.3f} | {row['freq_balanced']:.3f} |")
    lines += ["",
              "## Prevalence per output", "",
              f"{summary['prevalence']['outputs_with_rock']:.0%} of outputs contain at least one rock token.", "",
              embedded_img(plots["prevalence"], "prevalence"), "",
              "## Stability of the selection", "", "| probe fraction | prompts | Jaccard (rock) | Spearman |",
              "|---|---|---|---|"]
    for s in summary["stability"]:
        lines.append(f"| {s['fraction']:.2f} | {s['prompts']} | {s['jaccard_rock']:.2f} | {s['spearman_score']:.2f} |")
    lines += ["", embedded_img(plots["stability"], "stability")]
    return "\n".join(lines)


def unbiased_stagnation_markdown(summary: dict, tok=None) -> list[str]:
    """The cross-fitted stagnation table and the persistence of the rock set (report lines)."""
    if "cross_fitted" not in summary:
        return []
    labels = summary["checkpoints"]
    halves = summary.get("probe_halves", {})
    lines = ["", "### Cross-fitted (selection and trajectories on disjoint probe prompts)", "",
             f"Rocks selected on one half of the probe prompts ({', '.join(f'{h}: {n}' for h, n in halves.items())} "
             "prompts), mean KL measured on the other half; `non_rock` is every other token. The table above "
             "selects and measures on the same sequences, which favours a flat rock curve.", "",
             "| fold | set | " + " | ".join(labels) + " | change | relative |", "|---|---|" + "---|" * (len(labels) + 2)]
    for fold, res in summary["cross_fitted"].items():
        for name, row in res["stagnation"].items():
            lines.append(f"| {fold} | {name} | " + " | ".join(f"{row[lab]:.4f}" for lab in labels)
                         + f" | {row['change']:+.4f} | {row['relative_change']:+.1%} |")
    per = summary["persistence"]
    lines += ["", "### Persistence of the rock set across checkpoints", "",
              "The rock set selected at each compared checkpoint (same probe sequences) and its Jaccard overlap "
              "with the last checkpoint's set.", "", "| checkpoint | Jaccard with last | rock set |", "|---|---|---|"]
    for lab, ids in per["rock_sets"].items():
        shown = ", ".join(md_token(tok.decode([t])) for t in ids) if tok is not None else ", ".join(map(str, ids))
        lines.append(f"| {lab} | {per['jaccard_with_last'][lab]:.2f} | {shown} |")
    return lines


def report(run: Run, entry: dict) -> str:
    md = run.read_output("rock", "report.md").decode()
    tokens = parquet_to_table(run.read_output("rock", "tokens.parquet")).to_pylist()
    publish_table("rock-tokens", [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in t.items()}
                                  for t in tokens if t["set"] in ("rock", "control")],
                  f"rock and control tokens of run {run.run_id}")
    return md
