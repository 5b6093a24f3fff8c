"""Shared by the end-to-end tests: the chaos table (filled by test_chaos.py, printed at the end
of the run by the hook below)."""

from __future__ import annotations

from typing import Any

from tests.e2e.invariants import Check

# point -> (what it interrupts, checks (None: the scenario broke before the checks), seconds, error)
CHAOS_TABLE: dict[str, tuple[str, list[Check] | None, float, str]] = {}


def chaos_table() -> str:
    rows = list(CHAOS_TABLE.items())
    names = next(([c.name for c in checks] for _, (_, checks, _, _) in rows if checks), [])
    short = [f"I{i + 1}" for i in range(len(names))]
    width = max(len(p) for p, _ in rows)
    lines = ["chaos: SIGKILL of the whole service at each point, then a restart; invariants held:"]
    lines += [f"  {s} = {n}" for s, n in zip(short, names)]
    lines.append(f"  {'point':<{width}}  " + " ".join(f"{s:>3}" for s in short) + "  held     time  interrupts")
    held_total = checks_total = 0
    for point, (what, checks, seconds, error) in rows:
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


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if CHAOS_TABLE:
        terminalreporter.write_sep("-", "chaos table")
        terminalreporter.write_line(chaos_table())
