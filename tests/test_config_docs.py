"""docs/config.md is the schema's own rendering, every field is described, and the execution-only
marking (the one list of what is not a run's identity) is what identity and stage params derive from."""
from pydantic import BaseModel, Field

from opdflow.infra.sampling import backends
from opdflow.infra.config import Config, ScaleConfig, parse_config
from opdflow.infra.config_docs import DOCS, main, missing_descriptions, render


def test_committed_docs_are_current(tmp_path):
    assert main([str(tmp_path / "config.md")]) == 0
    fresh = (tmp_path / "config.md").read_text()
    assert fresh == render()
    assert DOCS.is_file(), f"{DOCS} is missing: run `make config-docs`"
    assert DOCS.read_text() == fresh, f"{DOCS} is stale: run `make config-docs` and commit it"


def test_every_field_has_a_description():
    assert missing_descriptions() == []


def test_missing_descriptions_finds_nested_fields():
    class Sub(BaseModel):
        c: int = 3

    class Toy(BaseModel):
        a: int = Field(1, description="described")
        b: int = 2
        sub: Sub = Field(Sub(), description="a section")

    assert missing_descriptions(Toy) == ["b", "sub.c"]


def _flat(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def test_execution_only_settings_are_the_marked_ones():
    paths = _flat(Config().execution())
    assert {f"scale.{k}" for k in ScaleConfig.model_fields} <= paths  # the whole section
    transport = {"api_key_env", "timeout_s", "max_retries", "concurrency"}
    vllm = {"python", "command", "startup_timeout_s", "concurrency", "kv_cache_gib"}
    assert {p for p in paths if not p.startswith("scale.")} == (
        {f"train.{k}" for k in ("checkpoint_every", "nproc_per_node", "micro_batch_size", "fused_lm_head")}
        | {f"{s}.openai.{k}" for s in ("rollout", "scoring") for k in transport}
        | {f"{s}.vllm.{k}" for s in ("rollout", "scoring") for k in vllm})
    rows = {line.split(" | ")[0]: line for line in render().splitlines() if line.startswith("| `")}
    assert " | yes | " in rows["| `shards`"] and " | yes | " not in rows["| `lr`"]


def _server(python: str) -> dict:
    return {"openai": {"api_key_env": "OTHER_KEY", "timeout_s": 5.0, "max_retries": 1, "concurrency": 2},
            "vllm": {"python": python, "command": ["vllm", "serve"], "kv_cache_gib": None,
                     "startup_timeout_s": 5.0, "concurrency": 2}}


def test_identity_and_stage_params_ignore_every_execution_setting():
    base = Config()
    moved = parse_config({
        "scale": {"shards": 3, "task_runner": "dask", "dask_workers": 3, "gpus_per_worker": 1},
        "train": {"checkpoint_every": 2, "nproc_per_node": 2, "micro_batch_size": 4, "fused_lm_head": True},
        "rollout": _server("/elsewhere/python"), "scoring": _server("/other/python"), "store": "/tmp/elsewhere"})
    assert moved.execution() != base.execution()
    assert moved.identity() == base.identity()
    assert moved.with_execution(base.execution()).model_copy(update={"store": base.store}) == base
    assert moved.result_section("train") == base.result_section("train")
    for s in ("rollout", "scoring"):
        assert backends.result_settings(moved.section(s)) == backends.result_settings(base.section(s))
    # what a result depends on still counts, in the same places
    other = parse_config({"train": {"optimizer": {"lr": 0.5}}, "rollout": {"openai": {"model": "m2"}}})
    assert other.identity() != base.identity()
    assert other.result_section("train") != base.result_section("train")
    assert backends.result_settings(other.section("rollout")) != backends.result_settings(base.section("rollout"))
