"""docs/configuration.md is generated from the stage configs, so it can't drift from them."""

import dataclasses
from pathlib import Path

from ldmflow import configs
from ldmflow.flows import reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_is_the_generated_one():
    """Regenerate with `ldmflow config-reference > docs/configuration.md`."""
    assert (DOCS / "configuration.md").read_text() == reference.page()


def test_every_field_of_every_section_has_a_row_with_its_default_and_kind():
    page = reference.page()
    for name, cls in reference.sections():
        text = page[page.index(f"\n## {name}\n"):]
        text = text[: text.index("\n## ", 1)] if "\n## " in text[1:] else text
        for field in dataclasses.fields(cls):
            row = next(line for line in text.splitlines() if line.startswith(f"| `{field.name}` |"))
            cells = [cell.strip() for cell in row.split(" | ")]
            assert cells[2] == reference.default_of(field), row
            if name != "serve":
                assert cells[3] == ("execution" if configs.is_execution(field) else "identity"), row
            assert cells[4], f"{cls.__name__}.{field.name} has no description"
