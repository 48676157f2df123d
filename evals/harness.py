"""lm-eval (lm-evaluation-harness) as opdflow's evaluation backend.

Why: benchmark numbers should come from the tool the field uses, not from a homemade loop, and
they move with the backend and its settings, so every result carries both. This module runs
``lm_eval.simple_evaluate`` with its ``hf`` model on a model dir (the demo's or any Hugging Face
one), offline, and returns plain dicts the evaluation stage stores and tabulates.

What:
- ``write_arith_task`` writes the synthetic benchmark (``opdflow_arith``) for lm-eval: the
  examples as JSONL and the task YAML (from the template ``evals/tasks/opdflow_arith.yaml``)
  pointing at it; the returned directory is lm-eval's ``include_path``.
- ``evaluate`` runs lm-eval and flattens its output. Metric names drop lm-eval's filter suffix:
  ``"exact_match,get_answer"`` becomes ``"exact_match"``. If one task reports the same metric
  through several filters (e.g. gsm8k's ``strict-match`` and ``flexible-extract``), the filter
  stays, joined with a slash: ``"exact_match/strict-match"``. Standard errors go to a separate
  ``"stderr"`` field under the same names (None where lm-eval gives "N/A").

Greedy decoding, 0-shot. A chat template (``data.chat_template`` as ``infra.models.lm.ChatFormat``
resolves it) is passed as the training prompts use it: ``apply_chat_template=True``, the
system prompt as lm-eval's ``system_instruction``, the template keyword arguments as HFLM's
``chat_template_args`` (lm-eval hands them to ``tokenizer.apply_chat_template``), and the
template text itself set on HFLM's tokenizer (lm-eval renders with the tokenizer's own
template, so a template file must be put there); lm-eval encodes the rendered context without
a second BOS when it starts with one, as ``infra.models.lm.encode_prompt`` does. Without a template:
the raw prompt. The demo tokenizer adds ``<bos>`` itself (lm-eval's
default ``add_bos_token=None`` leaves that to the tokenizer), exactly as the demo trains and as
``opdflow.infra.testbeds.demo.greedy_generate`` prompts, so lm-eval's scores equal that greedy check.

How to run::

    python -c "from pathlib import Path; from opdflow.evals.harness import *; \\
      from opdflow.infra.testbeds.demo import make_examples; \\
      inc = write_arith_task(Path('/tmp/arith'), make_examples('eval', 200, 0)); \\
      print(evaluate(Path('/tmp/opdflow-demo/teacher'), ['opdflow_arith'], include_path=inc)['results'])"
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from typing import Any

import yaml

from opdflow.infra.config import EvalConfig, ModelConfig, default

__all__ = ["TASK_TEMPLATE", "DATA_TASK", "write_arith_task", "write_data_task", "evaluate", "flatten_metrics",
           "unknown_tasks"]

TASK_TEMPLATE = Path(__file__).parent / "tasks" / "opdflow_arith.yaml"
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_arith_task(dest_dir: Path, examples: list[dict], task_name: str = "opdflow_arith",
                     template: Path = TASK_TEMPLATE) -> Path:
    """Write ``<task_name>.jsonl`` and ``<task_name>.yaml`` into ``dest_dir``; return ``dest_dir``.

    Each example is a demo example dict (``prompt``, ``answer``, ``solution``). The YAML points at
    the JSONL by absolute path, so the include dir works from any working directory.
    """
    if not examples:
        raise ValueError("write_arith_task: no examples")
    dest_dir = Path(dest_dir).resolve()
    dest_dir.mkdir(parents=True, exist_ok=True)
    data = dest_dir / f"{task_name}.jsonl"
    data.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in examples))
    config = yaml.safe_load(Path(template).read_text())  # opdflow_arith.yaml, or a built-in task's
    config["task"] = task_name
    config["dataset_kwargs"] = {
        "data_files": {"test": str(data)},
        # Keep the datasets cache beside the data: no shared cache to go stale or to race on.
        "cache_dir": str(dest_dir / ".hf_datasets_cache"),
    }
    (dest_dir / f"{task_name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest_dir


DATA_TASK = "opdflow_data"

_DATA_TASK_YAML = """# Written by opdflow (evals/harness.py write_data_task): the held-out eval split of the run's
# dataset as an lm-eval task, scored by opdflow.evals.answers.is_correct with eval.answer_regex.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
target_delimiter: ""
num_fewshot: 0
generation_kwargs:
  until: []
  do_sample: false
  temperature: 0.0
