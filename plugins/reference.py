"""The configuration reference of every registered defense, rendered from the pydantic config models.

docs/configuration.md embeds this text between two marker lines; a test regenerates it and compares, so the
documented names, types, defaults and allowed ranges cannot drift from the code.

    python -m plugins.reference            # print the reference
    python -m plugins.reference --write docs/configuration.md
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic.fields import FieldInfo

from plugins.base import Defense
from plugins.registry import available_defenses, defense_class

BEGIN = "<!-- BEGIN GENERATED: python -m plugins.reference --write docs/configuration.md -->"
END = "<!-- END GENERATED -->"


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (tuple, list) and (len(typing.get_args(annotation)) == 1 or Ellipsis in typing.get_args(annotation)):
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def _allowed(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        if isinstance(m, Ge):
            parts.append(f">= {m.ge}")
        elif isinstance(m, Gt):
            parts.append(f"> {m.gt}")
        elif isinstance(m, Le):
            parts.append(f"<= {m.le}")
        elif isinstance(m, Lt):
            parts.append(f"< {m.lt}")
        elif isinstance(m, MinLen):
            parts.append(f"length >= {m.min_length}")
        elif isinstance(m, MaxLen):
            parts.append(f"length <= {m.max_length}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return f"`{value!r}`" if not isinstance(value, str) else f'`"{value}"`'


def defense_reference(name: str) -> str:
    cls = defense_class(name)
    doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
    lines = [f"### `{name}`", "", " ".join(doc.split()), ""]
    budget = "declared (every row within it)" if cls.budget is not Defense.budget else "none declared"
    needs = [n for n, flag in (("the batch of inputs", cls.needs_inputs), ("a surrogate", cls.needs_surrogate)) if flag]
    lines.append(f"Needs: {', '.join(needs) or 'probabilities only'}. Budget: {budget}.")
    lines += ["", "| parameter | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for field_name, field in cls.Config.model_fields.items():
        if field_name == "name":
            continue
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        lines.append(f"| `{field_name}` | {_type_name(field.annotation)} | {_default(field)} | {_allowed(field)} "
                     f"| {meaning} |")
    return "\n".join(lines) + "\n"


def reference() -> str:
    return "\n".join(defense_reference(n) for n in available_defenses() if defense_class(n).__module__
                     .startswith("plugins."))


def embed(text: str, document: str) -> str:
    if BEGIN not in document or END not in document:
        raise ValueError(f"the document has no generated section; add the lines {BEGIN!r} and {END!r}")
    head, rest = document.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{text}\n{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m plugins.reference", description=__doc__.split("\n")[0])
    p.add_argument("--write", default="", help="embed the reference into this Markdown file's generated section")
    a = p.parse_args(argv)
    text = reference()
    if not a.write:
        print(text)
        return
    path = Path(a.write)
    path.write_text(embed(text, path.read_text()))
    print(f"wrote the reference of {len(available_defenses())} defenses into {path}")


if __name__ == "__main__":
    main()
