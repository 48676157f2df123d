"""Stages `rock-probe`, `rock-directions`, `rock`: rock-token analysis (Rock Tokens in
On-Policy Distillation, 2026).

Method, as published:
1. The final student answers the held-out probe prompts (`rock.probe_decoding`: sampled
   with the rollout settings, the default, so the probe sees the on-policy distribution
   training sees; or greedy, as the paper's reference code probes); the teacher and each
   compared student checkpoint run on those same sequences.
2. At every generated position, the full-vocabulary reverse KL
   KL(p_s || p_t) = sum_v p_s (log p_s - log p_t), and its gradient in logit space
   p_s * (log p_s - log p_t - KL) with its L2 norm (from `opdflow.kernels`).
3. Aggregate by token id on the latest compared checkpoint in training order
   (`selection_checkpoint`, whatever order `rock.checkpoints` lists them in): frequency,
   cumulative KL, mean KL.
4. As the reference code selects: set the special ids (BOS/EOS/pad/unk) aside unless
   `rock.special_eligible` (default false: bypassing EOS changes when answers stop, not
   what they say), drop the `drop_top` most frequent ids and those seen fewer than
   `rock.min_freq` (default 2) times, rank the rest by frequency x mean KL (= cumulative
   KL); ranks 1..n_rock are rock tokens, the next n_control controls.

Also reported, as in the paper: each position's gradient cosine to the corpus-level
direction (frequency-weighted and frequency-balanced references). Beyond the paper:
the rocks' share of tokens, of total KL and of total gradient norm; stagnation (each set's mean KL across checkpoints); selection
stability when the probe set is subsampled (Jaccard, Spearman vs the full set); a
category breakdown of the rock strings; and a random control set (`matched_random`:
ids that are not rocks, controls, dropped or special, drawn to take the rocks' share of
the probe tokens, for the share table and patching; the ablation draws its own per seed
on each seed's trained tokens, see tasks/train.py).

Departures: on tiny vocabularies (the demo has tens of tokens) use small n_rock /
n_control / drop_top; the config says so rather than the code.

Three stages, each sharded over the probe set (`scale.shards`, see tasks/shards.py):
`rock-probe` samples the probe responses (step 1; `probes/part-*.parquet`) and counts their
tokens once (`token_counts.safetensors`),
`rock-directions` sums each shard's share of the two corpus-level gradient directions
(token frequencies taken over the whole probe set, so the shards' sums add up to the
unsharded sums; `directions.safetensors`), and `rock` measures every compared
checkpoint on its shard (steps 2; `records/part-*.parquet`, per position and
checkpoint) and then analyses all parts: per-token aggregates stream over the parts
with `opdflow.infra.streaming` (memory bounded by the vocabulary, not by the number of
positions). Outputs of `rock`: records parts, tokens.parquet (per token id),
rock_sets.json (rock, control, dropped, random_matched), summary.json, report.md with
embedded plots.
"""
from __future__ import annotations

import base64
import io
import math
import random
import re
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from opdflow.infra.config import Config, ScoringConfig, default
from opdflow.infra.lm import derive_seed, load_model, load_tokenizer, real_logits
from opdflow.infra.manifest import Run, StageContext, materialize_refs
from opdflow.infra.streaming import aggregate_dataset, token_dataset
from opdflow.infra.tables import parquet_to_table
from opdflow.infra.scoring import check_head_path, logit_transform, pack, response_hidden, split_model
from opdflow.kernels.loss import divergence_and_grad
from opdflow.tasks import prompts as prompts_stage
from opdflow.tasks.common import publish_table
from opdflow.tasks.control import matched_random, token_share
from opdflow.tasks.plan import checkpoint_of, round_stage
from opdflow.tasks.shards import concat_parts, run_sharded, shard_bounds
from opdflow.tasks.stage import ShardParts, Stage, single
from opdflow.tasks.rollout import generate

# -- the method as plain functions (tested with known answers) ---------------------------


def aggregate(token_ids: list[int], kls: list[float], grad_norms: list[float]) -> dict[int, dict]:
    """Per token id: freq, kl_sum, kl_mean, grad_norm_sum."""
    agg: dict[int, dict] = defaultdict(lambda: {"freq": 0, "kl_sum": 0.0, "grad_norm_sum": 0.0})
    for t, k, g in zip(token_ids, kls, grad_norms):
        a = agg[t]
        a["freq"] += 1
        a["kl_sum"] += k
        a["grad_norm_sum"] += g
    for a in agg.values():
        a["kl_mean"] = a["kl_sum"] / a["freq"]
    return dict(agg)


