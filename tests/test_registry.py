"""Options register themselves where they are defined (trainrun.registry): the group's
registry is filled by the decorator, and a name taken twice is refused."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainrun import registry
from trainrun.config import GROUPS

ROOT = Path(__file__).resolve().parents[1] / "trainrun"


def test_a_decorated_class_is_in_its_groups_registry_and_a_name_is_taken_once():
    @registry.register("test-group", "one")
    @dataclass
    class One:
        x: int = 1

    assert registry.options_of("test-group") == {"one": One}
    assert registry.register("test-group", "one")(One) is One  # the same class again: fine

    class Other:
        pass

    with pytest.raises(ValueError, match="test-group=one is registered twice: One and Other"):
        registry.register("test-group", "one")(Other)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_option_is_declared_at_its_class_not_listed_in_the_interface(group):
    """Every schema of the registry carries @register(group, option) at its definition, and
    no module builds a registry as a dict literal of classes."""
    decorated = {}
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                for d in node.decorator_list:
                    if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register":
                        key, name = (a.value for a in d.args)
                        decorated[(key, name)] = node.name
    assert {name: cls.__name__ for name, cls in GROUPS[group].items()} == \
        {name: cls for (key, name), cls in decorated.items() if key == group}
