"""Run profiles for the built-in trainer (no torch: the daemon imports this).

A profile is two things:
- `constants`: values for train.py's top-level UPPER_CASE constants, written into a
  workspace's train.py by rewriting its `NAME = value` lines (`apply_constants`);
- `harness_env`: environment for the fixed harness prepare.py (NIGHTLAB_TIME_BUDGET,
  NIGHTLAB_MAX_SEQ_LEN, NIGHTLAB_EVAL_TOKENS, and NIGHTLAB_DTYPE on GPUs without bf16),
  set by the executor for each run.

One profile per hardware tier; `choose` picks one for a machine (`trainer.profile = "auto"`)
from what nvidia-smi says about its GPUs (memory, compute capability), or Apple MPS, or
the CPU. `default` is upstream's H100 setup (no overrides, a wall-clock budget). `tiny` runs on
a CPU in well under a minute and still learns (val_bpb clearly below an untrained model's); its
budget is a number of steps, so the same seed gives the same run under any load.

How the tiers are sized (the memory estimate is `estimated_peak_bytes`, the formula the harness's
fit_device_batch uses, calibrated on upstream's 45 GB at depth 8, dim 512, 128 x 2048 rows):
peak = rows x seq x (24 x depth x dim + 12 x vocab) bytes of activations and fp32 logits
     + 16 bytes per parameter (weights, grads, two optimizer moments).
Each GPU tier keeps that estimate under about 60 % of the tier's smallest card, so the real
peak (allocator slack, compile workspaces, the eval's batch) still fits. Each tier's token
budget per step is sized so a 5-minute run makes a few hundred optimizer steps on the slowest
card of the tier, and its eval is a small fraction of the training time (eval forward passes
cost about a third of a training step per token).
"""

from __future__ import annotations

import ast
import io
import operator
import re
import tokenize
from dataclasses import dataclass, field
from typing import TypeGuard


@dataclass(frozen=True)
class Profile:
    name: str
    constants: dict[str, object] = field(default_factory=dict)  # train.py UPPER_CASE overrides
    harness_env: dict[str, str] = field(default_factory=dict)  # NIGHTLAB_* for prepare.py
    description: str = ""


# Sizes shared by the smaller tiers: heads of 64 (more heads at a small width), upstream's
# learning rates otherwise.
_SMALL_HEADS = {"ASPECT_RATIO": 64, "HEAD_DIM": 64}

