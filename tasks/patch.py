"""Stage `patch`: inference-time interventions at rock positions (the causal ablation's second half).

The training-time ablation (`ablate-rock.*`) asks what the student learns without the
rock tokens' gradient. This stage asks what the rock tokens do at inference, on the held-out
eval prompts, with the final student decoding greedily. Two interventions, each against the
same counts of random tokens (the rock stage's random control set):

* **Teacher patching.** At every step where the student's own next token is in the patched
  set, the teacher's greedy token is emitted instead (both models continue from it). Only
  *real substitutions* count as patched (the teacher's token differs; where both agree the
  swap is a no-op). Arms: `none`, `rock`, `random` (the random set's positions), each with
  every real substitution. Matched on the share of positions patched
  (`ablation.patch_match_share`): the arm that substitutes more often is decoded once more as
  `<arm>-matched`, each substitution kept with probability (lower share / higher share),
  seeded, so it patches about the other arm's share; the unmatched arms stay in the report.
  When the other arm substituted nothing (on the demo the teacher agrees with the student at
  every random-set position), no matching exists: the report says so instead of thinning the
  arm to nothing, which made it the unpatched student.
* **Knockout** (the reference code's intervention): the token is forbidden (logit -inf), one
  at a time for the top `ablation.knockout_single` ranks, and cumulatively over the ranked
  rock set (ranks 1..k for every k), with as many random tokens each time
  (`ko-rock-1`, `ko-random-1`, ..., `ko-rock-cum-k`, `ko-random-cum-k`).

Every arm decodes the same prompts, so comparisons are paired: each arm's accuracy with a
95% bootstrap interval over items, and each arm against `none` (and rock against random)
with McNemar's exact test on the paired items and the paired difference with its interval
(tasks/stats.py). Accuracy: the answer read by the one shared extraction
(opdflow.evals.answers, last match of `ablation.patch_answer_regex`, or the built-in
task's pattern) equals the prompt's answer.

Sharded like evaluation (`scale.shards`): each shard decodes a contiguous range of the eval
prompts, every arm, and writes one Parquet part (per prompt and arm: the response, whether
it is correct, how many of its tokens were substituted, how many were in the set). Share
matching is done within each shard.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from opdflow.evals.answers import is_correct
from opdflow.infra.testbeds.builtin import answer_pattern
from opdflow.infra.config import Config
from opdflow.infra.models.lm import derive_seed, kv_decode, load_model, load_tokenizer, real_logits
from opdflow.infra.artifacts.manifest import Run, StageContext
from opdflow.tasks import prompts as prompts_stage
from opdflow.tasks.plan import checkpoint_of, patching_enabled
from opdflow.tasks.shards import concat_parts, run_sharded, shard_bounds
from opdflow.tasks.stage import ShardParts, Stage
from opdflow.tasks.stats import mcnemar, mean_ci

PATCH_ARMS = ("none", "rock", "random")


def matched(arm: str) -> str:
    return f"{arm}-matched"


def answer_regex(config: Config) -> str | None:
    if config.ablation.patch_answer_regex:
        return config.ablation.patch_answer_regex
    return answer_pattern(config.data.source)  # demo / planted: their own pattern; else None


def random_set(sets: dict) -> list[int]:
    """The rock stage's random control set, in its draw order."""
    for key in ("random", "random_matched"):
        if key in sets:
            ids = sets[key]
            return list(ids[0] if ids and isinstance(ids[0], list) else ids)  # per-seed draws: the first
    raise KeyError(f"rock_sets.json has no random control set (keys: {sorted(sets)})")


