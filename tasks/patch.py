"""Stage `patch`: inference-time patching at rock positions (the causal ablation's second half).

The training-time ablation (`ablate-rock.*`) asks what the student learns without the
rock tokens' gradient. This stage asks what the rock positions do at inference: the final
student decodes the held-out eval prompts greedily, and at every step where its own next
token would be in the patched set, the teacher's greedy token is emitted instead (both
models then continue from that token). Three arms on the same prompts:

    none             the final student alone (greedy)
    rock             rock-token positions patched with the teacher's choice
    random_matched   positions of the frequency-matched random tokens patched (the control)

If rock tokens carry little of the reasoning (the paper's finding), patching them changes
accuracy no more than patching the random set. Accuracy here: the answer extracted from
the response with `ablation.patch_answer_regex` (the demo's `answer: N` pattern by
default on demo data) equals the prompt's answer. A difference is called out only beyond
two binomial standard errors, as in the report's verdict.

Sharded like evaluation (`scale.shards`): each shard decodes a contiguous range of the
eval prompts, all three arms, and writes one Parquet part (per prompt and arm: the
response, whether it is correct, how many of its tokens were patched).
"""
from __future__ import annotations

import json

import pyarrow as pa
import torch

from opdflow.evals.answers import is_correct
from opdflow.infra.config import DEMO, Config
from opdflow.infra.lm import left_padded, load_model, load_tokenizer
from opdflow.infra.manifest import Run, StageContext
from opdflow.tasks import prompts as prompts_stage
from opdflow.tasks.common import stage_task
from opdflow.tasks.plan import checkpoint_of
from opdflow.tasks.report import two_se
from opdflow.tasks.shards import concat_parts, run_sharded, shard_bounds, shard_runner

ARMS = ("none", "rock", "random_matched")


def answer_regex(config: Config) -> str | None:
    if config.ablation.patch_answer_regex:
        return config.ablation.patch_answer_regex
    if config.data.source == DEMO:
        from opdflow.infra.demo import ANSWER_PATTERN
        return ANSWER_PATTERN
    return None


@torch.no_grad()
def patched_greedy(student, teacher, prompts: list[list[int]], patch_ids: set[int], max_new: int, eos_id: int,
                   pad_id: int) -> tuple[list[list[int]], list[int]]:
    """Greedy decoding by `student`, except that where its next token is in `patch_ids` the
    teacher's greedy token is taken. Returns (response ids, patched positions) per prompt."""
    dev = next(student.parameters()).device
    ids, mask, pos = (t.to(dev) for t in left_padded(prompts, pad_id))
    patch = torch.tensor(sorted(patch_ids), dtype=torch.long, device=dev)
    s, t = (m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True) for m in (student, teacher))
    s_past, t_past, s_logits, t_logits = s.past_key_values, t.past_key_values, s.logits[:, -1], t.logits[:, -1]
    b = len(prompts)
    out = torch.full((b, max_new), pad_id, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    n_patched = torch.zeros(b, dtype=torch.long, device=dev)
    next_pos = pos[:, -1:] + 1
    for step in range(max_new):
        own, teachers = s_logits.argmax(-1), t_logits.argmax(-1)
        swap = torch.isin(own, patch) & ~done
        tok = torch.where(done, torch.full_like(own, pad_id), torch.where(swap, teachers, own))
        out[:, step] = tok
        n_patched += swap.long()
        done |= tok == eos_id
        if bool(done.all()) or step == max_new - 1:  # one host sync per step: stop when all finished
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=dev)], dim=1)
        s = student(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=s_past,
                    use_cache=True)
        t = teacher(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=t_past,
                    use_cache=True)
        s_past, t_past, s_logits, t_logits = s.past_key_values, t.past_key_values, s.logits[:, -1], t.logits[:, -1]
        next_pos = next_pos + 1
    responses = []
    for row in out.cpu().tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        responses.append(row[:cut])
    return responses, n_patched.cpu().tolist()


def arm_summary(rows: list[dict]) -> dict:
    """Per arm: accuracy, n, share of response tokens patched; and each patched arm's change
    against `none` with the two-standard-error rule."""
    out = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        n = len(mine)
        acc = sum(r["correct"] for r in mine) / n if n else float("nan")
        tokens = sum(r["n_tokens"] for r in mine)
        out[arm] = {"accuracy": acc, "n": n,
                    "patched_token_share": sum(r["n_patched"] for r in mine) / tokens if tokens else 0.0}
    base = out["none"]["accuracy"]
    for arm in ARMS[1:]:
        v, n = out[arm]["accuracy"], out[arm]["n"]
        bound = two_se(base, v, n)
        out[arm].update(delta=v - base, two_se=bound, significant=abs(v - base) > bound)
    return out


