"""Prompt datasets: the demo task, a local JSONL/Parquet file, or a `datasets` name.

Every row gets a stable integer `prompt_id` and one split: `train` (OPD rounds),
`probe` (rock-token analysis) or `eval` (the local benchmark). For a user's file the
split is a seeded shuffle (eval first, then probe, the rest train), so the same file
and seed always give the same splits. Per-prompt sampling seeds derive from the
`prompt_id`, never from a shard or a worker.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from opdflow.infra.config import BUILTINS, Config, ConfigError

SPLITS = ("train", "probe", "eval")


def _read_rows(source: str) -> list[dict]:
    if source.startswith("hf:"):
        from datasets import load_dataset  # for users with a hub or a local datasets cache
        name, _, split = source[3:].partition(":")
        try:
            return [dict(r) for r in load_dataset(name, split=split or "train")]
        except Exception as e:  # noqa: BLE001 - any loader failure is a config problem here
            raise ConfigError("data.source", f"could not load dataset {name!r}: {e}") from None
    p = Path(source).expanduser()
    if not p.is_file():
        raise ConfigError("data.source", f"dataset file {source!r} does not exist")
    if p.suffix in (".jsonl", ".json"):
        text = p.read_text()
        if p.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError("data.source", f"{source}: line {i} is not JSON: {e}") from None
        return rows
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(p).to_pylist()
    raise ConfigError("data.source", f"{source!r}: unsupported format (use .jsonl, .json or .parquet)")


def load_prompts(config: Config) -> list[dict]:
    """All prompt rows as dicts {prompt_id, split, prompt, answer}, validated."""
    d = config.data
    if d.source in BUILTINS:  # a built-in task: demo or planted (infra/testbeds/builtin.py)
        from opdflow.infra.testbeds.builtin import builtin
        make_examples = builtin(d.source).load().make_examples
        rows, pid = [], 0
        for split, n in (("train", d.n_train), ("probe", d.n_probe), ("eval", d.n_eval)):
            for ex in make_examples(split, n, config.seed):
                rows.append({"prompt_id": pid, "split": split, "prompt": ex["prompt"], "answer": ex["answer"]})
                pid += 1
        return rows
    raw = _read_rows(d.source)
    if not raw:
        raise ConfigError("data.source", f"dataset {d.source!r} is empty")
    for field in (d.prompt_field, d.answer_field):
        if field not in raw[0]:
            name = "data.prompt_field" if field == d.prompt_field else "data.answer_field"
            raise ConfigError(name, f"dataset {d.source!r} has no field {field!r} (fields: {sorted(raw[0])})")
    for i, r in enumerate(raw):
        if not isinstance(r.get(d.prompt_field), str) or not r[d.prompt_field]:
            raise ConfigError("data.prompt_field", f"row {i} of {d.source!r} has no text in {d.prompt_field!r}")
    if len(raw) < d.n_eval + d.n_probe + 1:
        raise ConfigError("data.source", f"dataset {d.source!r} has {len(raw)} rows; data.n_eval + data.n_probe "
                                         f"+ 1 = {d.n_eval + d.n_probe + 1} are needed")
    order = list(range(len(raw)))
    random.Random(config.seed).shuffle(order)
    splits = ["eval"] * d.n_eval + ["probe"] * d.n_probe
    splits += ["train"] * min(d.n_train, len(raw) - len(splits))
    return [{"prompt_id": i, "split": s, "prompt": raw[j][d.prompt_field], "answer": str(raw[j][d.answer_field])}
            for i, (j, s) in enumerate(zip(order, splits))]
