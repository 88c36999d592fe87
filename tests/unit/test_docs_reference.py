"""docs/configuration.md documents every built-in defense parameter exactly as the code defines it."""

from pathlib import Path

from plugins import available_defenses, defense_class
from plugins.reference import BEGIN, END, embed, reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_configuration_reference_matches_the_code():
    document = DOC.read_text()
    assert embed(reference(), document) == document, (
        "docs/configuration.md is out of date: run `python -m plugins.reference --write docs/configuration.md`"
    )


def test_every_builtin_defense_and_parameter_is_documented():
    section = DOC.read_text().split(BEGIN, 1)[1].split(END, 1)[0]
    for name in available_defenses():
        cls = defense_class(name)
        if not cls.__module__.startswith("plugins."):
            continue
        assert f"### `{name}`" in section
        for field in cls.Config.model_fields:
            if field != "name":
                assert f"| `{field}` |" in section, f"{name}.{field} is not documented"
