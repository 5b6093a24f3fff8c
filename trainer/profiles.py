"""Run profiles for the built-in trainer (no torch: the daemon imports this).

A profile is two things:
- `constants`: values for train.py's top-level UPPER_CASE constants, written into a
  workspace's train.py by rewriting its `NAME = value` lines (`apply_constants`);
- `harness_env`: environment for the fixed harness prepare.py (NIGHTLAB_TIME_BUDGET,
  NIGHTLAB_MAX_SEQ_LEN, NIGHTLAB_EVAL_TOKENS), set by the executor for each run.

`default` is upstream's H100 setup (no overrides, a wall-clock budget). `tiny` runs on a CPU in
well under a minute and still learns (val_bpb clearly below an untrained model's); its budget is
a number of steps, so the same seed gives the same run under any load; nightlab picks it on
machines without a GPU.
"""

from __future__ import annotations

import ast
import io
import operator
import re
import tokenize
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Profile:
    name: str
    constants: dict[str, object] = field(default_factory=dict)  # train.py UPPER_CASE overrides
    harness_env: dict[str, str] = field(default_factory=dict)  # NIGHTLAB_* for prepare.py
    description: str = ""


PROFILES: dict[str, Profile] = {
    "default": Profile(
        name="default",
        constants={},
        harness_env={},
        description="upstream autoresearch on one H100: depth 8, dim 512, seq 2048, 524K-token steps, 5-minute budget",
    ),
    "tiny": Profile(
        name="tiny",
        constants={
            "PROFILE": "tiny",
            "DEPTH": 2,
            "ASPECT_RATIO": 64,
            "HEAD_DIM": 32,
            "WINDOW_PATTERN": "SL",
            "TOTAL_BATCH_SIZE": 2**10,
            "DEVICE_BATCH_SIZE": 4,
            # upstream's learning rates overshoot at this size (the loss climbs back after a few
            # steps); these were the best of a small sweep at 40 steps on the stdlib corpus
            "EMBEDDING_LR": 0.2,
            "UNEMBEDDING_LR": 0.004,
            "MATRIX_LR": 0.02,
            "WARMDOWN_RATIO": 0.7,
        },
        harness_env={
            "NIGHTLAB_BUDGET_STEPS": "40",  # steps, not seconds: the same run under any CPU load
            "NIGHTLAB_TIME_BUDGET": "15",
            "NIGHTLAB_MAX_SEQ_LEN": "256",
            "NIGHTLAB_EVAL_TOKENS": str(8 * 256 * 4),
        },
        description="CPU profile: depth 2, dim 128, seq 256, 1K-token steps, 40 steps (not seconds), 8K eval tokens",
    ),
}


_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _split_line(line: str) -> tuple[str, str, str]:
    """(`NAME = `, value, spaces + `# comment` or "") of a one-line assignment; ValueError if the
    value is not a complete expression on that line."""
    head, rest = line.split("=", 1)
    prefix = head + "=" + rest[: len(rest) - len(rest.lstrip())]
    rest = rest.lstrip()
    comment_at = len(rest)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(rest + "\n").readline):
            if tok.type == tokenize.COMMENT:
                comment_at = tok.start[1]
                break
    except (tokenize.TokenError, SyntaxError, IndentationError):
        raise ValueError(f"cannot rewrite {line.strip()!r}: its value does not end on that line") from None
    value = rest[:comment_at].rstrip()
    try:
        ast.parse(value, mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot rewrite {line.strip()!r}: its value does not end on that line") from None
    return prefix, value, rest[len(value):]


def _literal(value: object) -> str:
    """Python source for a constant's value: repr() of a literal (str, int, float, bool, None, tuple, list)."""
    text = repr(value)
    try:
        if ast.literal_eval(text) != value:
            raise ValueError
    except (ValueError, SyntaxError):
        raise ValueError(f"{value!r} has no literal form that reads back as the same value") from None
    return text


def apply_constants(source: str, values: dict[str, object]) -> str:
    """Rewrite the top-level `NAME = <value>` lines of a train.py for each name in `values`.

    Keeps each line's trailing comment (at the same column where the new value leaves room).
    Raises KeyError when a name has no such line, ValueError when it has several, when its
    value spans lines, or when a value has no literal form (e.g. NaN). Strings are written as
    repr() literals.
    """
    lines = source.splitlines(keepends=True)
    for name, value in values.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an UPPER_CASE constant name")
        pattern = re.compile(rf"^{re.escape(name)}\s*=(?!=)")
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        if not hits:
            raise KeyError(f"no top-level `{name} = ...` line in train.py")
        if len(hits) > 1:
            raise ValueError(f"{len(hits)} top-level `{name} = ...` lines in train.py; expected one")
        i = hits[0]
        body = lines[i].rstrip("\r\n")
        ending = lines[i][len(body):]
        prefix, old, comment = _split_line(body)
        new = _literal(value)
        if comment:
            width = len(old) + len(comment) - len(comment.lstrip())  # keep the comment's column
            comment = " " * max(1, width - len(new)) + comment.lstrip()
        lines[i] = prefix + new + comment + ending
    return "".join(lines)


def _evaluate(node: ast.AST) -> object:
    """Value of a constant expression: literals and + - * / // ** % on numbers (e.g. 2**19)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, tuple(_BINOPS)):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        if isinstance(node.op, ast.Pow) and abs(right) > 256:
            raise ValueError("exponent too large")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _evaluate(node.operand)
        return -operand if isinstance(node.op, ast.USub) else +operand
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_evaluate(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    return ast.literal_eval(node)


_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod,
}


def read_constants(source: str, names: list[str] | None = None) -> dict[str, object]:
    """The literal values of top-level UPPER_CASE constants in a train.py (all, or `names`)."""
    found: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if _NAME.fullmatch(name) and (names is None or name in names):
                try:
                    found[name] = _evaluate(node.value)
                except (ValueError, TypeError, ZeroDivisionError, OverflowError):
                    continue  # computed (e.g. a table or an expression), not a plain literal
    if names is not None:
        missing = [n for n in names if n not in found]
        if missing:
            raise KeyError(f"no literal top-level constant(s) {', '.join(missing)} in train.py")
    return found