def select(agg: dict[int, dict], n_rock: int, n_control: int, drop_top: int, min_freq: int = 1,
           ineligible: frozenset[int] | set[int] = frozenset()) -> dict[str, list[int]]:
    """Rock and control sets, as the reference code selects: ids in `ineligible` (the special
    ids unless `rock.special_eligible`) are set aside first; the `drop_top` most frequent of
    the rest are dropped; ids seen fewer than `min_freq` times are not ranked; the others are
    ranked by freq x mean KL (= cumulative KL)."""
    by_freq = sorted((t for t in agg if t not in ineligible), key=lambda t: (-agg[t]["freq"], t))
    dropped = by_freq[:drop_top]
    rest = sorted((t for t in by_freq[drop_top:] if agg[t]["freq"] >= min_freq),
                  key=lambda t: (-agg[t]["freq"] * agg[t]["kl_mean"], t))
    return {"rock": rest[:n_rock], "control": rest[n_rock:n_rock + n_control], "dropped": dropped,
            "ranked": rest}


def shares(agg: dict[int, dict], ids: list[int]) -> dict[str, float]:
    """The set's share of generated tokens, of total KL and of total gradient norm."""
    tot = {k: sum(a[k] for a in agg.values()) for k in ("freq", "kl_sum", "grad_norm_sum")}
    s = {k: sum(agg[t][k] for t in ids if t in agg) for k in tot}
    return {"token_share": s["freq"] / tot["freq"] if tot["freq"] else 0.0,
            "kl_share": s["kl_sum"] / tot["kl_sum"] if tot["kl_sum"] else 0.0,
            "grad_norm_share": s["grad_norm_sum"] / tot["grad_norm_sum"] if tot["grad_norm_sum"] else 0.0}


def set_mean_kl(agg: dict[int, dict], ids: list[int] | None) -> float:
    """Token-weighted mean KL of a set (all tokens when ids is None)."""
    keys = agg.keys() if ids is None else [t for t in ids if t in agg]
    n = sum(agg[t]["freq"] for t in keys)
    return sum(agg[t]["kl_sum"] for t in keys) / n if n else float("nan")


