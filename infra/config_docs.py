"""docs/config.md, written from the schema in infra/config.py.

Why generated: the schema is the one source of every setting's type, default, range, description
and whether it is execution-only (not part of a run's identity). A hand-written reference would
drift from it; this one is rebuilt by `python -m opdflow.infra.config_docs [PATH]` (`make
config-docs`), and tests/test_config_docs.py fails when the committed docs/config.md differs from
what this writes, or when a field has no description.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, Iterator, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from opdflow.infra.config import Config, is_execution, section_type

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"

HEADER = """# Configuration reference

<!-- Written by `make config-docs` (python -m opdflow.infra.config_docs) from infra/config.py;
     do not edit: tests/test_config_docs.py fails when this file is stale. -->

Every key of a run's YAML config, by section, with the value it takes when the YAML omits it.
Unknown keys are rejected; `opdflow validate CONFIG` checks a file without running anything.

**Execution-only** settings say where and how a run computes, never what: a run resumed with other
values keeps its run id and every stage's key (the new values are recorded in
`runs/<run_id>/execution.json`). Everything else is part of the run's identity, except `store`
(a run is the same wherever it is stored). The marking lives in the schema
(`json_schema_extra=EXECUTION` in infra/config.py), and `Config.identity()` / `Config.execution()`
derive from it.
"""


def type_name(ann: Any) -> str:
    """A field's annotation as a reader writes it: `int | null`, `"a" | "b"`, `list[str]`."""
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


_BOUNDS = ((at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"), (at.Le, "le", "<="))


def constraints(field: FieldInfo) -> list[str]:
    """The field's range and length checks, e.g. ['>= 1', 'min length 1']."""
    out = []
    for m in field.metadata:
        for cls, attr, sym in _BOUNDS:
            if isinstance(m, cls):
                out.append(f"{sym} {getattr(m, attr)}")
        if isinstance(m, at.MinLen):
            out.append(f"min length {m.min_length}")
        if isinstance(m, at.MaxLen):
            out.append(f"max length {m.max_length}")
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def missing_descriptions(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Dotted paths of the fields under `model` (nested sections included) without a description."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if not (field.description or "").strip():
            out.append(path)
        if (sub := section_type(field)) is not None:
            out.extend(missing_descriptions(sub, f"{path}."))
    return out


def _sections(value: BaseModel, path: str, description: str, execution: bool
              ) -> Iterator[tuple[str, str, bool, list[str]]]:
    """(path, description, execution-only, table rows) per section, depth first, from a section's
    default value (nested defaults can differ from the nested class's own: `planted.teacher`)."""
    model = type(value)
    dumped = value.model_dump(mode="json")
    rows, subs = [], []
    for name, field in model.model_fields.items():
        ex = execution or is_execution(field)
        if section_type(field) is not None:
            subs.append((getattr(value, name), f"{path}.{name}" if path else name, field.description or "", ex))
            continue
        kind = ", ".join([type_name(field.annotation), *constraints(field)])
        rows.append(f"| `{name}` | {_cell(kind)} | `{_cell(json.dumps(dumped[name]))}` | "
                    f"{'yes' if ex else ''} | {_cell(field.description or '')} |")
    yield path, description, execution, rows
    for sub in subs:
        yield from _sections(*sub)


def render() -> str:
    """docs/config.md's text."""
    parts = [HEADER]
    for path, description, execution, rows in _sections(Config(), "", "", False):
        if not rows:
            continue
        parts.append(f"## `{path}`\n" if path else "## Top level\n")
        if description:
            parts.append(_cell(description) + (" *Execution-only: the whole section.*" if execution else "") + "\n")
        parts.append("| field | type | default | execution-only | description |\n|---|---|---|---|---|\n"
                     + "\n".join(rows) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DOCS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
