"""The stages rock-probe (the final student answers the probe prompts; token counts) and
rock-directions (the two corpus-level gradient directions), each sharded over the probe set.
Their code version does not hold the rock report: a plot edit reruns `rock` alone."""
from __future__ import annotations


import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from opdflow.infra.config import Config
from opdflow.infra.models.lm import load_model, load_tokenizer
from opdflow.infra.artifacts.manifest import Run, StageContext
from opdflow.infra.artifacts.tables import parquet_to_table
from opdflow.tasks import prompts as prompts_stage
from opdflow.tasks.plan import checkpoint_of
from opdflow.tasks.shards import concat_parts, run_sharded, shard_bounds
from opdflow.tasks.stage import ShardParts, Stage, single
from opdflow.tasks.rollout import generate
from opdflow.tasks.rock.measure import measure


PROBE, DIRECTIONS = "rock-probe", "rock-directions"


def probe_shards(config: Config) -> int:
    """Shards of the probe sampling (cut at rollout batch boundaries, like a rollout)."""
    return len(shard_bounds(config.data.n_probe * config.rock.samples_per_prompt, config.scale.shards,
                            config.rollout.batch_size))


def n_parts(run: Run) -> int:
    """rock-directions and rock shard along the probe's parts."""
    return len(run.outputs_under(PROBE, "probes"))


def probe_part(run: Run, i: int) -> pa.Table:
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


def load_teacher(run: Run):
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
        teacher, tok = load_teacher(run)
        model = load_model(run.materialize(final_stage, final_prefix), c.student.dtype).eval()
        _, sums = measure(model, teacher, tok.pad_token_id, probe_part(run, i), c.scoring.batch_size,
                          token_counts(run, len(tok)), vocab=len(tok), chunk_tokens=c.scoring.chunk_tokens)
        ctx.put_table("part.parquet", pa.table({"direction": list(sums), "sum": [v.tolist() for v in sums.values()]}))
    return params, inputs, shard_body


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


def final_student(config: Config) -> str:
    return checkpoint_of(config, "final_student")[0]


STAGES = (
    Stage(PROBE, run_probe, instances=single(PROBE), needs=lambda config, stage: ["prompts", final_student(config)],
          shard_parts=lambda run, stage: _probe_stage(run), n_shards=lambda run, stage: probe_shards(run.config)),
    Stage(DIRECTIONS, run_directions, instances=single(DIRECTIONS),
          needs=lambda config, stage: [PROBE, "models", final_student(config)],
          shard_parts=lambda run, stage: _directions_stage(run), n_shards=lambda run, stage: n_parts(run)),
)


rock_probe_task, rock_directions_task = (s.task for s in STAGES)