@torch.no_grad()
def intervened_greedy(student, teacher, prompts: list[list[int]], max_new: int, eos_id: int, pad_id: int,
                      patch_ids=(), forbid_ids=(), keep_prob: float = 1.0, seed: int = 0, vocab: int | None = None):
    """Greedy decoding by `student` with two interventions. `forbid_ids`: those tokens' logits
    are -inf (knockout). `patch_ids`: where the student's next token is in the set and the
    teacher's greedy token differs, the teacher's is taken (with probability `keep_prob`,
    seeded: share matching). `teacher` may be None when nothing is patched. `vocab`: the
    tokenizer's size; padded lm_head rows beyond it are never picked (infra.models.lm.real_logits).

    Returns (response ids, substitutions, set positions) per prompt: set positions are the
    steps whose student token was in `patch_ids`, substitutions those of them where the
    teacher's token was emitted instead."""
    dev = next(student.parameters()).device
    patch = torch.tensor(sorted(patch_ids), dtype=torch.long, device=dev)
    forbid = torch.tensor(sorted(forbid_ids), dtype=torch.long, device=dev)
    use_teacher = len(patch) > 0
    if use_teacher and teacher is None:
        raise ValueError("patching needs the teacher")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b = len(prompts)
    n_sub = torch.zeros(b, dtype=torch.long, device=dev)
    n_set = torch.zeros(b, dtype=torch.long, device=dev)

    def pick(step, logits, done):
        s_logits = real_logits(logits[0], vocab)
        if len(forbid):
            s_logits = s_logits.index_fill(-1, forbid, float("-inf"))
        own = s_logits.argmax(-1)
        if not use_teacher:
            return own
        teachers = real_logits(logits[1], vocab).argmax(-1)
        in_set = torch.isin(own, patch) & ~done
        keep = torch.rand(b, generator=gen).to(dev) < keep_prob if keep_prob < 1.0 else torch.ones_like(in_set)
        swap = in_set & (teachers != own) & keep
        n_sub.add_(swap.long())
        n_set.add_(in_set.long())
        return torch.where(swap, teachers, own)

    tokens, lengths, _ = kv_decode([student, teacher] if use_teacher else [student], prompts, max_new, pick,
                                   eos_id, pad_id)
    responses = [tokens[i, :lengths[i]].tolist() for i in range(b)]
    return responses, n_sub.cpu().tolist(), n_set.cpu().tolist()


