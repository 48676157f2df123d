"""Backend sensitivity: one checkpoint decoded greedily under every available backend.

Why: "The Silent Hyperparameter" (2026) measured that the inference backend alone moves benchmark
scores by up to 16.6 points and makes backends disagree on many outputs. opdflow samples with one
backend (transformers, native, vLLM, a server) and trains and evaluates with others, so how much
the backend matters is measured here, on the run's own checkpoint and prompts, with identical
decoding settings (greedy, the same max_new_tokens, EOS stops):

- per backend: the score (demo answers correct) with a 95% bootstrap interval (`tasks.stats.mean_ci`);
- per pair of backends: the share of prompts whose outputs differ, and where they first diverge
  (a histogram of the first differing token position);
- per backend: per-token logprob differences on a shared teacher-forced pass: the reference
  backend's (the first one's) responses are scored teacher-forced by every backend that has its own
  forward pass (transformers: the model's forward; vLLM: `prompt_logprobs` on its server; native
  decodes with the same transformers forward and has no separate one), and compared with the
  reference's; and each backend's own decode-time logprobs against the reference forward on its
  own tokens.

`measure(config, model_dir, prompts, answers, backends)` runs the backends and returns the
comparison (`compare`, pure); `markdown` renders the report section. A backend that cannot run
here (vLLM without its environment) is listed with the reason, never silently dropped.
"""
from __future__ import annotations

import itertools
from contextlib import ExitStack
from typing import Sequence

import numpy as np

from opdflow.infra.models.lm import Sample, SampleSettings
from opdflow.tasks.stage import Stage

