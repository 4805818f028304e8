"""The job-spec reference in Markdown, generated from the pydantic models' JSON Schema, so the docs
cannot drift from the code (`orchestrator schema --markdown > docs/reference.md`; a test compares)."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.spec import JobSpec

_INTRO = """# Job spec reference

Generated from the job spec's JSON Schema by `orchestrator schema --markdown`; do not edit by hand.
`orchestrator schema` prints the JSON Schema itself (see "Editor support" at the end).
"""

_EDITORS = """## Editor support

Write the schema to a file and point your editor's YAML support at it:

```bash
orchestrator schema > orchestrator.schema.json
```

- VS Code (Red Hat YAML extension), in `settings.json`:
  `"yaml.schemas": {"./orchestrator.schema.json": ["jobs/*.yaml"]}`
- Or per file, as its first line: `# yaml-language-server: $schema=./orchestrator.schema.json`
- JetBrains IDEs: Settings → Languages & Frameworks → Schemas and DTDs → JSON Schema Mappings.

Editors then complete field names, show these descriptions, and flag unknown fields and wrong types
before `orchestrator validate` does.
"""


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return schema["$defs"][ref.rsplit("/", 1)[-1]] if ref else node


def _type(schema: dict[str, Any], node: dict[str, Any]) -> str:
    node = _resolve(schema, node)
    if "enum" in node:
        return " \\| ".join(json.dumps(v) for v in node["enum"])
    if "const" in node:
        return json.dumps(node["const"])
    if "anyOf" in node:
        return " \\| ".join(_type(schema, option) for option in node["anyOf"])
    kind = node.get("type", "object")
    if kind == "array":
        items = node.get("items") or node.get("prefixItems")
        inner = _type(schema, items[0] if isinstance(items, list) else items) if items else "any"
        return f"list of {inner}"
    return kind


def _bounds(node: dict[str, Any]) -> str:
    marks = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤", "exclusiveMaximum": "<"}
    return ", ".join(f"{sign} {node[key]}" for key, sign in marks.items() if key in node)


def _table(schema: dict[str, Any], model: dict[str, Any]) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    required = set(model.get("required", []))
    for name, node in model.get("properties", {}).items():
        if name in required:
            default = "required"
        else:
            default = f"`{json.dumps(node['default'])}`" if "default" in node else "its fields' defaults"
        described = node.get("description") or _resolve(schema, node).get("description") or ""
        kind = _type(schema, node) + (f" ({_bounds(node)})" if _bounds(node) else "")
        lines.append(f"| `{name}` | {kind} | {default} | {described.replace('|', '/')} |")
    return lines


def markdown() -> str:
    schema = JobSpec.model_json_schema()
    out = [_INTRO, "## Top level", "", *_table(schema, schema), ""]
    for section, node in schema["properties"].items():
        if section == "adapter":
            out += ["## adapter", "", "One of the methods below, chosen by `method` (default `lora`).", ""]
            for option in node["oneOf"]:
                method = _resolve(schema, option)
                name = method["properties"]["method"].get("const") or method["properties"]["method"].get("default")
                out += [f"### adapter: method {name}", "", *_table(schema, method), ""]
            continue
        target = next((o for o in node.get("anyOf", [node]) if "$ref" in o), None)
        if target is None:
            continue
        model = _resolve(schema, target)
        out += [f"## {section}", "", *([model["description"], ""] if model.get("description") else []), *_table(schema, model), ""]
        for child in ("scheduler",):
            if child in model.get("properties", {}):
                nested = next((o for o in model["properties"][child].get("anyOf", [model["properties"][child]]) if "$ref" in o), None)
                if nested:
                    out += [f"### {section}.{child}", "", *_table(schema, _resolve(schema, nested)), ""]
    out.append(_EDITORS)
    return "\n".join(line.rstrip() for line in "\n".join(out).splitlines()) + "\n"