def patched_greedy(student, teacher, prompts: list[list[int]], patch_ids: set[int], max_new: int, eos_id: int,
                   pad_id: int, vocab: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Teacher patching at `patch_ids` (every real substitution kept): (responses, substitutions)."""
    resp, n_sub, _ = intervened_greedy(student, teacher, prompts, max_new, eos_id, pad_id, patch_ids=patch_ids,
                                       vocab=vocab)
    return resp, n_sub


def knockout_arms(rock: list[int], random: list[int], n_single: int) -> dict[str, list[int]]:
    """Arm name -> forbidden ids: the top `n_single` rock ranks one at a time and the same
    number of random tokens (one each), then ranks 1..k cumulatively for every k, rock and
    random alike (k up to the smaller set's size)."""
    arms: dict[str, list[int]] = {}
    n = min(len(rock), len(random))
    for k in range(1, min(n_single, n) + 1):
        arms[f"ko-rock-{k}"], arms[f"ko-random-{k}"] = [rock[k - 1]], [random[k - 1]]
    for k in range(1, n + 1):
        arms[f"ko-rock-cum-{k}"], arms[f"ko-random-cum-{k}"] = rock[:k], random[:k]
    return arms


def share(rows: list[dict], key: str = "n_patched") -> float:
    tokens = sum(r["n_tokens"] for r in rows)
    return sum(r[key] for r in rows) / tokens if tokens else 0.0


def _accuracy(rows: list[dict], seed: int) -> dict:
    ci = mean_ci(np.array([[float(r["correct"]) for r in rows]]), n_resamples=2000, seed=seed) if rows else {}
    return {"accuracy": ci.get("mean", float("nan")), "ci_low": ci.get("ci_low", float("nan")),
            "ci_high": ci.get("ci_high", float("nan")), "n": len(rows)}


def paired(rows: list[dict], a: str, b: str) -> dict:
    """McNemar and the paired accuracy difference of arm a minus arm b, on their shared prompts."""
    ra = {r["prompt_id"]: r["correct"] for r in rows if r["arm"] == a}
    rb = {r["prompt_id"]: r["correct"] for r in rows if r["arm"] == b}
    ids = sorted(set(ra) & set(rb))
    return mcnemar([ra[i] for i in ids], [rb[i] for i in ids])


def arm_summary(rows: list[dict], seed: int = 0) -> dict:
    """Per patching arm: accuracy with its 95% interval, the share of response tokens
    substituted and the share in the set; each patched arm against `none`, and rock against
    random (McNemar on the paired prompts, paired difference with its interval)."""
    arms = {}
    for arm in (*PATCH_ARMS, *map(matched, PATCH_ARMS[1:])):
        mine = [r for r in rows if r["arm"] == arm]
        if mine:
            arms[arm] = {**_accuracy(mine, seed), "patched_token_share": share(mine),
                         "set_token_share": share(mine, "n_set")}
    pairs = (("rock", "none"), ("random", "none"), ("rock", "random"), (matched("rock"), "random"),
             ("rock", matched("random")))
    comparisons = {f"{a}_vs_{b}": paired(rows, a, b) for a, b in pairs if a in arms and b in arms}
    return {"arms": arms, "comparisons": comparisons}


def share_match(s_rock: float, s_random: float) -> dict:
    """How the patching arms are matched on the share of positions substituted: the arm that
    substitutes more is thinned to the other's share; impossible when the other substituted
    nothing (thinning to zero would be the unpatched student again)."""
    shares = {"rock": s_rock, "random": s_random}
    if s_rock == s_random:
        return {"shares": shares, "matched_arm": None, "keep_prob": 1.0, "reason": "equal shares: nothing to match"}
    hi, lo = ("rock", "random") if s_rock > s_random else ("random", "rock")
    if shares[lo] == 0.0:
        return {"shares": shares, "matched_arm": None, "keep_prob": None,
                "reason": f"not matched: the {lo} arm made no real substitution (the teacher's token equalled the "
                          f"student's at every {lo}-set position), so no share of {hi}'s substitutions matches it"}
    return {"shares": shares, "matched_arm": matched(hi), "keep_prob": shares[lo] / shares[hi],
            "reason": f"{matched(hi)} keeps each substitution with probability {shares[lo] / shares[hi]:.3f}"}


def knockout_summary(rows: list[dict], arms: dict[str, list[int]], seed: int = 0) -> dict:
    """Accuracy curves of the knockout arms (single ranks and cumulative), each with its
    interval and its paired comparison against `none`."""
    single, cumulative = [], []
    for name, ids in arms.items():
        mine = [r for r in rows if r["arm"] == name]
        if not mine:
            continue
        kind, k = name.rsplit("-", 1)
        entry = {"arm": name, "set": kind.split("-")[1], "k": int(k), "ids": ids, **_accuracy(mine, seed),
                 "vs_none": paired(rows, name, "none")}
        (cumulative if "-cum" in kind else single).append(entry)
    return {"single": single, "cumulative": cumulative}


def _stage(run: Run) -> ShardParts:
    c = run.config
    final_stage, final_prefix = checkpoint_of(c, "final_student")
    inputs = {"prompts": run.output("prompts", "prompts.parquet"), "rock_sets": run.output("rock", "rock_sets.json"),
              **run.model_inputs("models", "teacher"), **run.model_inputs(final_stage, final_prefix, "final")}
    params = {"ablation": c.section("ablation"), "eval_max_gen_toks": c.eval.max_gen_toks,
              "batch_size": c.eval.batch_size, "answer_regex": answer_regex(c), "seed": c.seed}

    def shard_body(ctx: StageContext, i: int, n: int) -> None:
        rows = [r for r in prompts_stage.load(run) if r["split"] == "eval"]
        bounds = shard_bounds(len(rows), n, c.eval.batch_size)
        mine = rows[slice(*bounds[i])] if i < len(bounds) else []
        sets = json.loads(run.read(inputs["rock_sets"]))
        tdir = run.materialize("models", "teacher")
        teacher, tok = load_model(tdir, c.teacher.dtype).eval(), load_tokenizer(tdir)
        student = load_model(run.materialize(final_stage, final_prefix), c.student.dtype).eval()
        out: list[dict] = []

        def decode(arm: str, patch=(), forbid=(), keep_prob: float = 1.0) -> list[dict]:
            got = []
            for lo in range(0, len(mine), c.eval.batch_size):
                batch = mine[lo:lo + c.eval.batch_size]
                resp, n_sub, n_set = intervened_greedy(
                    student, teacher, [r["prompt_ids"] for r in batch], c.eval.max_gen_toks, tok.eos_token_id,
                    tok.pad_token_id, patch_ids=patch, forbid_ids=forbid, keep_prob=keep_prob,
                    seed=derive_seed(c.seed, "patch-thin", arm, i, lo), vocab=len(tok))
                for r, ids, k, m in zip(batch, resp, n_sub, n_set):
                    text = tok.decode(ids, skip_special_tokens=True)
                    got.append({"arm": arm, "prompt_id": r["prompt_id"], "response": text, "n_tokens": len(ids),
                                "n_patched": k, "n_set": m, "keep_prob": keep_prob,
                                "correct": is_correct(text, r["answer"], params["answer_regex"])})
            return got

        rock, rand = list(sets["rock"]), random_set(sets)
        by_arm = {"none": decode("none"), "rock": decode("rock", patch=set(rock)),
                  "random": decode("random", patch=set(rand))}
        ctx.progress(0.3, "patching arms decoded")
        if c.ablation.patch_match_share:
            m = share_match(share(by_arm["rock"]), share(by_arm["random"]))
            if m["matched_arm"]:
                hi = m["matched_arm"].removesuffix("-matched")
                by_arm[m["matched_arm"]] = decode(m["matched_arm"], patch=set(rock if hi == "rock" else rand),
                                                  keep_prob=m["keep_prob"])
        for rows_ in by_arm.values():
            out += rows_
        if c.ablation.knockout:
            arms = knockout_arms(rock, rand, c.ablation.knockout_single)
            for j, (arm, ids) in enumerate(arms.items()):
                out += decode(arm, forbid=set(ids))
                ctx.progress(0.3 + 0.7 * (j + 1) / len(arms), f"knockout {arm} decoded")
        ctx.put_table("part.parquet", pa.Table.from_pylist(out, schema=PART_SCHEMA))
    return params, inputs, shard_body


PART_SCHEMA = pa.schema([("arm", pa.string()), ("prompt_id", pa.int64()), ("response", pa.string()),
                         ("n_tokens", pa.int64()), ("n_patched", pa.int64()), ("n_set", pa.int64()),
                         ("keep_prob", pa.float64()), ("correct", pa.bool_())])


def n_shards(config: Config) -> int:
    return len(shard_bounds(config.data.n_eval, config.scale.shards, config.eval.batch_size))


def run(run: Run, stage: str = "patch", force: bool = False, progress=None) -> tuple[dict, bool]:
    params, inputs, shard_body = _stage(run)

    def finish(ctx: StageContext, parts: dict, shards: list[dict]) -> None:
        rows = concat_parts(run, parts).to_pylist()
        sets = json.loads(run.read(inputs["rock_sets"]))
        summary = arm_summary(rows, seed=run.config.seed)
        if run.config.ablation.patch_match_share:  # over all shards (each shard matched its own rows)
            a = summary["arms"]
            summary["share_match"] = {**share_match(a["rock"]["patched_token_share"], a["random"]["patched_token_share"]),
                                      "matched_arms": [k for k in a if k.endswith("-matched")]}
        summary["rock_ids"], summary["random_ids"] = list(sets["rock"]), random_set(sets)
        if run.config.ablation.knockout:
            arms = knockout_arms(list(sets["rock"]), random_set(sets), run.config.ablation.knockout_single)
            summary["knockout"] = knockout_summary(rows, arms, seed=run.config.seed)
        ctx.put_json("patching.json", summary)
        a = summary["arms"]
        ctx.metrics.update({f"accuracy_{arm}": round(s["accuracy"], 4) for arm, s in a.items()},
                           patched_token_share_rock=round(a["rock"]["patched_token_share"], 4),
                           patched_token_share_random=round(a["random"]["patched_token_share"], 4),
                           p_mcnemar_rock_vs_random=round(summary["comparisons"]["rock_vs_random"]["p_value"], 4))
        if "knockout" in summary:
            png = knockout_plot(summary["knockout"])
            ctx.put_bytes("knockout.png", png)
    return run_sharded(run, "patch", n=n_shards(run.config), params=params, inputs=inputs, table="patched",
                       shard_body=shard_body, finish=finish, force=force, progress=progress)


def knockout_plot(ko: dict) -> bytes:
    """Accuracy against knocked-out rank (single) and against the number knocked out
    (cumulative), rock and random, with the 95% intervals as bands."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, kind, xlabel in ((axes[0], "single", "rank knocked out (alone)"),
                             (axes[1], "cumulative", "ranks 1..k knocked out")):
        for name, color in (("rock", "#d62728"), ("random", "#7f7f7f")):
            pts = sorted((e for e in ko[kind] if e["set"] == name), key=lambda e: e["k"])
            if not pts:
                continue
            ks = [e["k"] for e in pts]
            ax.plot(ks, [e["accuracy"] for e in pts], marker="o", color=color, label=name)
            ax.fill_between(ks, [e["ci_low"] for e in pts], [e["ci_high"] for e in pts], color=color, alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend()
    axes[0].set_title("Knockout, one token at a time")
    axes[1].set_title("Knockout, cumulative over the ranked set")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _ci(e: dict) -> str:
    return f"{e['accuracy']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"


def _cmp(m: dict) -> str:
    return f"{m['diff']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}], McNemar p = {m['p_value']:.3g} " \
           f"({m['n_a_only']} vs {m['n_b_only']} discordant)"


def markdown(summary: dict, tok=None) -> str:
    arms, cmp = summary["arms"], summary["comparisons"]
    lines = ["Teacher patching: only real substitutions count (the teacher's token differs from the student's).", ""]
    sm = summary.get("share_match")
    if sm:
        lines += [f"Share matching: rock substituted {sm['shares']['rock']:.1%} of response tokens, random "
                  f"{sm['shares']['random']:.1%}; {sm['reason']}.", ""]
    lines += ["| arm | accuracy [95% CI] | n | substituted tokens | tokens in the set |", "|---|---|---|---|---|"]
    for arm, s in arms.items():
        lines.append(f"| {arm} | {_ci(s)} | {s['n']} | {s['patched_token_share']:.1%} | {s['set_token_share']:.1%} |")
    lines += ["", "| comparison (paired on prompts) | difference [95% CI], McNemar |", "|---|---|"]
    for name, m in cmp.items():
        lines.append(f"| {name.replace('_', ' ')} | {_cmp(m)} |")
    ko = summary.get("knockout")
    if ko:
        def names(ids):
            return ", ".join(repr(tok.decode([t])) if tok is not None else str(t) for t in ids)
        lines += ["", "Knockout (the token's logit set to -inf), against as many random tokens:", "",
                  "| arm | forbidden | accuracy [95% CI] | vs none |", "|---|---|---|---|"]
        for e in ko["single"] + ko["cumulative"]:
            lines.append(f"| {e['arm']} | {names(e['ids'])} | {_ci(e)} | {_cmp(e['vs_none'])} |")
    return "\n".join(lines)


def report(run: Run, entry: dict) -> str:
    import base64
    summary = json.loads(run.read_output("patch", "patching.json"))
    tok = load_tokenizer(run.materialize("models", "teacher"))
    lines = [f"# Inference-time interventions — run `{run.run_id}`", "", markdown(summary, tok)]
    if "knockout" in summary:
        png = run.read_output("patch", "knockout.png")
        lines += ["", f"![knockout](data:image/png;base64,{base64.b64encode(png).decode()})"]
    return "\n".join(lines)


STAGES = (Stage("patch", run, instances=lambda config: ["patch"] if patching_enabled(config) else [],
                needs=lambda config, stage: ["models", "prompts", "rock", checkpoint_of(config, "final_student")[0]],
                report=report, shard_parts=lambda run, stage: _stage(run), n_shards=lambda run, stage: n_shards(run.config)),)
patch_task, patch_shard_task = STAGES[0].task, STAGES[0].shard_task