HIST_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first token position where two outputs differ (a length difference counts at the
    shorter one's end); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def histogram(positions: Sequence[int], edges: Sequence[int] = HIST_EDGES) -> dict[str, int]:
    """Counts of positions per bin [edge_i, edge_{i+1}); the last bin is open."""
    out: dict[str, int] = {}
    for lo, hi in zip(edges, list(edges[1:]) + [None]):
        label = f"{lo}+" if hi is None else (str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}")
        n = sum(1 for p in positions if p >= lo and (hi is None or p < hi))
        if n:
            out[label] = n
    return out


def _abs_diffs(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    return np.array([abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)], dtype=np.float64)


def _diff_summary(d: np.ndarray) -> dict:
    if d.size == 0:
        return {"n_tokens": 0}
    return {"n_tokens": int(d.size), "mean_abs": float(d.mean()), "p99_abs": float(np.quantile(d, 0.99)),
            "max_abs": float(d.max())}


def compare(outputs: dict[str, list[list[int]]], correct: dict[str, list[bool]] | None = None,
            decode_vs_forward: dict[str, tuple[list[list[float]], list[list[float]]]] | None = None,
            forced: dict[str, list[list[float]]] | None = None, n_resamples: int = 2000, seed: int = 0) -> dict:
    """The comparison of greedy outputs (backend -> token ids per prompt, same prompt order).

    correct: backend -> per-prompt correctness (the score and its CI); decode_vs_forward: backend ->
    (its decode-time logprobs, the reference forward's logprobs of the same tokens); forced:
    backend -> teacher-forced logprobs of the reference backend's responses."""
    from opdflow.tasks.stats import mean_ci
    names = list(outputs)
    n = {len(v) for v in outputs.values()}
    if len(n) != 1:
        raise ValueError(f"backends answered different numbers of prompts: { {k: len(v) for k, v in outputs.items()} }")
    per_backend = {}
    for name in names:
        row: dict = {"mean_tokens": float(np.mean([len(o) for o in outputs[name]])) if outputs[name] else 0.0}
        if correct and name in correct:
            x = np.asarray(correct[name], dtype=np.float64)[None, :]
            row["score"] = mean_ci(x, n_resamples=n_resamples, seed=seed)
        if decode_vs_forward and name in decode_vs_forward:
            row["decode_vs_reference_forward"] = _diff_summary(_abs_diffs(*decode_vs_forward[name]))
        per_backend[name] = row
    pairs = []
    for a, b in itertools.combinations(names, 2):
        div = [first_divergence(x, y) for x, y in zip(outputs[a], outputs[b])]
        pos = [d for d in div if d is not None]
        pairs.append({"a": a, "b": b, "n_prompts": len(div), "n_differ": len(pos),
                      "share_differ": len(pos) / max(1, len(div)), "first_divergence_hist": histogram(pos)})
    teacher_forced = {}
    if forced:
        ref = names[0]
        if ref in forced:
            for name, lps in forced.items():
                if name != ref:
                    teacher_forced[name] = _diff_summary(_abs_diffs(lps, forced[ref]))
    return {"backends": names, "reference": names[0], "per_backend": per_backend, "pairs": pairs,
            "teacher_forced_vs_reference": teacher_forced}


def markdown(result: dict, skipped: dict[str, str] | None = None) -> str:
    """The report section."""
    lines = ["## Backend sensitivity", "",
             f"One checkpoint, greedy decoding, identical settings; reference backend: `{result['reference']}`.", "",
             "| backend | score (95% CI) | mean tokens | decode logprob vs reference forward: mean / max abs |",
             "|---|---|---|---|"]
    for name in result["backends"]:
        row = result["per_backend"][name]
        s = row.get("score")
        score = f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if s else "n/a"
        d = row.get("decode_vs_reference_forward") or {}
        diff = f"{d['mean_abs']:.2e} / {d['max_abs']:.2e}" if d.get("n_tokens") else "n/a"
        lines.append(f"| {name} | {score} | {row['mean_tokens']:.1f} | {diff} |")
    lines += ["", "| pair | prompts differing | first divergence (position: count) |", "|---|---|---|"]
    for p in result["pairs"]:
        hist = ", ".join(f"{k}: {v}" for k, v in p["first_divergence_hist"].items()) or "none"
        lines.append(f"| {p['a']} vs {p['b']} | {p['n_differ']}/{p['n_prompts']} ({p['share_differ']:.1%}) | {hist} |")
    if result["teacher_forced_vs_reference"]:
        lines += ["", f"Teacher-forced logprobs of `{result['reference']}`'s responses, against its own forward:", "",
                  "| backend | tokens | mean abs | p99 abs | max abs |", "|---|---|---|---|---|"]
        for name, d in result["teacher_forced_vs_reference"].items():
            lines.append(f"| {name} | {d['n_tokens']} | {d['mean_abs']:.2e} | {d['p99_abs']:.2e} | {d['max_abs']:.2e} |")
    for name, why in (skipped or {}).items():
        lines.append(f"\n`{name}` did not run: {why}")
    return "\n".join(lines)


# -- running the backends ---------------------------------------------------------------------

def greedy_settings(max_new_tokens: int, batch_size: int) -> SampleSettings:
    return SampleSettings(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, batch_size=batch_size)


def forward_logprobs(model, tok, prompts, responses, batch_size: int = 32) -> list[list[float]]:
    """Teacher-forced logprobs of each response token under `model` (the transformers forward)."""
    from opdflow.infra.models.scoring import teacher_scores
    return [s[0] for s in teacher_scores(model, prompts, responses, tok.pad_token_id, 1, batch_size)]


def measure(config, model_dir, prompts: list[list[int]], answers: list[str] | None, backends: Sequence[str],
            max_new_tokens: int, batch_size: int = 32) -> tuple[dict, dict[str, str]]:
    """Greedy outputs of `model_dir` under each backend, compared (`compare`); returns the result
    and {backend: why it did not run}."""
    from opdflow.infra.sampling import native, vllm_backend
    from opdflow.infra.models.lm import load_model, load_tokenizer, sample
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, config.student.dtype).eval()
    st = greedy_settings(max_new_tokens, batch_size)
    seeds = list(range(len(prompts)))  # unused by greedy decoding, required by the samplers
    outs: dict[str, list[Sample]] = {}
    skipped: dict[str, str] = {}
    forced: dict[str, list[list[float]]] = {}
    with ExitStack() as stack:  # a vLLM server started here is stopped on every way out
        client = None
        for name in backends:
            if name == "transformers":
                outs[name] = sample(model, prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)
            elif name == "native":
                try:
                    outs[name] = native.sample(model, prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)
                finally:
                    native.clear_samplers()
            elif name == "vllm":
                try:
                    vllm_backend.check_available(config.rollout.vllm, "rollout.vllm")
                except vllm_backend.VllmUnavailable as e:
                    skipped[name] = str(e)
                    continue
                # raw logprobs (the model's distribution): greedy decoding and teacher forcing alike
                srv = stack.enter_context(vllm_backend.serving(config.rollout.vllm, model_dir, config.student.dtype,
                                                               max_logprobs=1, logprobs_mode=None,
                                                               field="rollout.vllm"))
                client = stack.enter_context(vllm_backend.client(config.rollout.vllm, srv))
                client.check_tokenizer(tok)
                outs[name] = client.sample(prompts, seeds, st, tok.eos_token_id, tok.pad_token_id)
            else:
                skipped[name] = "not a backend the sensitivity stage runs (transformers, native, vllm)"
        if not outs:
            raise RuntimeError(f"no backend ran: {skipped}")
        ref = next(iter(outs))
        ref_resp = [s.response_ids for s in outs[ref]]
        forced[ref] = forward_logprobs(model, tok, prompts, ref_resp, batch_size)
        if client is not None:
            forced["vllm"] = [s[0] for s in client.score(prompts, ref_resp, 1)]
    decode_vs_forward = {name: ([s.logprobs for s in o], forward_logprobs(model, tok, prompts,
                                                                          [s.response_ids for s in o], batch_size))
                         for name, o in outs.items()}
    correct = None
    if answers is not None:
        from opdflow.infra.testbeds.demo import extract_answer
        correct = {name: [extract_answer(tok.decode(s.response_ids, skip_special_tokens=True)) == a
                          for s, a in zip(o, answers)] for name, o in outs.items()}
    result = compare({k: [s.response_ids for s in v] for k, v in outs.items()}, correct, decode_vs_forward, forced)
    return result, skipped


