"""Print the config reference table of the README from the schema (the one source of truth).

Usage: python scripts/config_reference.py > /tmp/keys.md, then paste into README.md.
tests/test_docs.py checks that the README documents every key.
"""

from __future__ import annotations

from typing import get_args

from drnn_cli.config import DataConfig, ModelConfig, TrainConfig


def allowed(annotation: object) -> str:
    choices = get_args(annotation)
    if choices and all(isinstance(choice, str) for choice in choices):
        return " \\| ".join(f"`{choice}`" for choice in choices)
    name = getattr(annotation, "__name__", str(annotation)).replace("typing.", "")
    return name.replace(" | ", " \\| ")  # a union's bar would split the Markdown table cell


def main() -> None:
    print("| key | default | allowed | meaning |")
    print("| --- | --- | --- | --- |")
    for section, model in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            bounds = [
                f"{label} {getattr(meta, attr)}"
                for meta in field.metadata
                for attr, label in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
                if getattr(meta, attr, None) is not None
            ]
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            kind = str(extra.get("kind") or allowed(field.annotation))
            if bounds:
                kind += " " + ", ".join(bounds)
            print(f"| `{section}.{name}` | `{default}` | {kind} | {field.description} |")


if __name__ == "__main__":
    main()
