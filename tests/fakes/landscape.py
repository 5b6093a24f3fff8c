"""A synthetic landscape trainer: val_bpb is a known true function of train.py's constants plus
Gaussian run-to-run noise, so a night's real gain can be computed exactly.

train.py holds `NAME = 1.0` constants (the search proposer's generic space: ×/÷ 4 around the
current value). With u = log2(value), the true metric is

    f(u) = base + Σ a_i ((u_i - c_i)² - c_i²) + Σ b_ij u_i u_j

so f = base at the start (every constant 1.0), constant i alone is best at u_i = c_i, where it
gains a_i c_i² (its single-change effect), and pairs (i, j, b) interact. A run prints upstream's
summary block with f + N(0, sigma²); the noise of the n-th run of a night is drawn from
(seed, n), so a single-slot night is exactly reproducible.

    python landscape.py SPEC.json       (the run command, in the run's directory)
"""

from __future__ import annotations

import ast
import fcntl
import json
import math
import random
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nightlab.loop.state.config import Settings


@dataclass(frozen=True)
class Landscape:
    names: tuple[str, ...]
    a: tuple[float, ...]  # curvature of each constant's bowl
    c: tuple[float, ...]  # each constant's own optimum, in log2 units from the start
    pairs: tuple[tuple[int, int, float], ...] = ()  # (i, j, b): interaction b u_i u_j
    sigma: float = 0.002
    base: float = 1.0
    seed: int = 0

    def true(self, values: dict[str, float]) -> float:
        u = [math.log2(float(values[n])) for n in self.names]
        f = self.base + sum(a * ((x - c) ** 2 - c**2) for a, c, x in zip(self.a, self.c, u, strict=True))
        return f + sum(b * u[i] * u[j] for i, j, b in self.pairs)

    def best(self) -> float:
        """The true minimum (the quadratic form's; every bowl is convex and pairs are bounded)."""
        import numpy as np  # here, not at the top: every run of the trainer imports this module

        k = len(self.names)
        h = np.diag([2 * a for a in self.a])
        for i, j, b in self.pairs:
            h[i, j] += b
            h[j, i] += b
        g = np.array([2 * a * c for a, c in zip(self.a, self.c, strict=True)])
        if k and not np.all(np.linalg.eigvalsh(h) > 0):
            raise ValueError("the landscape has no minimum (interactions too strong)")
        u = np.linalg.solve(h, g) if k else np.zeros(0)
        u = np.clip(u, -4, 4)  # a search that drifts ×/÷ 4 per keep reaches far, but not forever
        return self.true({n: 2.0 ** x for n, x in zip(self.names, u, strict=True)})

    def possible(self) -> float:
        return self.base - self.best()

    def train_py(self) -> str:
        lines = ['"""A landscape: val_bpb is a known function of these constants (tests/fakes/landscape.py)."""', ""]
        for name in self.names:
            lines += [f"{name} = 1.0", ""]
        return "\n".join(lines)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @staticmethod
    def read(path: Path) -> Landscape:
        d = json.loads(path.read_text())
        return Landscape(tuple(d["names"]), tuple(d["a"]), tuple(d["c"]), tuple(tuple(p) for p in d["pairs"]),  # type: ignore[arg-type]
                         d["sigma"], d["base"], d["seed"])


def make(shape: str, seed: int, sigma: float = 0.002) -> Landscape:
    """A landscape of one shape; single-change effects between 0.25 σ and 2 σ.

    separable: 6 constants, independent bowls. interactions: the same plus three interacting
    pairs (the best of a pair is not the best of each alone). few_big: 2 constants of 2 σ and
    8 of 0.25 σ. flat: 4 constants with no effect at all. one_big: one constant 3 σ, 3 flat.
    """
    rng = random.Random(f"{shape}:{seed}")

    def bowl(effect: float) -> tuple[float, float]:
        c = rng.choice((-1, 1)) * rng.uniform(0.6, 1.6)
        return effect * sigma / c**2, c  # a c² = the effect

    if shape in ("separable", "interactions"):
        effects = [rng.uniform(0.25, 2.0) for _ in range(6)]
    elif shape == "few_big":
        effects = [2.0, 2.0] + [0.25] * 8
    elif shape == "flat":
        effects = [0.0] * 4
    elif shape == "one_big":
        effects = [3.0, 0.0, 0.0, 0.0]
    else:
        raise ValueError(f"unknown landscape shape {shape!r}")
    bowls = [bowl(e) for e in effects]
    a, c = (tuple(x) for x in zip(*bowls, strict=True))
    pairs: tuple[tuple[int, int, float], ...] = ()
    if shape == "interactions":  # b within ±0.8 x 2 sqrt(a_i a_j): still a bowl
        pairs = tuple((i, i + 1, rng.choice((-1, 1)) * 0.8 * 2 * math.sqrt(a[i] * a[i + 1])) for i in (0, 2, 4))
    names = tuple(f"K{i:02d}" for i in range(len(effects)))
    return Landscape(names, a, c, pairs, sigma, 1.0, seed)


def make_workspace(tmp: Path, land: Landscape, seed: int = 0, **loop: Any) -> Settings:
    """A git workspace whose train.py is the landscape's constants and whose run command is
    this trainer; `loop`: [loop] settings (the rule's own defaults otherwise)."""
    # imported here, not at the top: the trainer's own runs stay fast to start
    from nightlab.loop.state.config import settings_from_table
    from nightlab.loop.workspace import init_workspace

    repo = tmp / "ws"
    repo.mkdir()
    (repo / "train.py").write_text(land.train_py())
    (repo / "prepare.py").write_text("# the fixed harness\n")
    spec = land.write(tmp / "landscape.json")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "start"], check=True)
    settings = settings_from_table({
        "workspace": {"path": str(repo), "tag": "landscape"},
        "project": {"run_command": f"{sys.executable} {Path(__file__).resolve()} {spec}"},
        "proposer": {"seed": seed},
        "loop": {"checkpoint_interval": 0.05, **loop},
    }, source="<landscape>")
    init_workspace(repo, "landscape", settings, say=lambda _: None)
    return settings


def true_at(repo: Path, land: Landscape, commit: str) -> float:
    """The true metric of train.py at `commit`."""
    source = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:train.py"], check=True,
                            capture_output=True, text=True).stdout
    return land.true(read_values(source))


def read_values(source: str) -> dict[str, float]:
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def main(argv: list[str]) -> int:
    spec = Path(argv[1])
    land = Landscape.read(spec)
    counter = spec.with_suffix(".runs")
    with open(spec.with_suffix(".lock"), "w") as lock:  # runs of a wave may start together
        fcntl.flock(lock, fcntl.LOCK_EX)
        n = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(n + 1))
    noise = random.Random(f"{land.seed}:run:{n}").gauss(0.0, land.sigma)
    value = land.true(read_values(Path("train.py").read_text())) + noise
    print(f"---\nval_bpb: {value:.6f}\npeak_vram_mb: 1.0", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