# -- the stage --------------------------------------------------------------------------------

def _stage_inputs(run):
    from opdflow.tasks.plan import checkpoint_of
    src = checkpoint_of(run.config, run.config.sensitivity.checkpoint)
    return src, {"prompts": run.output("prompts", "prompts.parquet"), **run.model_inputs(*src, "student")}


def run(run, stage: str = "sensitivity", force: bool = False, progress=None) -> tuple[dict, bool]:
    """Stage `sensitivity` (optional, `sensitivity.enabled`): the checkpoint's (`sensitivity.checkpoint`,
    the final student by default) greedy outputs on
    the first `n_prompts` eval prompts under each of `sensitivity.backends`. Outputs
    `sensitivity.json` (the comparison) and `sensitivity.md` (the report section)."""
    from opdflow.infra.sampling import backends as backends_mod
    from opdflow.infra.config import DEMO
    from opdflow.infra.artifacts.manifest import run_stage
    from opdflow.tasks import prompts as prompts_stage
    c = run.config
    src, inputs = _stage_inputs(run)
    n_new = c.sensitivity.max_new_tokens or c.eval.max_gen_toks
    params = {"sensitivity": c.section("sensitivity"), "max_new_tokens": n_new, "student": c.section("student"),
              "vllm": backends_mod.result_settings(c.section("rollout"))["vllm"]}

    def body(ctx) -> None:
        rows = [r for r in prompts_stage.load(run) if r["split"] == "eval"][:c.sensitivity.n_prompts]
        answers = [r["answer"] for r in rows] if c.data.source == DEMO else None
        result, skipped = measure(c, run.materialize(*src), [r["prompt_ids"] for r in rows], answers,
                                  c.sensitivity.backends, n_new)
        result["skipped"] = skipped
        ctx.put_json("sensitivity.json", result)
        ctx.put_bytes("sensitivity.md", markdown(result, skipped).encode())
        pairs = {f"share_differ.{p['a']}.{p['b']}": round(p["share_differ"], 4) for p in result["pairs"]}
        scores = {f"score.{k}": round(v["score"]["mean"], 4) for k, v in result["per_backend"].items() if "score" in v}
        ctx.metrics.update(n_prompts=len(rows), backends_run=len(result["backends"]), **pairs, **scores)
        from opdflow.infra.sampling.vllm_backend import last_record
        if "vllm" in result["backends"]:
            ctx.backend.update(vllm=last_record())
    return run_stage(run, stage, params=params, inputs=inputs, body=body, force=force, progress=progress)


def report(run, entry: dict) -> str:
    return f"# sensitivity — run `{run.run_id}`\n\n" + run.read_output("sensitivity", "sensitivity.md").decode()


def _needs(config, stage: str) -> list[str]:
    from opdflow.tasks.plan import checkpoint_of
    return ["prompts", checkpoint_of(config, config.sensitivity.checkpoint)[0]]


STAGES = (Stage("sensitivity", run, instances=lambda config: ["sensitivity"] if config.sensitivity.enabled else [],
                needs=_needs, report=report, gpus=lambda config: 1),)
sensitivity_task = STAGES[0].task
