"""The chaos table: a row per point that test_chaos.py SIGKILLs at, printed at the end of the run.

A test hands its row on as a user property of its report (`record`); the session's own process
gathers the rows from the reports (tests/conftest.py): under pytest-xdist the tests run in worker
processes and only the reports come back."""

from __future__ import annotations

import pytest

from tests.e2e.invariants import Check

PROPERTY = "chaos row"
# point -> (its place in the cycle, what it interrupts, checks (None: the scenario broke before the
# checks), seconds, error)
CHAOS_TABLE: dict[str, tuple[int, str, list[Check] | None, float, str]] = {}


def record(node: pytest.Item, point: str, place: int, what: str, checks: list[Check] | None, seconds: float,
           error: str = "") -> None:
    held = None if checks is None else [(c.name, c.ok) for c in checks]  # what a report can carry
    node.user_properties.append((PROPERTY, (point, place, what, held, seconds, error)))


def gather(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == PROPERTY:
            point, place, what, held, seconds, error = value
            checks = None if held is None else [Check(name, ok) for name, ok in held]
            CHAOS_TABLE[point] = (place, what, checks, seconds, error)


def chaos_table() -> str:
    rows = sorted(CHAOS_TABLE.items(), key=lambda row: row[1][0])  # in the cycle's order, however they ran
    names = next(([c.name for c in checks] for _, (_, _, checks, _, _) in rows if checks), [])
    short = [f"I{i + 1}" for i in range(len(names))]
    width = max(len(p) for p, _ in rows)
    lines = ["chaos: SIGKILL of the whole service at each point, then a restart; invariants held:"]
    lines += [f"  {s} = {n}" for s, n in zip(short, names)]
    lines.append(f"  {'point':<{width}}  " + " ".join(f"{s:>3}" for s in short) + "  held     time  interrupts")
    held_total = checks_total = 0
    for point, (_, what, checks, seconds, error) in rows:
        if checks is None:  # the session never came back: no invariant can be counted as held
            cells, held = ["  ?"] * len(names), "broke"
            what = f"{what} -- {error[:90]}"
            checks_total += len(names)
        else:
            cells = ["  ✓" if c.ok else "  ✗" for c in checks]
            ok = sum(c.ok for c in checks)
            held_total, checks_total = held_total + ok, checks_total + len(checks)
            held = f"{ok}/{len(checks)}"
        lines.append(f"  {point:<{width}}  " + " ".join(cells) + f"  {held:<6} {seconds:5.1f}s  {what}")
    lines.append(f"  {len(rows)} points, {held_total}/{checks_total} invariants held")
    return "\n".join(lines)