PROFILES: dict[str, Profile] = {
    # est. peak 26.6 GB at the 128 rows fit_device_batch allows on 40 GB; 52.3 GB at 128 rows on 80 GB
    "default": Profile(
        name="default",
        constants={},
        harness_env={},
        description="upstream autoresearch on one H100 (40 GB and up): depth 8, dim 512, seq 2048, "
                    "524K-token steps, 5-minute budget",
    ),
    # 50.3M params (0.8 GB with grads + Adam/Muon state) + 32 x 2048 rows of activations (12.9 GB):
    # est. 13.7 GB on 24 GB cards. Half of upstream's tokens per step: a 4090 has about 1/6 of an
    # H100's bf16 throughput, so steps of 2**19 tokens would leave under 200 steps in 5 minutes.
    "24gb": Profile(
        name="24gb",
        constants={"PROFILE": "24gb", "TOTAL_BATCH_SIZE": 2**18, "DEVICE_BATCH_SIZE": 32},
        harness_env={"NIGHTLAB_EVAL_TOKENS": str(20 * 2**19)},
        description="24-32 GB cards (RTX 4090/3090/5090, A5000, A10, L4): upstream's model (depth 8, dim 512, "
                    "seq 2048), 262K-token steps in 32-row micro-batches, 10M eval tokens",
    ),
    # 26.3M params (0.4 GB) + 32 x 1024 rows (5.0 GB): est. 5.5 GB, 45 % of a 12 GB RTX 3060.
    "16gb": Profile(
        name="16gb",
        constants={"PROFILE": "16gb", "DEPTH": 6, **_SMALL_HEADS,
                   "TOTAL_BATCH_SIZE": 2**17, "DEVICE_BATCH_SIZE": 32},
        harness_env={"NIGHTLAB_MAX_SEQ_LEN": "1024", "NIGHTLAB_EVAL_TOKENS": str(8 * 2**19)},
        description="12-16 GB cards (T4, V100, RTX 4080, RTX 3060 12 GB): depth 6, dim 384, seq 1024, "
                    "131K-token steps, 4M eval tokens",
    ),
    # 11.5M params (0.2 GB) + 64 x 512 rows (4.0 GB): est. 4.2 GB, 52 % of 8 GB.
    "8gb": Profile(
        name="8gb",
        constants={"PROFILE": "8gb", "DEPTH": 4, **_SMALL_HEADS,
                   "TOTAL_BATCH_SIZE": 2**16, "DEVICE_BATCH_SIZE": 64},
        harness_env={"NIGHTLAB_MAX_SEQ_LEN": "512", "NIGHTLAB_EVAL_TOKENS": str(4 * 2**19)},
        description="8 GB cards (RTX 3070/2070, GTX 1080): depth 4, dim 256, seq 512, 65K-token steps, "
                    "2M eval tokens",
    ),
    # Apple silicon: eager fp32 (train.py does not compile on MPS) at a few TFLOP/s, unified memory
    # from 8 GB: est. 1.4 GB (fp32 activations, 16 x 512 rows). Small steps keep the step count up.
    "mps": Profile(
        name="mps",
        constants={"PROFILE": "mps", "DEPTH": 4, **_SMALL_HEADS,
                   "TOTAL_BATCH_SIZE": 2**15, "DEVICE_BATCH_SIZE": 16, "ATTENTION_BACKEND": "sdpa"},
        harness_env={"NIGHTLAB_MAX_SEQ_LEN": "512", "NIGHTLAB_EVAL_TOKENS": str(2**20)},
        description="Apple silicon (MPS): depth 4, dim 256, seq 512, 32K-token steps, 1M eval tokens, eager fp32",
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

GPU_TIERS = ("default", "24gb", "16gb", "8gb")  # largest first; `auto` takes the first that fits
# Smallest total memory (MiB, as nvidia-smi reports it) for each GPU tier but the last: an A100
# 40 GB (40960) is H100-class, an A10 (23028) a 24 GB card, a 2080 Ti (11264) a 16 GB one.
TIER_MIN_MIB = {"default": 38 * 1024, "24gb": 20 * 1024, "16gb": 11 * 1024}
# The card each tier is sized for (its smallest; `default` is sized for an 80 GB H100 and relies on
# train.py's fit_device_batch halving the micro-batch on a 40 GB A100).
TIER_MEMORY_GB = {"default": 80, "24gb": 24, "16gb": 12, "8gb": 8, "mps": 8}
DTYPE_ENV = "NIGHTLAB_DTYPE"  # bf16 | fp16 | fp32, read by the trainer (bf16 when unset)
_DEFAULT_DEVICE_BATCH = 128  # train.py's DEVICE_BATCH_SIZE, which `default` leaves alone


@dataclass(frozen=True)
class Gpu:
    """One GPU as nvidia-smi describes it; None where it could not say."""

    name: str
    memory_mib: int | None = None
    capability: tuple[int, int] | None = None  # (8, 9) for sm89

    def describe(self) -> str:
        memory = f"{self.memory_mib / 1024:.0f} GB" if self.memory_mib else "memory unknown"
        cap = f"sm{self.capability[0]}{self.capability[1]}" if self.capability else "capability unknown"
        return f"{self.name} ({memory}, {cap})"


@dataclass(frozen=True)
class Machine:
    """What a run will train on: the GPUs of one slot (all alike in practice), else MPS, else the CPU."""

    gpus: tuple[Gpu, ...] = ()
    mps: bool = False


@dataclass(frozen=True)
class Choice:
    profile: Profile
    reason: str  # one sentence: why this profile, for the log, the first digest and `nightlab doctor`


def dtype_for(capability: tuple[int, int] | None) -> str:
    """bf16 on Ampere and newer (sm80+); fp16 (with loss scaling) on Volta/Turing (sm70, sm75),
    whose tensor cores have no bf16; fp32 before that (Pascal's fp16 is slow or missing)."""
    if capability is None or capability >= (8, 0):
        return "bf16"
    return "fp16" if capability >= (7, 0) else "fp32"


def for_capability(profile: Profile, capability: tuple[int, int] | None) -> Profile:
    """A GPU profile adapted to a card without bf16. fp16/fp32 cards get SDPA attention
    (FlexAttention's Triton kernels target sm80+); fp32 cards run eager (Triton needs sm70+) and
    with half the micro-batch (fp32 activations are twice the size)."""
    dtype = dtype_for(capability)
    if capability is None or dtype == "bf16" or profile.name not in GPU_TIERS:
        return profile
    constants: dict[str, object] = {**profile.constants, "ATTENTION_BACKEND": "sdpa"}
    if dtype == "fp32":
        rows = int(str(profile.constants.get("DEVICE_BATCH_SIZE", _DEFAULT_DEVICE_BATCH)))
        constants.update(COMPILE=False, DEVICE_BATCH_SIZE=max(1, rows // 2))
    name = f"{profile.name}-{dtype}"
    constants["PROFILE"] = name
    return Profile(name=name, constants=constants, harness_env={**profile.harness_env, DTYPE_ENV: dtype},
                   description=f"{profile.description}; {dtype} (no bf16 on sm{capability[0]}{capability[1]})")


def tier_for(memory_mib: int | None) -> str:
    for name in GPU_TIERS[:-1]:
        if memory_mib is not None and memory_mib >= TIER_MIN_MIB[name]:
            return name
    return GPU_TIERS[-1]


def choose(name: str, machine: Machine) -> Choice:
    """The profile a run on `machine` gets for `trainer.profile = name` (auto or a profile's name).

    auto: the tier of the smallest GPU (every slot runs the same train.py), else mps on Apple
    silicon, else tiny. A GPU profile is adapted to a card without bf16 whichever way it was picked.
    """
    if name != "auto" and name not in PROFILES:
        raise KeyError(f"unknown trainer profile {name!r}; profiles: auto, {', '.join(PROFILES)}")
    smallest = min(machine.gpus, key=lambda g: (g.memory_mib or 0, g.capability or (99, 0)), default=None)
    capability = min((g.capability for g in machine.gpus if g.capability), default=None)
    if name != "auto":
        chosen = PROFILES[name]
        reason = f"trainer.profile = {name!r}"
    elif smallest is not None:
        chosen = PROFILES[tier_for(smallest.memory_mib)]
        fleet = f"{len(machine.gpus)} GPUs, the smallest " if len(machine.gpus) > 1 else ""
        reason = f"auto: {fleet}{smallest.describe()} -> the {chosen.name!r} tier"
    elif machine.mps:
        chosen, reason = PROFILES["mps"], "auto: no NVIDIA GPU, Apple silicon (MPS) -> 'mps'"
    else:
        chosen, reason = PROFILES["tiny"], "auto: no GPU visible (nvidia-smi found none, no Apple MPS) -> the CPU profile 'tiny'"
    if capability is not None and (adapted := for_capability(chosen, capability)) is not chosen:
        reason += f", {adapted.harness_env[DTYPE_ENV]} because sm{capability[0]}{capability[1]} has no bf16"
        chosen = adapted
    return Choice(chosen, reason)


def estimated_peak_bytes(profile: Profile, vocab_size: int = 8192) -> int:
    """The harness's memory estimate (estimate_train_bytes) for a profile's shapes and micro-batch:
    activations + fp32 logits per token, and 16 bytes per parameter. fp32 doubles the activations."""
    c = {"DEPTH": 8, "ASPECT_RATIO": 64, "HEAD_DIM": 128, "DEVICE_BATCH_SIZE": _DEFAULT_DEVICE_BATCH,
         **profile.constants}
    depth, head = int(str(c["DEPTH"])), int(str(c["HEAD_DIM"]))
    dim = -(-depth * int(str(c["ASPECT_RATIO"])) // head) * head
    seq = int(profile.harness_env.get("NIGHTLAB_MAX_SEQ_LEN", "2048"))
    value_embed_layers = sum(1 for i in range(depth) if i % 2 == (depth - 1) % 2)
    params = (2 + value_embed_layers) * vocab_size * dim + 12 * depth * dim * dim
    fp32 = profile.harness_env.get(DTYPE_ENV) == "fp32" or profile.name in ("mps", "tiny")
    per_token = 24 * depth * dim * (2 if fp32 else 1) + 12 * vocab_size
    return int(str(c["DEVICE_BATCH_SIZE"])) * seq * per_token + 16 * params


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

    Keeps each line's trailing comment: at the same column where the new value leaves room, else
    after as many spaces as it had (two at most: an aligned column is given up, PEP 8's two kept).
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
            gap = len(comment) - len(comment.lstrip())
            # the comment's column; a longer value pushes it on, never closer than the line had it
            comment = " " * max(min(gap, 2), len(old) + gap - len(new)) + comment.lstrip()
        lines[i] = prefix + new + comment + ending
    return "".join(lines)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _evaluate(node: ast.AST) -> object:
    """Value of a constant expression: literals and + - * / // ** % on numbers (e.g. 2**19)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, tuple(_BINOPS)):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if not (_is_number(left) and _is_number(right)):
            raise ValueError("arithmetic on non-numbers")
        if isinstance(node.op, ast.Pow) and abs(right) > 256:
            raise ValueError("exponent too large")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _evaluate(node.operand)
        if not _is_number(operand):
            raise ValueError("arithmetic on non-numbers")
        return -operand if isinstance(node.op, ast.USub) else +operand
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_evaluate(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    return ast.literal_eval(node)


_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod,
}


# what to do about a file `not_python` names: the engine's start (the search) and `nightlab doctor` say it
NOT_PYTHON_FIX = "fix it (an edit not committed yet shows in `git diff`; commit the fix)"


def not_python(file: str, source: str) -> str | None:
    """Why `source` (the file `file`) is no Python, with the line, in one line; None when it parses."""
    try:
        ast.parse(source)
    except SyntaxError as exc:
        return f"{file} is not valid Python (line {exc.lineno}: {exc.msg})"
    return None


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
