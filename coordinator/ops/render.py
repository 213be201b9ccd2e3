"""Rich tables shared by the command line and the demo: breakdowns, one column per factor."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from coordinator.routing import SeedPolicy


def table(title: str, *columns: str) -> Table:
    """An empty table with a left-aligned title; long cells fold rather than vanish."""
    out = Table(title=title, title_justify="left", highlight=False)
    for column in columns:
        out.add_column(column, overflow="fold")
    return out


def breakdown_table(title: str, rows: Sequence[dict[str, float | str]], policy: str) -> Table:
    """Breakdowns (``as_dict()`` of a policy's, or a decision's candidates), best first,
    one column per factor of ``policy``."""
    names = [name for name in rows[0] if name != "worker_id"] if rows else []
    out = table(title, "#", "worker")
    for name in names:
        text = isinstance(rows[0][name], str)
        out.add_column(name.replace("_", " "), justify="left" if text else "right")
    places = decimals(policy)
    for rank, row in enumerate(rows, 1):
        cells = (cell(row[name], places) if name in row else "-" for name in names)
        out.add_row(str(rank), str(row.get("worker_id", "?")), *cells)
    return out


def decimals(policy: str) -> int:
    # Points are whole numbers but for load and the tiebreak; seconds need hundredths.
    return 1 if policy == SeedPolicy.name else 2


def cell(value: float | str, places: int) -> str:
    return value if isinstance(value, str) else f"{value + 0.0:.{places}f}"  # no -0.0