process_results: !function {utils}.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_DATA_TASK_UTILS = """# Written by opdflow: scores a response with the one answer extraction.
from opdflow.evals.answers import is_correct

PATTERN = {pattern!r}


def process_results(doc, results):
    return {{"exact_match": float(is_correct(results[0], doc["answer"], PATTERN))}}
"""


def write_data_task(dest_dir: Path, rows: list[dict], answer_regex: str, task_name: str = DATA_TASK) -> Path:
    """Write the eval split of a user's dataset (`rows` with ``prompt`` and ``answer``) as an
    lm-eval task into ``dest_dir`` (JSONL, YAML, and a scoring module that calls
    ``opdflow.evals.answers.is_correct`` with ``answer_regex``: the same extraction as every
    other stage); return ``dest_dir``, lm-eval's ``include_path``. The prompt is the raw text: a
    chat template is applied by lm-eval (``evaluate(chat=...)``), as for the training prompts."""
    if not rows:
        raise ValueError("write_data_task: no rows (data.n_eval is 0?)")
    dest_dir = Path(dest_dir).resolve()
    dest_dir.mkdir(parents=True, exist_ok=True)
    data = dest_dir / f"{task_name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": str(r["answer"])}, sort_keys=True) + "\n"
                            for r in rows))
    utils = f"{task_name}_utils"
    (dest_dir / f"{utils}.py").write_text(_DATA_TASK_UTILS.format(pattern=answer_regex))
    (dest_dir / f"{task_name}.yaml").write_text(_DATA_TASK_YAML.format(
        task=task_name, data=json.dumps(str(data)), cache=json.dumps(str(dest_dir / ".hf_datasets_cache")),
        utils=utils))
    return dest_dir


def _force_offline() -> None:
    """No hub access from this process: env for libraries not yet imported, flags for those that are."""
    os.environ.update(_OFFLINE_ENV)
    import sys

    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as ds_config

        ds_config.HF_HUB_OFFLINE = True
        ds_config.HF_DATASETS_OFFLINE = True


def _local_task_names(include_path: Path) -> set[str]:
    """Task names defined by the YAML files directly under ``include_path``."""
    names: set[str] = set()
    for path in Path(include_path).glob("*.yaml"):
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError:  # e.g. lm-eval's "!function" tags: not ours
            continue
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            names.add(config["task"])
    return names


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def flatten_metrics(task_results: dict[str, Any]) -> tuple[dict[str, float], dict[str, float | None]]:
    """lm-eval's ``{"metric,filter": v, "metric_stderr,filter": s, "alias": ...}`` → (metrics, stderr).

    The filter suffix is dropped when the metric comes through one filter only; otherwise it is
    kept as ``metric/filter`` (see the module docstring).
    """
    values: dict[tuple[str, str], Any] = {}
    for key, value in task_results.items():
        if "," not in key:  # "alias", "samples" and other bookkeeping
            continue
        metric, filt = key.split(",", 1)
        values[(metric, filt)] = value
    names = [m for m, _ in values if not m.endswith("_stderr")]
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for (metric, filt), value in values.items():
        if metric.endswith("_stderr"):
            continue
        name = metric if names.count(metric) == 1 else f"{metric}/{filt}"
        metrics[name] = _as_float(value)
        stderr[name] = _as_float(values.get((f"{metric}_stderr", filt)))
    return metrics, stderr


