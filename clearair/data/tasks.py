"""The training tasks as integers: batches carry a task id and a degradation-family id per sample."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from synth.recipes import task_family


class TaskIndex:
    """A stable task name <-> integer mapping: ids follow the sorted names, whatever order they came in."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(sorted(set(names)))
        if not self.names:
            raise ValueError("TaskIndex needs at least one task name")
        self._ids = {name: i for i, name in enumerate(self.names)}
        self.families: tuple[str, ...] = tuple(sorted({task_family(n) for n in self.names}))

    def family_index(self, name: str) -> int:
        """The id of the task's degradation family (:func:`synth.recipes.task_family`), among this index's."""
        self.index(name)  # an unknown task names the known ones
        return self.families.index(task_family(name))

    def index(self, name: str) -> int:
        if name not in self._ids:
            raise ValueError(f"task {name!r} is not one of the training tasks {list(self.names)}")
        return self._ids[name]

    def name(self, index: int) -> str:
        return self.names[index]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskIndex) and other.names == self.names

    def __repr__(self) -> str:
        return f"TaskIndex({list(self.names)})"