def stagnation(aggs: dict[str, dict[int, dict]], sets: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Mean KL of each set at each checkpoint, and the change first -> last checkpoint.

    Rows: each given set, `non_rock` (every token id seen at any checkpoint that is not in
    `sets["rock"]`, when a rock set is given) and `all` (every token, rocks included)."""
    labels = list(aggs)
    out = {}
    extra: dict[str, list[int] | None] = {}
    if "rock" in sets:
        rock = set(sets["rock"])
        extra["non_rock"] = sorted({t for a in aggs.values() for t in a} - rock)
    for name, ids in {**sets, **extra, "all": None}.items():
        row = {lab: set_mean_kl(aggs[lab], ids) for lab in labels}
        first, last = row[labels[0]], row[labels[-1]]
        row["change"] = last - first
        row["relative_change"] = (last - first) / first if first else float("nan")
        out[name] = row
    return out


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# -- stagnation without selection bias ---------------------------------------------------
# Selecting rocks for high KL at the last checkpoint and then reading their KL trajectory
# off the same sequences favours "stays high" by construction (the selection picked the
# tokens whose noise was high there). Cross-fitting selects on one half of the probe
# prompts and measures the trajectories on the other half, then the reverse.


def probe_halves(prompt_ids: list[int], seed: int) -> tuple[list[int], list[int]]:
    """The probe prompts cut in two halves at random (seeded), each sorted."""
    ids = sorted(set(prompt_ids))
    random.Random(derive_seed(seed, "cross-fit")).shuffle(ids)
    mid = len(ids) // 2
    return sorted(ids[:mid]), sorted(ids[mid:])


def cross_fitted_stagnation(half_aggs: dict[str, dict[str, dict[int, dict]]], choose) -> dict[str, dict]:
    """`half_aggs[half][checkpoint]`: per-token aggregates of the two probe halves ("a", "b")
    at each compared checkpoint, in training order. For each fold, `choose(agg)` (the rock
    selection, returning {"rock": [...], "control": [...]}) runs on one half's last checkpoint
    and `stagnation` measures those sets on the other half. Returns
    {"select_a_measure_b": {"rock": [...], "control": [...], "stagnation": {...}}, "select_b_measure_a": ...}."""
    halves = list(half_aggs)
    if len(halves) != 2:
        raise ValueError(f"cross-fitting needs two halves, got {halves}")
    out = {}
    for sel_half, meas_half in (halves, halves[::-1]):
        last = list(half_aggs[sel_half])[-1]
        chosen = choose(half_aggs[sel_half][last])
        sets = {"rock": list(chosen["rock"]), "control": list(chosen["control"])}
        out[f"select_{sel_half}_measure_{meas_half}"] = {**sets, "stagnation": stagnation(half_aggs[meas_half], sets)}
    return out


def selection_persistence(aggs: dict[str, dict[int, dict]], choose) -> dict:
    """The rock set selected at every compared checkpoint, and the Jaccard overlap of each
    pair (persistence of the set across training is the paper's stagnation claim in its
    sharpest form: the same tokens stay the worst)."""
    labels = list(aggs)
    sets = {lab: list(choose(aggs[lab])["rock"]) for lab in labels}
    pairs = {f"{a}~{b}": jaccard(sets[a], sets[b]) for i, a in enumerate(labels) for b in labels[i + 1:]}
    return {"rock_sets": sets, "jaccard": pairs,
            "jaccard_with_last": {lab: jaccard(sets[lab], sets[labels[-1]]) for lab in labels}}


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r
    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else float("nan")


def stability(records: dict[str, list], fractions: list[float], rc, seed: int,
              ineligible: frozenset[int] | set[int] = frozenset()) -> list[dict]:
    """Re-select on random subsets of the probe prompts; compare with the full selection."""
    full = aggregate(records["token_id"], records["kl"], records["grad_norm"])
    min_freq = getattr(rc, "min_freq", 1)
    full_sel = select(full, rc.n_rock, rc.n_control, rc.drop_top, min_freq, ineligible)
    prompts = sorted(set(records["prompt_id"]))
    out = []
    for frac in fractions:
        keep = set(random.Random(derive_seed(seed, "stability", frac)).sample(prompts, max(1, int(len(prompts) * frac))))
        idx = [i for i, p in enumerate(records["prompt_id"]) if p in keep]
        sub = aggregate([records["token_id"][i] for i in idx], [records["kl"][i] for i in idx],
                        [records["grad_norm"][i] for i in idx])
        sel = select(sub, rc.n_rock, rc.n_control, rc.drop_top, min_freq, ineligible)
        common = [t for t in full if t in sub]
        out.append({"fraction": frac, "prompts": len(keep), "jaccard_rock": jaccard(sel["rock"], full_sel["rock"]),
                    "spearman_score": spearman([full[t]["kl_sum"] for t in common], [sub[t]["kl_sum"] for t in common])})
    return out


def special_ids(tok) -> list[int]:
    """The tokenizer's special ids (BOS, EOS, pad, unk, ...)."""
    ids = set(getattr(tok, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(tok, name, None) is not None:
            ids.add(getattr(tok, name))
    return sorted(ids)


DISCOURSE = {"so", "then", "thus", "therefore", "because", "but", "and", "first", "next", "now", "wait", "hence"}


def category(s: str) -> str:
    w = s.strip().lower()
    if not s.strip():
        return "whitespace"
    if w.isdigit():
        return "digits"
    if w in DISCOURSE:
        return "discourse"
    if re.fullmatch(r"[+\-*/=<>^%×÷]+", w):
        return "math"
    if re.fullmatch(r"[\W_]+", w):
        return "punctuation"
    return "other"


# -- the stage -------------------------------------------------------------------------


def checkpoint_labels(config: Config) -> list[tuple[str, str, str]]:
    """(label, stage, prefix) of each compared checkpoint, in training order whatever the
    order of `rock.checkpoints`: the last one is where the rock set is selected."""
    r = config.train.rounds
    named = {"initial": 0, "middle": (r + 1) // 2, "final": r}
    rounds = sorted({min(named[c] if c in named else int(c[1:]), r) for c in config.rock.checkpoints})
    return [("initial", "models", "student") if rr == 0 else (f"r{rr:02d}", round_stage("train", rr), "model")
            for rr in rounds]


def selection_checkpoint(config: Config) -> str:
    """The label of the checkpoint the rock set is selected on: the latest compared one."""
    return checkpoint_labels(config)[-1][0]


@torch.no_grad()
def measure(model, teacher, pad_id: int, table: pa.Table, batch_size: int, counts: torch.Tensor,
            refs: dict[str, torch.Tensor] | None = None, vocab: int | None = None,
            chunk_tokens: int = default(ScoringConfig, "chunk_tokens")) -> tuple[dict[str, list], dict[str, torch.Tensor]]:
    """Per position: reverse KL, its logit-space gradient norm, both top-1s; plus this
    table's share of the two corpus-level gradient directions (sums over positions:
    frequency-weighted, and weighted 1/frequency of the token id, i.e. each token id counts
    once; `counts` are the token frequencies over the whole probe set, so shards' sums add
    up to the corpus sums). With `refs`, also each position's gradient cosine to each
    reference direction. `vocab` (the tokenizer's size) cuts padded lm_head rows off both
    models' logits: the divergence, gradients and top-1s are over the real vocabulary.

    Memory: both model bodies run to final hidden states (`infra.scoring`'s split), and the
    lm_heads are applied `chunk_tokens` positions at a time, so no more than a few
    ``[chunk_tokens, V]`` float32 tensors exist at once whatever the batch and sequence
    length; only the running totals of the two V-sized direction sums are float64. The
    divergence and its gradient: the fused kernel on CUDA, the closed form
    (`kernels.reference.dense_reverse_kl_and_grad`) elsewhere."""
    if chunk_tokens < 1 or batch_size < 1:
        raise ValueError("chunk_tokens and batch_size must be at least 1")
    prompts, responses = table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist()
    tokens = torch.tensor([t for r in responses for t in r], dtype=torch.long)
    limit = min(vocab or len(counts), len(counts))
    if tokens.numel() and int(tokens.max()) >= limit:
        raise ValueError(f"a response token id {int(tokens.max())} is beyond the vocabulary ({limit} ids): "
                         "the probe sampled a padded lm_head row")
    inv_freq = 1.0 / counts.double()[tokens]
    out = {k: [] for k in ("kl", "grad_norm", "student_top1", "teacher_top1")}
    out.update({f"cos_{name}": [] for name in (refs or {})})
    sums: dict[str, torch.Tensor] = {}
    parts = [(split_model(m), logit_transform(m), next(m.parameters()).device) for m in (model, teacher)]
    dev = parts[0][2]
    refs32 = {name: (ref.to(dev, torch.float32), float(ref.double().norm())) for name, ref in (refs or {}).items()}
    if prompts:  # refuse an arch whose logits are not base -> head -> transform (as teacher scoring does)
        j = max(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        if len(prompts[j]) + len(responses[j]):
            for m, ((base, head), transform, _) in zip((model, teacher), parts):
                check_head_path(m, base, head, transform, list(prompts[j]) + list(responses[j]), chunk_tokens)
    pos = 0
    for lo in range(0, len(prompts), batch_size):
        ps, rs = prompts[lo:lo + batch_size], responses[lo:lo + batch_size]
        if not sum(len(r) for r in rs):
            continue
        ids, mask, rows, cols = pack(ps, rs, pad_id)
        (_, s_head), s_tf, _ = parts[0]
        (_, t_head), t_tf, _ = parts[1]
        s_hidden, t_hidden = (response_hidden(base, ids, mask, rows, cols, d) for (base, _), _, d in parts)
        for c in range(0, s_hidden.shape[0], chunk_tokens):
            s_logits = real_logits(s_tf(s_head(s_hidden[c:c + chunk_tokens])), vocab).float()
            t_logits = real_logits(t_tf(t_head(t_hidden[c:c + chunk_tokens])), vocab).float().to(dev)
            out["student_top1"] += s_logits.argmax(-1).tolist()
            out["teacher_top1"] += t_logits.argmax(-1).tolist()
            s_logits = s_logits.contiguous()
            # the gradient replaces the student's logits in place (no second [chunk, V] buffer)
            kl, grad, gnorm = divergence_and_grad(s_logits, teacher_logits=t_logits.contiguous(), kind="reverse_kl",
                                                  grad_out=s_logits)
            del t_logits
            grad = grad.float()
            w = inv_freq[pos:pos + len(kl)].to(dev)
            pos += len(kl)
            # a chunk's sums as float32 matrix-vector products (no [chunk, V] temporary, a chunk of
            # rows per sum); only their running totals over the table are float64
            weights = torch.stack([torch.ones_like(w), w]).to(grad.dtype)
            for name, part in zip(("freq_weighted", "freq_balanced"), (weights @ grad).double()):
                sums[name] = sums[name] + part if name in sums else part
            for name, (ref, ref_norm) in refs32.items():
                cos = (grad @ ref).double() / (gnorm.double() * ref_norm).clamp_min(1e-30)
                out[f"cos_{name}"] += cos.tolist()
            out["kl"] += kl.tolist()
            out["grad_norm"] += gnorm.tolist()
            del s_logits, grad
        del s_hidden, t_hidden
    return out, sums


def mean_cosines(token_ids: list[int], cosines: dict[str, list[float]], sets: dict[str, list[int]]) -> dict:
    """Mean gradient cosine to each corpus-level direction, per token set and overall."""
    out = {}
    for name, ids in {**sets, "all": None}.items():
        keep = [i for i, t in enumerate(token_ids) if ids is None or t in set(ids)]
        out[name] = {ref: (sum(c[i] for i in keep) / len(keep) if keep else float("nan")) for ref, c in cosines.items()}
    return out


# -- the stages: rock-probe -> rock-directions -> rock, each sharded over the probe set ------

PROBE, DIRECTIONS = "rock-probe", "rock-directions"


def probe_shards(config: Config) -> int:
    """Shards of the probe sampling (cut at rollout batch boundaries, like a rollout)."""
    return len(shard_bounds(config.data.n_probe * config.rock.samples_per_prompt, config.scale.shards,
                            config.rollout.batch_size))


def n_parts(run: Run) -> int:
    """rock-directions and rock shard along the probe's parts."""
    return len(run.outputs_under(PROBE, "probes"))


def _probe_part(run: Run, i: int) -> pa.Table:
    parts = run.outputs_under(PROBE, "probes")
    return parquet_to_table(run.read(parts[sorted(parts)[i]]))


def count_tokens(run: Run, parts: dict) -> torch.Tensor:
    """Token frequencies over the whole probe set (every part's responses), indexed by id."""
    counts = torch.zeros(0, dtype=torch.long)
    for ref in parts.values():
        ids = torch.tensor([t for r in parquet_to_table(run.read(ref)).column("response_ids").to_pylist() for t in r],
                           dtype=torch.long)
        part = torch.bincount(ids)
        counts = torch.nn.functional.pad(counts, (0, max(0, len(part) - len(counts))))
        counts[:len(part)] += part
    return counts


def token_counts(run: Run, vocab: int) -> torch.Tensor:
    """The probe set's token frequencies, counted once by rock-probe, over `vocab` ids."""
    counts = st_load(run.read_output(PROBE, "token_counts.safetensors"))["counts"]
    return torch.nn.functional.pad(counts, (0, vocab - len(counts)))


def _teacher(run: Run):
    tdir = run.materialize("models", "teacher")
    return load_model(tdir, run.config.teacher.dtype).eval(), load_tokenizer(tdir)


def probe_settings(config: Config):
    """The probe's sampling: the rollout settings (`rock.probe_decoding: sampled`, the default,
    so the probe sees the on-policy distribution training sees) or greedy decoding (as the
    paper's reference code probes)."""
    from dataclasses import replace
    from opdflow.tasks.rollout import settings
    base = settings(config)
    return base if config.rock.probe_decoding == "sampled" else replace(base, temperature=0.0, top_p=1.0, top_k=0)


def _probe_stage(run: Run) -> ShardParts:
    c = run.config
    final_stage, final_prefix = checkpoint_of(c, "final_student")
    inputs = {"prompts": run.output("prompts", "prompts.parquet"), **run.model_inputs(final_stage, final_prefix, "final")}
    params = {"rock": c.section("rock"), "rollout": c.section("rollout"), "seed": c.seed}

    def shard_body(ctx: StageContext, i: int, n: int) -> None:
        probe = [r for r in prompts_stage.load(run) if r["split"] == "probe"]
        jobs = [(r, j) for r in probe for j in range(c.rock.samples_per_prompt)]
        lo, hi = shard_bounds(len(jobs), n, c.rollout.batch_size)[i]
        ctx.put_table("part.parquet", generate(run, run.materialize(final_stage, final_prefix), jobs[lo:hi],
                                               ("probe",), ctx, sample=probe_settings(c)))
    return params, inputs, shard_body


def _directions_stage(run: Run) -> ShardParts:
    c = run.config
    final_stage, final_prefix = checkpoint_of(c, "final_student")
    inputs = {**run.outputs_under(PROBE, "probes"), "token_counts": run.output(PROBE, "token_counts.safetensors"),
              **run.model_inputs("models", "teacher"), **run.model_inputs(final_stage, final_prefix, "final")}
    params = {"rock": c.section("rock"), "scoring": c.section("scoring")}

    def shard_body(ctx: StageContext, i: int, n: int) -> None:
        teacher, tok = _teacher(run)
        model = load_model(run.materialize(final_stage, final_prefix), c.student.dtype).eval()
        _, sums = measure(model, teacher, tok.pad_token_id, _probe_part(run, i), c.scoring.batch_size,
                          token_counts(run, len(tok)), vocab=len(tok), chunk_tokens=c.scoring.chunk_tokens)
        ctx.put_table("part.parquet", pa.table({"direction": list(sums), "sum": [v.tolist() for v in sums.values()]}))
    return params, inputs, shard_body


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
        seqs = _probe_part(run, i)
        teacher, tok = _teacher(run)
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


def run_probe(run: Run, stage: str = PROBE, force: bool = False, progress=None) -> tuple[dict, bool]:
    params, inputs, shard_body = _probe_stage(run)

    def finish(ctx: StageContext, parts: dict, shards: list[dict]) -> None:
        from opdflow.tasks.rollout import merged_metrics
        ctx.metrics.update(merged_metrics(shards))
        # counted once here, where the probe set is complete: every later shard reads this
        ctx.put_bytes("token_counts.safetensors", st_save({"counts": count_tokens(run, parts)}))
    return run_sharded(run, PROBE, n=probe_shards(run.config), params=params, inputs=inputs, table="probes",
                       shard_body=shard_body, finish=finish, force=force, progress=progress)


def run_directions(run: Run, stage: str = DIRECTIONS, force: bool = False, progress=None) -> tuple[dict, bool]:
    params, inputs, shard_body = _directions_stage(run)

    def finish(ctx: StageContext, parts: dict, shards: list[dict]) -> None:
        total: dict[str, torch.Tensor] = {}
        for row in concat_parts(run, parts).to_pylist():  # the corpus directions: sums of the shards' sums
            v = torch.tensor(row["sum"], dtype=torch.float64)
            total[row["direction"]] = total[row["direction"]] + v if row["direction"] in total else v
        ctx.put_bytes("directions.safetensors", st_save(total))
        ctx.metrics.update({f"norm_{k}": round(float(v.norm()), 6) for k, v in total.items()})
    return run_sharded(run, DIRECTIONS, n=n_parts(run), params=params, inputs=inputs, table="directions",
                       shard_body=shard_body, finish=finish, force=force, progress=progress)


def run(run: Run, stage: str = "rock", force: bool = False, progress=None) -> tuple[dict, bool]:
    params, inputs, shard_body = _rock_stage(run)

    def finish(ctx: StageContext, parts: dict, shards: list[dict]) -> None:
        analyse(run, ctx, materialize_refs(run.store, {k.split("/", 1)[1]: r for k, r in parts.items()}))
    return run_sharded(run, "rock", n=n_parts(run), params=params, inputs=inputs, table="records",
                       shard_body=shard_body, finish=finish, force=force, progress=progress)


def _final(config: Config) -> str:
    return checkpoint_of(config, "final_student")[0]


STAGES = (
    Stage(PROBE, run_probe, instances=single(PROBE), needs=lambda config, stage: ["prompts", _final(config)],
          shard_parts=lambda run, stage: _probe_stage(run), n_shards=lambda run, stage: probe_shards(run.config)),
    Stage(DIRECTIONS, run_directions, instances=single(DIRECTIONS),
          needs=lambda config, stage: [PROBE, "models", _final(config)],
          shard_parts=lambda run, stage: _directions_stage(run), n_shards=lambda run, stage: n_parts(run)),
    # `report` is defined below; the lambda looks it up when a task publishes
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
    plots = _plots(aggs, sel, rand, final, summary)
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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _plots(aggs, sel, rand, rec, summary) -> dict[str, bytes]:
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
    plots["funnel"] = _png(fig)

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
    plots["trajectories"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = [("rock", summary["rock"]), ("control", summary["control"]), ("random", summary["random_matched"])]
    metrics = ["token_share", "kl_share", "grad_norm_share"]
    for i, (name, s) in enumerate(groups):
        ax.bar([j + i * 0.27 for j in range(3)], [s[m] for m in metrics], width=0.27, label=name)
    ax.set_xticks([j + 0.27 for j in range(3)], ["tokens", "KL", "grad norm"])
    ax.set_ylabel("share of total")
    ax.set_title("Shares of tokens, KL and gradient norm")
    ax.legend()
    plots["shares"] = _png(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    pv = summary["prevalence"]
    ax1.hist(pv["rock_share_per_output"], bins=20, color="#d62728")
    ax1.set_xlabel("share of rock tokens in an output")
    ax1.set_ylabel("outputs")
    ax1.set_title("Rock prevalence per output")
    ax2.hist(pv["nonrock_high_kl_per_output"], bins=20, color="#7f7f7f")
    ax2.set_xlabel("non-rock high-KL events per output")
    ax2.set_title(f"KL > p90 ({pv['high_kl_threshold']:.3f}) on non-rock tokens")
    plots["prevalence"] = _png(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    st = summary["stability"]
    ax.plot([s["fraction"] for s in st] + [1.0], [s["jaccard_rock"] for s in st] + [1.0], marker="o", label="Jaccard (rock set)")
    ax.plot([s["fraction"] for s in st] + [1.0], [s["spearman_score"] for s in st] + [1.0], marker="s", label="Spearman (scores)")
    ax.set_xlabel("fraction of probe prompts")
    ax.set_ylim(0, 1.05)
    ax.set_title("Selection stability vs probe-set size")
    ax.legend()
    plots["stability"] = _png(fig)
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


def _img(png: bytes, alt: str) -> str:
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
              "## Funnel", "", _img(plots["funnel"], "funnel"), "",
              f"## Stagnation across checkpoints: {stagnation_caption(summary)}", "",
              "| set | " + " | ".join(summary["checkpoints"]) + " | change |",
              "|---|" + "---|" * (len(summary["checkpoints"]) + 1)]
    for name, row in summary["stagnation"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in summary["checkpoints"])
                     + f" | {row['change']:+.4f} |")
    lines += unbiased_stagnation_markdown(summary, tok)
    lines += ["", _img(plots["trajectories"], "trajectories"), "",
              "## Gradient share and direction", "", _img(plots["shares"], "shares"), "",
              "Mean cosine of each position's reverse-KL gradient (logit space) to the corpus-level direction: "
              "the sum of all positions' gradients (frequency-weighted) or of each token id's mean gradient "
              "(frequency-balanced).", "", "| set | freq-weighted | freq-balanced |", "|---|---|---|"]
    for name, row in summary["gradient_cosine"].items():
        lines.append(f"| {name} | {row['freq_weighted']:.3f} | {row['freq_balanced']:.3f} |")
    lines += ["",
              "## Prevalence per output", "",
              f"{summary['prevalence']['outputs_with_rock']:.0%} of outputs contain at least one rock token.", "",
              _img(plots["prevalence"], "prevalence"), "",
              "## Stability of the selection", "", "| probe fraction | prompts | Jaccard (rock) | Spearman |",
              "|---|---|---|---|"]
    for s in summary["stability"]:
        lines.append(f"| {s['fraction']:.2f} | {s['prompts']} | {s['jaccard_rock']:.2f} | {s['spearman_score']:.2f} |")
    lines += ["", _img(plots["stability"], "stability")]
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


rock_probe_task, rock_directions_task, rock_task = (s.task for s in STAGES)

__all__ = ["aggregate", "select", "shares", "stagnation", "stability", "matched_random", "token_share", "special_ids",
           "checkpoint_labels", "selection_checkpoint", "probe_settings", "category", "jaccard",
           "spearman", "run", "report", "rock_task"]