def _context(arguments) -> str | None:
    """The context string lm-eval gave the model (after any chat template), from a logged sample's
    ``arguments`` (``{"gen_args_0": {"arg_0": context, ...}}``, or a list of tuples)."""
    if isinstance(arguments, dict) and arguments:
        first = next(iter(arguments.values()))
        return first.get("arg_0") if isinstance(first, dict) else None
    if isinstance(arguments, (list, tuple)) and arguments and isinstance(arguments[0], (list, tuple)):
        return arguments[0][0] if isinstance(arguments[0][0], str) else None
    return None


def _flatten_samples(samples: list[dict], metric_names: list[str]) -> list[dict]:
    """lm-eval's per-sample log → ``{doc, context, response, filtered, target, <metric>: value}``, in doc order."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        resps = s.get("resps") or [[None]]
        filtered = s.get("filtered_resps") or [None]
        row = {
            "doc_id": s["doc_id"],
            "doc": s["doc"],
            "context": _context(s.get("arguments")),
            "response": resps[0][0] if isinstance(resps[0], list) else resps[0],
            "filtered": filtered[0],
            "target": s.get("target"),
            "filter": s.get("filter"),
        }
        for name in metric_names:
            base = name.split("/", 1)[0]
            if base in s:
                row[name] = _as_float(s[base])
        out.append(row)
    return out


def _evaluate(model_dir: Path, tasks: list[str], *, include_path: Path | list[Path] | None = None,
             limit: int | None = None, batch_size: int = default(EvalConfig, "batch_size"),
             max_gen_toks: int = default(EvalConfig, "max_gen_toks"),
             device: str = "cpu", dtype: str = default(ModelConfig, "dtype"), seed: int = 0,
             doc_ids: dict[str, list[int]] | None = None, chat=None) -> dict:
    """Run lm-eval's ``hf`` model on ``model_dir`` for ``tasks``; return flattened results.
    ``doc_ids`` (task -> document indices) evaluates those documents only: one shard.

    Returns ``{"results": {task: {metric: float}}, "stderr": {task: {metric: float | None}},
    "n_samples": {task: int}, "backend": {...settings...}, "samples": {task: [...]}}``.
    Greedy (``do_sample=False``, temperature 0), 0-shot; ``limit`` caps documents per task.
    ``chat`` (an ``infra.models.lm.ChatFormat``): render the contexts with its template, system prompt
    and keyword arguments (module docstring); None or a template-less format: raw prompts.
    """
    _force_offline()
    import lm_eval

    model_args = {"pretrained": str(Path(model_dir).resolve()), "dtype": dtype}
    gen_kwargs = {"max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0.0}
    task_manager = _task_manager(tasks, include_path)
    templated = chat is not None and chat.template is not None
    from lm_eval.models.huggingface import HFLM

    from opdflow.infra.models.lm import MODEL_LOAD_LOCK
    chat_args: dict = dict(chat.kwargs) if templated else {}
    with MODEL_LOAD_LOCK:  # built here, as simple_evaluate would from "hf" + model_args, under the load lock
        model: Any = HFLM(pretrained=model_args["pretrained"], dtype=dtype, batch_size=batch_size, device=device,
                          **({"chat_template_args": chat_args} if templated else {}))
    if templated:
        model.tokenizer.chat_template = chat.template  # lm-eval renders with the tokenizer's template
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        apply_chat_template=templated,
        system_instruction=chat.system_prompt if templated else None,
        tasks=list(tasks),
        batch_size=batch_size,
        device=device,
        limit=None if doc_ids is not None else limit,
        samples=doc_ids,
        gen_kwargs=gen_kwargs,
        task_manager=task_manager,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    results, stderr, n_samples, samples = {}, {}, {}, {}
    for task, task_results in out["results"].items():
        results[task], stderr[task] = flatten_metrics(task_results)
        n = out.get("n-samples", {}).get(task, {})
        if task in out.get("samples", {}):
            samples[task] = _flatten_samples(out["samples"][task], list(results[task]))
        n_samples[task] = int(n.get("effective", len(samples.get(task, []))))
    backend = {
        "name": "lm-eval hf",
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "model_args": model_args,
        "gen_kwargs": gen_kwargs,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "limit": limit,
        "seed": seed,
        "num_fewshot": 0,
        "apply_chat_template": templated,
    }
    if templated:
        import hashlib
        backend.update(chat_template_sha256=hashlib.sha256(chat.template.encode()).hexdigest(),
                       system_instruction=chat.system_prompt, chat_template_args=chat_args)
    return {"results": results, "stderr": stderr, "n_samples": n_samples, "backend": backend,
            "samples": samples}


# One lm-eval run at a time per process: `simple_evaluate` seeds the process-global random /
# numpy / torch generators, builds accelerate's process-wide state and loads tasks into
# lm-eval's registries, none of it safe from two threads. So evaluations that the flow runs
# at the same time as threads (flows/lifecycle.run_stages) take turns here, while other
# stages keep running beside them; on Dask worker processes they run side by side.
_LM_EVAL_LOCK = threading.Lock()


@functools.wraps(_evaluate)
def evaluate(*args, **kwargs) -> dict:
    with _LM_EVAL_LOCK:
        return _evaluate(*args, **kwargs)


def _task_manager(tasks: list[str], include_path):
    from lm_eval.tasks import TaskManager
    if isinstance(include_path, (list, tuple)):
        include = [str(p) for p in include_path] or None
    else:
        include = str(include_path) if include_path else None
    # Indexing lm-eval's thousands of built-in tasks costs ~8 s; skip it when ours suffice.
    local = set().union(*(_local_task_names(Path(p)) for p in
                          ([include] if isinstance(include, str) else include or [])))
    return TaskManager(include_path=include, include_defaults=not set(tasks) <= local)


def unknown_tasks(tasks: list[str], include_path=None) -> dict[str, list[str]]:
    """The names in ``tasks`` that lm-eval cannot resolve (as task, group or tag) with
    ``include_path``, each with up to three close matches. Reads task YAMLs only (no data,
    no model): lm-eval's own index, so what passes here is what ``evaluate`` will find."""
    import difflib
    import logging
    _force_offline()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its index warns about tasks it skips
    manager = _task_manager(tasks, include_path)
    known = set(manager.all_tasks)
    return {t: difflib.get_close_matches(t, known, n=3, cutoff=0.6) for t in tasks if t not in known}


