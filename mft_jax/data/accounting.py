"""Per-source accounting of a built split: rows read, taken, kept, dropped by reason, truncated; the drop check.

A mixture whose source silently loses rows trains on other data than the user asked for, so every source must
keep all but `data.max_drop_fraction` of the rows the mixer took from it (`check_drops`). The stats are stored
in the cache metadata, so a cache hit prints the same table and is checked against the current fraction.
"""

from __future__ import annotations

import dataclasses
import math

from mft_jax.data.schemas import DROP_REASONS, SCHEMA_KEYS
from mft_jax.data.sources import DataError


@dataclasses.dataclass
class SourceStats:
    """One source of a split. `first_drop`: reason -> where and what, for the first row dropped for it."""

    source: str
    rows_read: int  # rows in the source
    rows_taken: int  # rows the mixer took (all, or the first `rows` of the seeded shuffle)
    kept: int = 0
    truncated: int = 0  # kept examples cut at max_seq_length
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_drop: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def drop_fraction(self) -> float:
        return self.num_dropped / max(self.rows_taken, 1)

    def count_drop(self, reason: str, where: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.first_drop.setdefault(reason, where)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "SourceStats":
        return cls(**raw)


def source_table(stats: list[SourceStats], split: str) -> str:
    """The per-source table `train` and `data build` print."""
    header = ("source", "read", "taken", "kept", "dropped", "truncated", "drop reasons")
    lines = [(s.source, s.rows_read, s.rows_taken, s.kept, s.num_dropped, s.truncated,
              ", ".join(f"{reason} {n}" for reason, n in sorted(s.dropped.items())) or "-") for s in stats]
    if len(stats) > 1:
        lines.append(("total", *(sum(s[i] for s in lines) for i in range(1, 6)), ""))
    cells = [tuple(map(str, row)) for row in [header, *lines]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row):  # text columns left-aligned, counts right-aligned
        return "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([f"data.{split} per source:"] + [fmt(row).rstrip() for row in cells])


_FIXES = {
    "malformed": f"convert the rows to a known schema ({SCHEMA_KEYS})",
    "unknown_role": "map that role to system / user / assistant (human, gpt, bot, model are mapped already) "
                    "or remove those turns",
    "empty": "remove rows with no messages",
    "no_assistant": "give every row an assistant turn",
    "no_labels_after_truncation": "raise data.max_seq_length (now {max_seq_length}) or shorten the prompts",
    "no_labels": "use a chat template that renders the assistant turns after their prompt",
}


# A source whose kept examples were cut at max_seq_length more often than this gets a warning.
TRUNCATION_WARNING = 0.1


def check_truncation(stats: list[SourceStats], max_truncated_fraction: float, split: str,
                     max_seq_length: int) -> list[str]:
    """Warnings for the sources whose kept examples were cut at max_seq_length more often than
    TRUNCATION_WARNING; raises a one-line `DataError` for the first above `max_truncated_fraction`."""
    warnings = []
    for s in stats:
        fraction = s.truncated / max(s.kept, 1)
        what = (f"data.{split} source {s.source!r}: {s.truncated} of {s.kept} kept examples ({fraction:.1%}) are "
                f"cut at data.max_seq_length={max_seq_length}")
        if fraction > max_truncated_fraction:
            needed = math.ceil(fraction * 1000) / 1000
            raise DataError(f"{what}, more than data.max_truncated_fraction={max_truncated_fraction:g}; raise "
                            f"data.max_seq_length or shorten the examples, or set data.max_truncated_fraction="
                            f"{needed:g} to accept it")
        if fraction > TRUNCATION_WARNING:
            warnings.append(f"warning: {what}: their later turns get no loss; raise data.max_seq_length, or set "
                            f"data.max_truncated_fraction to stop on it")
    return warnings


def check_drops(stats: list[SourceStats], max_drop_fraction: float, split: str = "train",
                max_seq_length: int | None = None) -> None:
    """Raises a one-line `DataError` naming the first source that dropped more than `max_drop_fraction` of the
    rows taken from it, its main drop reason (with the first such row) and the fix."""
    for s in stats:
        if s.drop_fraction <= max_drop_fraction:
            continue
        reason = max(s.dropped, key=lambda r: (s.dropped[r], r))
        needed = math.ceil(s.drop_fraction * 1000) / 1000  # the fraction rounded up, so setting it passes
        fix = _FIXES[reason].format(max_seq_length=max_seq_length)
        raise DataError(
            f"data.{split} source {s.source!r}: {s.num_dropped} of {s.rows_taken} rows taken "
            f"({s.drop_fraction:.1%}) were dropped, more than data.max_drop_fraction={max_drop_fraction:g}; "
            f"{s.dropped[reason]} {reason} ({DROP_REASONS[reason]}; first: {s.first_drop[reason]}); "
            f"{fix}, or set data.max_drop_fraction={needed:g} to accept the loss")
