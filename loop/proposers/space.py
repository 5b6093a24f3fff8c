"""The search space of the `search` proposer: which UPPER_CASE constants it may set, to what.

The built-in trainer's constants have hand-picked ranges grouped into areas. Any other file
(bring-your-own project) gets its positive numeric constants searched in one area,
`constants`, with multiplicative ranges around their current value. Values are snapped to a
coarse grid (two significant digits, ratio steps, powers of two) so that a configuration can
actually repeat: "never try the same thing twice" is meaningless over raw floats, and
"MATRIX_LR 0.04→0.05" reads better than 0.0487213.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nightlab.trainer.profiles import apply_constants, read_constants

GENERIC_AREA = "constants"
# The built-in trainer's areas, in the order the search visits them: cheap and usually
# rewarding knobs first, shape changes (slower, riskier) later.
BUILTIN_AREAS = ("optimizer", "schedule", "architecture", "attention", "batch")

Kind = Literal["log", "linear", "int", "choice"]


@dataclass(frozen=True)
class Param:
    """One searchable constant. Floats live on a grid: `log` keeps two significant digits,
    `linear` snaps to multiples of `step`; `choice` lists every allowed value."""

    name: str
    area: str
    kind: Kind
    low: float = 0.0
    high: float = 0.0
    step: float = 0.0
    choices: tuple[object, ...] = ()

    def snap(self, x: float) -> object:
        if self.kind == "int":
            return int(min(max(round(x), self.low), self.high))
        if self.kind == "log":
            x = float(f"{x:.2g}")
        else:
            x = round(round(x / self.step) * self.step, 10)
        return min(max(x, self.low), self.high)

    def moves(self, current: object) -> list[object]:
        """The values a proposal may set, nearest first: up to ×/÷ 4 in quarter-octave steps
        for a log-scaled constant, up to 8 grid steps either side for a linear one, every other
        value of a choice; inside the range and on the grid."""
        if self.kind == "choice":
            return [c for c in self.choices if c != current]
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            return []
        if self.kind == "log":
            values = [self.snap(current * 2 ** (sign * k / 4)) for k in range(1, 9) for sign in (1, -1)]
        else:
            unit = 1 if self.kind == "int" else self.step
            values = [self.snap(current + sign * k * unit) for k in range(1, 9) for sign in (1, -1)]
        return list(dict.fromkeys(v for v in values if v != current))


@dataclass(frozen=True)
class SearchSpace:
    file: str  # the editable file these constants live in
    params: tuple[Param, ...]
    current: dict[str, object]  # the file's values now (the best configuration)

    @property
    def areas(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.area for p in self.params))

    def in_area(self, area: str) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.area == area)

    def moves(self, param: Param) -> list[object]:
        """`param`'s moves from the current configuration, less those that build the model it builds
        now: a window pattern giving every layer the window it has now is no experiment (at the
        tiny profile's DEPTH 2, 'SL', 'SSL' and 'SSSSL' are one model)."""
        depth = self.current.get("DEPTH")
        now = self.current[param.name]
        if param.name != "WINDOW_PATTERN" or not isinstance(depth, int) or isinstance(depth, bool):
            return param.moves(now)
        return [v for v in param.moves(now) if _layer_windows(v, depth) != _layer_windows(now, depth)]


def _layer_windows(pattern: object, depth: int) -> tuple[str, ...] | object:
    """Each layer's window as train.py's compute_window_sizes sets it: the pattern cycled over the
    layers, the last one full ("L"); a value that is no pattern stands for itself."""
    if not isinstance(pattern, str) or not pattern or depth < 1:
        return pattern
    cycled = pattern.upper()
    return tuple(cycled[i % len(cycled)] for i in range(depth - 1)) + ("L",)


def _log(name: str, area: str, low: float, high: float) -> Param:
    return Param(name, area, "log", low=low, high=high)


def _linear(name: str, area: str, low: float, high: float, step: float) -> Param:
    return Param(name, area, "linear", low=low, high=high, step=step)


def _choice(name: str, area: str, *choices: object) -> Param:
    return Param(name, area, "choice", choices=choices)


def _by_twos(name: str, area: str, current: object) -> Param | None:
    """current / 4 … current × 4 by factors of two: a power of two (a batch size) stays one, so
    it stays divisible; another integer is rounded."""
    if not isinstance(current, int) or isinstance(current, bool) or current < 1:
        return None
    values = [current * 2**k for k in (1, 2)] + [round(current / 2**k) for k in (1, 2)]
    return _choice(name, area, *sorted({current, *(v for v in values if v >= 1)}))


# The built-in trainer (trainer/train.py). Ranges span roughly 4× either side of upstream's
# defaults; a profile's value outside a range widens it (see _widen), so tiny keeps working.
_BUILTIN: tuple[Param, ...] = (
    _log("MATRIX_LR", "optimizer", 0.01, 0.16),
    _log("EMBEDDING_LR", "optimizer", 0.15, 2.4),
    _log("UNEMBEDDING_LR", "optimizer", 0.001, 0.032),
    _log("SCALAR_LR", "optimizer", 0.12, 2.0),
    _linear("WEIGHT_DECAY", "optimizer", 0.0, 0.5, 0.05),
    _choice("ADAM_BETAS", "optimizer", (0.8, 0.95), (0.9, 0.95), (0.8, 0.99), (0.9, 0.99), (0.7, 0.95), (0.85, 0.9)),
    _linear("WARMUP_RATIO", "schedule", 0.0, 0.2, 0.02),
    _linear("WARMDOWN_RATIO", "schedule", 0.1, 0.9, 0.05),
    _linear("FINAL_LR_FRAC", "schedule", 0.0, 0.2, 0.02),
    Param("DEPTH", "architecture", "int", low=2, high=16),
    _choice("ASPECT_RATIO", "architecture", 32, 48, 64, 80, 96, 128),
    _choice("HEAD_DIM", "architecture", 32, 64, 96, 128),
    _linear("SOFTCAP", "architecture", 5.0, 30.0, 2.5),
    _choice("WINDOW_PATTERN", "attention", "L", "SL", "SSL", "SSSL", "SSSSL"),  # ('SLSL' is 'SL')
)
# Sized relative to the current value (powers of two), since tiny and default differ 100×.
_BUILTIN_POW2 = (("TOTAL_BATCH_SIZE", "batch"), ("DEVICE_BATCH_SIZE", "batch"))
_BUILTIN_NAMES = {p.name for p in _BUILTIN} | {n for n, _ in _BUILTIN_POW2}


def _widen(param: Param, current: object) -> Param:
    """Make room for the file's current value, so the best configuration is always inside."""
    if param.kind == "choice":
        if current in param.choices:
            return param
        return _choice(param.name, param.area, *param.choices, current)
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        return param
    return Param(param.name, param.area, param.kind, low=min(param.low, current),
                 high=max(param.high, current), step=param.step)


def _generic(name: str, current: object) -> Param | None:
    """A BYO constant: positive numbers only, × / ÷ 4 around the current value. Zero and
    negative values have no scale to multiply; seeds are excluded because a "better seed" is
    noise, not progress."""
    if "SEED" in name or isinstance(current, bool) or not isinstance(current, (int, float)):
        return None
    if current <= 0:
        return None
    if isinstance(current, int):
        # above 16 a step of 1 (8 at most) would never move it by half: NUM_STEPS 200 went to 208 at most
        if current > 16 or (current >= 2 and current & (current - 1) == 0):
            return _by_twos(name, GENERIC_AREA, current)
        return Param(name, GENERIC_AREA, "int", low=max(1, current // 4), high=current * 4)
    return _log(name, GENERIC_AREA, current / 4, current * 4)


def _editable_line(source: str, name: str, value: object) -> bool:
    """apply_constants can rewrite this constant (one single-line top-level assignment)."""
    try:
        apply_constants(source, {name: value})
    except (KeyError, ValueError):
        return False
    return True


def build_space(file: str, source: str) -> SearchSpace:
    """The space for one editable file's source. Empty when the file has no searchable
    constants (not Python, or none that fit); the proposer then says so."""
    try:
        current = read_constants(source)
    except SyntaxError:
        return SearchSpace(file, (), {})
    current = {n: v for n, v in current.items() if _editable_line(source, n, v)}
    # The built-in trainer (or a derivative): most of its names are present.
    if 2 * len(_BUILTIN_NAMES & current.keys()) >= len(_BUILTIN_NAMES):
        params = [_widen(p, current[p.name]) for p in _BUILTIN if p.name in current]
        params += [q for n, a in _BUILTIN_POW2 if n in current and (q := _by_twos(n, a, current[n]))]
    else:
        params = [q for n, v in current.items() if (q := _generic(n, v))]
    params = [p for p in params if not (p.kind == "choice" and len(p.choices) < 2)]
    names = {p.name for p in params}
    return SearchSpace(file, tuple(params), {n: v for n, v in current.items() if n in names})


def format_value(value: object) -> str:
    """How values appear in descriptions; stable, so a description doubles as a dedupe key."""
    return repr(tuple(value) if isinstance(value, list) else value)
