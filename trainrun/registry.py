"""The options of the config groups, declared where they are defined: a schema class
registers itself under its group and option name, and the group's registry (SCHEDULES,
OPTIMIZERS, CLIPPERS, DATA, TOKENIZERS, PRECISIONS) is the dict this module keeps for it.

    @register("scheduler", "cosine")
    @dataclass
    class CosineConfig(SchedulerConfig):
        ...

Adding an option is its class and its YAML file (conf/<group>/<option>.yaml); the group's
package imports the module that holds the class, as it imports all its modules."""

from __future__ import annotations

from collections.abc import Callable

_GROUPS: dict[str, dict[str, type]] = {}


def options_of(group: str) -> dict[str, type]:
    """The registry of `group`: option name -> schema class, in the order they registered."""
    return _GROUPS.setdefault(group, {})


def register(group: str, name: str) -> Callable[[type], type]:
    """A class decorator: the class is the schema of option `name` of config group `group`.
    Raises ValueError if another class has that name in that group already."""
    def add(cls: type) -> type:
        registry = options_of(group)
        if registry.get(name, cls) is not cls:
            raise ValueError(f"{group}={name} is registered twice: {registry[name].__name__} "
                             f"and {cls.__name__}")
        registry[name] = cls
        return cls
    return add