def _stage(run: Run):
    c = run.config
    final_stage, final_prefix = checkpoint_of(c, "final_student")
    inputs = {"prompts": run.output("prompts", "prompts.parquet"), "rock_sets": run.output("rock", "rock_sets.json"),
              **run.model_inputs("models", "teacher"), **run.model_inputs(final_stage, final_prefix, "final")}
    params = {"ablation": c.section("ablation"), "eval_max_gen_toks": c.eval.max_gen_toks,
              "batch_size": c.eval.batch_size, "answer_regex": answer_regex(c)}

    def shard_body(ctx: StageContext, i: int, n: int) -> None:
        rows = [r for r in prompts_stage.load(run) if r["split"] == "eval"]
        bounds = shard_bounds(len(rows), n, c.eval.batch_size)
        mine = rows[slice(*bounds[i])] if i < len(bounds) else []
        sets = json.loads(run.read(inputs["rock_sets"]))
        tdir = run.materialize("models", "teacher")
        teacher, tok = load_model(tdir, c.teacher.dtype).eval(), load_tokenizer(tdir)
        student = load_model(run.materialize(final_stage, final_prefix), c.student.dtype).eval()
        out = []
        for j, arm in enumerate(ARMS):
            patch = set() if arm == "none" else set(sets[arm])
            for lo in range(0, len(mine), c.eval.batch_size):
                batch = mine[lo:lo + c.eval.batch_size]
                resp, patched = patched_greedy(student, teacher, [r["prompt_ids"] for r in batch], patch,
                                               c.eval.max_gen_toks, tok.eos_token_id, tok.pad_token_id)
                for r, ids, k in zip(batch, resp, patched):
                    text = tok.decode(ids, skip_special_tokens=True)
                    out.append({"arm": arm, "prompt_id": r["prompt_id"], "response": text, "n_tokens": len(ids),
                                "n_patched": k, "correct": is_correct(text, r["answer"], params["answer_regex"])})
            ctx.progress((j + 1) / len(ARMS), f"arm {arm} decoded")
        ctx.put_table("part.parquet", pa.Table.from_pylist(out, schema=PART_SCHEMA))
    return params, inputs, shard_body


PART_SCHEMA = pa.schema([("arm", pa.string()), ("prompt_id", pa.int64()), ("response", pa.string()),
                         ("n_tokens", pa.int64()), ("n_patched", pa.int64()), ("correct", pa.bool_())])


def n_shards(config: Config) -> int:
    return len(shard_bounds(config.data.n_eval, config.scale.shards, config.eval.batch_size))


def run(run: Run, stage: str = "patch", force: bool = False, progress=None) -> tuple[dict, bool]:
    params, inputs, shard_body = _stage(run)

    def finish(ctx: StageContext, parts: dict, shards: list[dict]) -> None:
        summary = arm_summary(concat_parts(run, parts).to_pylist())
        ctx.put_json("patching.json", summary)
        ctx.metrics.update({f"accuracy_{arm}": round(s["accuracy"], 4) for arm, s in summary.items()},
                           patched_token_share_rock=round(summary["rock"]["patched_token_share"], 4))
    return run_sharded(run, "patch", n=n_shards(run.config), params=params, inputs=inputs, table="patched",
                       shard_body=shard_body, finish=finish, force=force, progress=progress)


def markdown(summary: dict) -> str:
    lines = ["| arm | accuracy | n | patched tokens | change vs none | 2 SE |", "|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        change = f"{s['delta']:+.3f}" if "delta" in s else ""
        two_se = f"{s['two_se']:.3f}" if "two_se" in s else ""
        lines.append(f"| {arm} | {s['accuracy']:.3f} | {s['n']} | {s['patched_token_share']:.1%} | {change} | {two_se} |")
    rock = summary["rock"]
    lines += ["", ("Patching the rock positions with the teacher's tokens changed accuracy by "
                   f"{rock['delta']:+.3f}, " + ("beyond" if rock["significant"] else "within")
                   + f" two standard errors ({rock['two_se']:.3f}); the matched random positions: "
                   f"{summary['random_matched']['delta']:+.3f}.")]
    return "\n".join(lines)


def report(run: Run, entry: dict) -> str:
    summary = json.loads(run.read_output("patch", "patching.json"))
    return "\n".join([f"# Inference-time patching — run `{run.run_id}`", "", markdown(summary)])


patch_task = stage_task("patch", run, report)
patch_shard_task = stage_task("patch-shard", shard_runner(lambda run, stage: _stage(run)))