def task_documents(tasks: list[str], include_path=None, limit: int | None = None) -> dict[str, dict]:
    """Per task: how many documents an evaluation covers (after ``limit``) and whether every
    metric aggregates by mean -- the condition for merging shards' per-document scores
    into exactly the score of one unsharded evaluation."""
    _force_offline()
    from lm_eval.api.metrics import mean
    with _LM_EVAL_LOCK:  # lm-eval's task registries (see `evaluate`)
        loaded = _task_manager(tasks, include_path).load(list(tasks))["tasks"]
    out = {}
    for name, task in loaded.items():
        n = len(list(task.eval_docs))
        aggregations = task.aggregation()
        out[name] = {"n_docs": min(n, limit) if limit else n,
                     "mean_only": all(fn is mean for fn in aggregations.values()),
                     "aggregations": {m: getattr(fn, "__name__", str(fn)) for m, fn in aggregations.items()}}
    return out


def merge_sample_scores(rows: list[dict], metric_names: dict[str, list[str]]) -> tuple[dict, dict, dict]:
    """(results, stderr, n_samples) per task from per-document rows (``task`` + one value per
    metric): the mean over documents, and its standard error (sample std / sqrt(n)) -- lm-eval's
    own `mean` and `mean_stderr`, what it reports for mean-aggregated metrics."""
    from lm_eval.api.metrics import mean, mean_stderr
    results, stderr, n_samples = {}, {}, {}
    for task, names in metric_names.items():
        mine = [r for r in rows if r["task"] == task]
        n_samples[task] = len(mine)
        results[task], stderr[task] = {}, {}
        for name in names:
            vals = [r[name] for r in mine if r.get(name) is not None]
            results[task][name] = mean(vals) if vals else float("nan")
            stderr[task][name] = mean_stderr(vals) if len(vals) > 1 else None
    return results, stderr, n_samples
