"""Reads a run's figures from its log: the one parser the loop and the trainer's tests share.

Two formats, both written by the built-in trainer and common in users' own projects:
- upstream autoresearch's summary block: a line `---`, then `name: value` lines;
- the autoresearch plugins' `METRIC name=value` lines, anywhere in the log.
METRIC lines win where both name a figure. Non-numeric values (e.g. `mfu_percent: n/a`) are
kept out of `metrics` so a missing figure is never read as a number. A line `REJECTED: reason`
(the built-in harness refusing a trained model, e.g. one that looks ahead) is kept as `rejected`.
Lines are str.splitlines()'s: a `\r` ends one (a progress line printed with end="\r" does not
swallow the `---` after it), and the harness prefixes the training output's lines that pose as a
result by the same split (trainer/prepare.py: `progress\rMETRIC val_bpb=0.5` is prefixed after its `\r`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SUMMARY_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):\s*(\S+)\s*$")  # `val_bpb:0.9` too, as grep reads it
_METRIC_LINE = re.compile(r"^METRIC\s+([A-Za-z_][A-Za-z0-9_.]*)=(\S+)\s*$")
_REJECTED_LINE = re.compile(r"^REJECTED:\s*(.+?)\s*$")


@dataclass(frozen=True)
class Summary:
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: str | None = None  # why the harness refused the run's model (the last REJECTED line)
    # a figure given only as text that is no number (`val_bpb: abc`): said as such, not as "no val_bpb"
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """A `---` block or METRIC lines gave at least one figure."""
        return bool(self.metrics)

    def get(self, name: str) -> float | None:
        return self.metrics.get(name)


# commas only as thousands separators (1,650,000): a decimal comma, `val_bpb: 0,85`, read as 85.0
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?(?:[eE][+-]?\d+)?")


def _number(text: str) -> float | None:
    if "," in text:
        if not _THOUSANDS.fullmatch(text):
            return None
        text = text.replace(",", "")
    if "_" in text:  # float() reads "1_0" as 10
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_summary(text: str) -> Summary:
    lines = text.splitlines()
    figures: list[tuple[str, str]] = []
    # The last `---` starts the summary block: earlier ones may be part of the user's output.
    start = max((i for i, line in enumerate(lines) if line.strip() == "---"), default=None)
    if start is not None:
        figures += [(m[1], m[2]) for line in lines[start + 1 :] if (m := _SUMMARY_LINE.match(line.strip()))]
    rejected = None
    for line in lines:
        if match := _METRIC_LINE.match(line.strip()):
            figures.append((match[1], match[2]))  # after the block's: a METRIC line wins
        elif rejection := _REJECTED_LINE.match(line):
            rejected = rejection.group(1)
    metrics = {name: value for name, raw in figures if (value := _number(raw)) is not None}
    unreadable = {name: raw for name, raw in figures if name not in metrics}
    return Summary(metrics=metrics, rejected=rejected, unreadable=unreadable)
