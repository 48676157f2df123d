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
with `opdflow.infra.artifacts.streaming` (memory bounded by the vocabulary, not by the number of
positions). Outputs of `rock`: records parts, tokens.parquet (per token id),
rock_sets.json (rock, control, dropped, random_matched), summary.json, report.md with
embedded plots.
"""
