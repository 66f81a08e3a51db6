"""How a source's labels become class ids.

Labels are read as text (`kdpipe.data.checks.scalar_text`); once every row has been seen, one
mapping is chosen for the whole source: class names, mapped to ids in the order `source.classes`
gives, or, without it, class ids when any label is a non-negative integer ("0" … "C-1": a stray
name among them is a bad row), else class names in sorted order. The names travel with the registered model, so its outputs can be read back
as the classes they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdpipe.data.readers import BadInputError
from kdpipe.spec import SourceConfig

MAX_NAMES = 100_000  # more distinct names than this is not a class label


def _is_id(text: str) -> bool:
    return text.isdigit()


@dataclass
class LabelMap:
    """`names` None: labels are class ids; else class names, id = position in `names`."""

    names: tuple[str, ...] | None
    num_classes: int | None
    _ids: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._ids = {n: i for i, n in enumerate(self.names or ())}

    @classmethod
    def infer(cls, cfg: SourceConfig, seen: set[str]) -> LabelMap:

        if cfg.classes is not None:
            if cfg.num_classes is not None and cfg.num_classes < len(cfg.classes):
                raise BadInputError(f"source.num_classes={cfg.num_classes} but source.classes names {len(cfg.classes)}")
            return cls(tuple(cfg.classes), cfg.num_classes or len(cfg.classes))
        if any(_is_id(t) for t in seen):  # ids, and a stray name among them is a bad row, not a new class
            return cls(None, cfg.num_classes)
        if len(seen) > MAX_NAMES:
            raise BadInputError(
                f"source.label '{cfg.label}' holds more than {MAX_NAMES} distinct values: is it a class "
                "label? (an id or a free-text column would be another key: source.id_column, source.text)"
            )
        names = tuple(sorted(seen))
        if cfg.num_classes is not None and cfg.num_classes < len(names):
            raise BadInputError(
                f"source.label '{cfg.label}' holds {len(names)} class names ({', '.join(names[:8])}…) but "
                f"source.num_classes is {cfg.num_classes}; remove source.num_classes or list the classes"
            )
        return cls(names, cfg.num_classes or len(names))

    def lookup(self, text: str | None) -> tuple[int, str | None]:
        """(class id, None), or (-1, None) for an unlabeled row, or (-1, why) for a bad label."""
        if text is None:
            return -1, None
        if self.names is None:
            if not _is_id(text):
                return -1, (
                    f"label {text!r} is not an integer class id (a label column holds ids 0..C-1 or class names, "
                    "not both; with names, list them in source.classes)"
                )
            label = int(text)
            if self.num_classes is not None and label >= self.num_classes:
                return -1, f"label {label} >= source.num_classes={self.num_classes}"
            return label, None
        if text in self._ids:
            return self._ids[text], None
        return -1, f"label {text!r} is not one of source.classes {list(self.names)}"
