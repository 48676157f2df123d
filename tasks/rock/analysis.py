"""The stage `rock`: every compared checkpoint measured on each probe shard (records parts), then
the analysis over all parts (tokens.parquet, rock_sets.json, summary.json, report.md)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from safetensors.torch import load as st_load

from opdflow.infra.models.lm import load_model, load_tokenizer
from opdflow.infra.artifacts.manifest import Run, StageContext, materialize_refs
from opdflow.infra.artifacts.streaming import aggregate_dataset, token_dataset
from opdflow.tasks.control import matched_random
from opdflow.tasks.shards import run_sharded
from opdflow.tasks.stage import ShardParts, Stage, single
from opdflow.tasks.rock.measure import checkpoint_labels, mean_cosines, measure, selection_checkpoint
from opdflow.tasks.rock.method import (category, cross_fitted_stagnation, probe_halves, select, selection_persistence,
                                       shares, special_ids, stability, stagnation)
from opdflow.tasks.rock.probe import DIRECTIONS, PROBE, load_teacher, n_parts, probe_part, token_counts
from opdflow.tasks.rock.report import render_report, report, report_plots


def _rock_stage(run: Run) -> ShardParts:
    c = run.config
    ckpts = checkpoint_labels(c)
    inputs = {**run.outputs_under(PROBE, "probes"), "token_counts": run.output(PROBE, "token_counts.safetensors"),
              "directions": run.output(DIRECTIONS, "directions.safetensors"), **run.model_inputs("models", "teacher")}
    for label, st, prefix in ckpts:
        inputs.update(run.model_inputs(st, prefix, label))
    params = {"rock": c.section("rock"), "scoring": c.section("scoring"), "seed": c.seed,
              "random_share_tolerance": c.ablation.random_share_tolerance}

    def shard_body(ctx: StageContext, i: int, n: int) -> None:
        seqs = probe_part(run, i)
        teacher, tok = load_teacher(run)
        counts = token_counts(run, len(tok))
        refs = st_load(run.read(inputs["directions"]))
        lens = [len(r) for r in seqs["response_ids"].to_pylist()]
        base = {"prompt_id": [p for p, k in zip(seqs["prompt_id"].to_pylist(), lens) for _ in range(k)],
                "sample_idx": [s for s, k in zip(seqs["sample_idx"].to_pylist(), lens) for _ in range(k)],
                "position": [j for k in lens for j in range(k)],
                "token_id": [t for r in seqs["response_ids"].to_pylist() for t in r]}
        tables = []
        for j, (label, st, prefix) in enumerate(ckpts):
            model = load_model(run.materialize(st, prefix), c.student.dtype).eval()
            final = j == len(ckpts) - 1  # the final checkpoint: cosines to the corpus directions
            m, _ = measure(model, teacher, tok.pad_token_id, seqs, c.scoring.batch_size, counts,
                           refs=refs if final else None, vocab=len(tok),
                           chunk_tokens=c.scoring.chunk_tokens)
            if not final:
                m.update({f"cos_{name}": [None] * len(m["kl"]) for name in refs})
            table = pa.table({"checkpoint": [label] * len(base["token_id"]), **base, **m})
            tables.append(table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA))
            ctx.progress((j + 1) / len(ckpts), f"checkpoint {label} measured")
        ctx.put_table("part.parquet", pa.concat_tables(tables))
    return params, inputs, shard_body


RECORD_SCHEMA = pa.schema([("checkpoint", pa.string()), ("prompt_id", pa.int64()), ("sample_idx", pa.int64()),
                           ("position", pa.int64()), ("token_id", pa.int64()), ("kl", pa.float64()),
                           ("grad_norm", pa.float64()), ("student_top1", pa.int64()), ("teacher_top1", pa.int64()),
                           ("cos_freq_weighted", pa.float64()), ("cos_freq_balanced", pa.float64())])


def run(run: Run, stage: str = "rock", force: bool = False, progress=None) -> tuple[dict, bool]:
    params, inputs, shard_body = _rock_stage(run)

    def finish(ctx: StageContext, parts: dict, shards: list[dict]) -> None:
        analyse(run, ctx, materialize_refs(run.store, {k.split("/", 1)[1]: r for k, r in parts.items()}))
    return run_sharded(run, "rock", n=n_parts(run), params=params, inputs=inputs, table="records",
                       shard_body=shard_body, finish=finish, force=force, progress=progress)


STAGES = (
    Stage("rock", run, instances=single("rock"), report=lambda run, entry: report(run, entry),
          needs=lambda config, stage: [PROBE, DIRECTIONS, "models",
                                       *dict.fromkeys(st for _, st, _ in checkpoint_labels(config))],
          shard_parts=lambda run, stage: _rock_stage(run), n_shards=lambda run, stage: n_parts(run)),
)

def analyse(run: Run, ctx: StageContext, records_dir: Path) -> None:
    """The analysis over every shard's records: per-token aggregates stream over the parts
    (memory bounded by the vocabulary); the final checkpoint's per-position columns are
    read once for stability, prevalence and the gradient cosines."""
    c = run.config
    ckpts = checkpoint_labels(c)
    tok = load_tokenizer(run.materialize("models", "teacher"))
    dataset = token_dataset(records_dir)
    aggs = {label: aggregate_dataset(dataset, filter=pc.field("checkpoint") == label).to_dict() for label, _, _ in ckpts}
    final_label = selection_checkpoint(c)  # the latest compared checkpoint in training order
    final = dataset.to_table(filter=pc.field("checkpoint") == final_label).to_pydict()
    agg = aggs[final_label]
    special = special_ids(tok)
    ineligible = frozenset() if c.rock.special_eligible else frozenset(special)
    sel = select(agg, c.rock.n_rock, c.rock.n_control, c.rock.drop_top, c.rock.min_freq, ineligible)
    # the probe-set control (the share table, patching); each ablation seed draws its own on its trained tokens
    draw = matched_random({t: a["freq"] for t, a in agg.items()}, sel["rock"],
                          set(sel["control"]) | set(sel["dropped"]) | set(special), c.seed,
                          c.ablation.random_share_tolerance)
    rand = draw["ids"]
    sets = {"rock": sel["rock"], "control": sel["control"], "dropped": sel["dropped"], "random_matched": rand,
            "special": special, "checkpoint": final_label,
            "selection": {"min_freq": c.rock.min_freq, "drop_top": c.rock.drop_top,
                          "special_eligible": c.rock.special_eligible, "probe_decoding": c.rock.probe_decoding},
            "random_matched_share": {k: draw[k] for k in ("share", "target_share", "within_tolerance")}}
    summary = {
        "checkpoints": [lab for lab, _, _ in ckpts],
        "n_positions": len(final["token_id"]), "n_token_ids": len(agg),
        "rock": shares(agg, sel["rock"]), "control": shares(agg, sel["control"]),
        "random_matched": shares(agg, rand),
        "stagnation": stagnation(aggs, {"rock": sel["rock"], "control": sel["control"]}),
        **unbiased_stagnation(dataset, [lab for lab, _, _ in ckpts], final["prompt_id"], aggs, c.seed,
                              lambda a: select(a, c.rock.n_rock, c.rock.n_control, c.rock.drop_top, c.rock.min_freq,
                                               ineligible)),
        "stability": stability(final, [0.25, 0.5, 0.75], c.rock, c.seed, ineligible),
        "categories": _categories(tok, sel["rock"]),
        "prevalence": _prevalence(final, set(sel["rock"])),
        "gradient_cosine": mean_cosines(final["token_id"], {k[4:]: v for k, v in final.items() if k.startswith("cos_")},
                                        {"rock": sel["rock"], "control": sel["control"]}),
    }
    ctx.put_table("tokens.parquet", _token_table(tok, aggs, sel, rand))
    ctx.put_json("rock_sets.json", sets)
    ctx.put_json("summary.json", summary)
    plots = report_plots(aggs, sel, rand, final, summary)
    for name, png in plots.items():
        ctx.put_bytes(f"{name}.png", png)
    ctx.put_bytes("report.md", render_report(run.run_id, tok, agg, sel, summary, plots).encode())
    ctx.metrics.update(n_positions=summary["n_positions"], n_rock=len(sel["rock"]),
                       rock_token_share=round(summary["rock"]["token_share"], 4),
                       rock_kl_share=round(summary["rock"]["kl_share"], 4),
                       rock_grad_norm_share=round(summary["rock"]["grad_norm_share"], 4))


def unbiased_stagnation(dataset, labels: list[str], probe_prompt_ids: list[int], aggs: dict, seed: int,
                        choose) -> dict:
    """`cross_fitted` (select with `choose` on one probe half's latest checkpoint, trajectories
    on the other half, both folds), `probe_halves` (prompts per half) and `persistence` (the
    rock set selected at every checkpoint, Jaccard overlaps); checkpoints in training order."""
    labels = sorted(labels, key=lambda lab: 0 if lab == "initial" else int(lab[1:]))
    halves = dict(zip("ab", probe_halves(probe_prompt_ids, seed)))
    half_aggs = {h: {lab: aggregate_dataset(dataset, filter=(pc.field("checkpoint") == lab)
                                            & pc.field("prompt_id").isin(ids)).to_dict()
                     for lab in labels}
                 for h, ids in halves.items()}
    return {"cross_fitted": cross_fitted_stagnation(half_aggs, choose),
            "probe_halves": {h: len(ids) for h, ids in halves.items()},
            "persistence": selection_persistence({lab: aggs[lab] for lab in labels}, choose)}


def _categories(tok, ids: list[int]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for t in ids:
        out[category(tok.decode([t]))] += 1
    return dict(out)


def _prevalence(rec: dict[str, list], rock: set[int]) -> dict:
    """Per generated output: share of rock tokens, and high-KL events on non-rock tokens."""
    kls = sorted(rec["kl"])
    thresh = kls[int(0.9 * (len(kls) - 1))] if kls else 0.0
    per: dict[tuple, list] = defaultdict(lambda: [0, 0, 0])
    for p, s, t, k in zip(rec["prompt_id"], rec["sample_idx"], rec["token_id"], rec["kl"]):
        v = per[(p, s)]
        v[0] += 1
        v[1] += t in rock
        v[2] += (t not in rock) and k > thresh
    rows = list(per.values())
    return {"outputs": len(rows), "high_kl_threshold": thresh,
            "rock_share_per_output": [r[1] / r[0] for r in rows],
            "nonrock_high_kl_per_output": [r[2] for r in rows],
            "outputs_with_rock": sum(r[1] > 0 for r in rows) / max(1, len(rows))}


def _token_table(tok, aggs, sel, rand) -> pa.Table:
    final = aggs[list(aggs)[-1]]
    rank = {t: i + 1 for i, t in enumerate(sel["ranked"])}
    sets = {**{t: "rock" for t in sel["rock"]}, **{t: "control" for t in sel["control"]},
            **{t: "dropped" for t in sel["dropped"]}}
    ids = sorted(final, key=lambda t: (rank.get(t, 10**9), t))
    cols = {"token_id": ids, "token": [tok.decode([t]) for t in ids], "category": [category(tok.decode([t])) for t in ids],
            "rank": [rank.get(t) for t in ids], "set": [sets.get(t, "") for t in ids],
            "random_matched": [t in set(rand) for t in ids],
            "freq": [final[t]["freq"] for t in ids], "kl_sum": [final[t]["kl_sum"] for t in ids],
            "kl_mean": [final[t]["kl_mean"] for t in ids], "grad_norm_sum": [final[t]["grad_norm_sum"] for t in ids]}
    for label, a in aggs.items():
        cols[f"kl_mean_{label}"] = [a[t]["kl_mean"] if t in a else None for t in ids]
    return pa.table(cols)



(rock_task,) = (s.task for s in STAGES)
