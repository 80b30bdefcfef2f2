"""The fault table: each scenario records one row; the run prints them at the end."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScenarioRow:
    scenario: str
    sent: int
    acknowledged: int
    lost: int
    duplicates: int
    recovery_s: float | None
    note: str = ""


ROWS: list[ScenarioRow] = []


def record(row: ScenarioRow) -> None:
    """Add a scenario's outcome to the table."""
    ROWS.append(row)


def render(rows: list[ScenarioRow]) -> str:
    """The table as fixed-width text."""
    header = ("scenario", "requests sent", "acknowledged", "lost", "dup rows", "recovery", "note")
    lines = [
        (r.scenario, str(r.sent), str(r.acknowledged), str(r.lost), str(r.duplicates),
         "-" if r.recovery_s is None else f"{r.recovery_s:.2f} s", r.note)
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)
