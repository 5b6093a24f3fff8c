"""program.md: the research directives nightlab writes into a new workspace (the user's to edit;
the agent proposer gives it to the coding agent before every experiment)."""

from nightlab.loop.state.config import ProjectSettings

PROGRAM_MD = "program.md"

_HEADER = """\
# program.md — research directives

This file is yours: edit it to steer the research. nightlab gives it to the proposer (the
coding agent reads it before every experiment) and never changes it.
"""

DEFAULT_PROGRAM = _HEADER + """
## Setup
- `train.py` is the only file you change. Everything in it is fair game: the model, the
  optimizer, the hyperparameters, the schedule, the batch size.
- `prepare.py` and `harness.py` are the fixed harness (data, tokenizer, dataloader; device, dtype,
  attention backend, budget, scoring). Do not change them, and do not add dependencies.
- The harness scores every run itself: it rebuilds your model with `build_model(config, device,
  dtype)`, loads the weights the run saved (`rt.finish(...)` at the end of `main`), and computes
  val_bpb from `model(inputs)` logits. Keep those names; a model whose position t looks at later
  tokens is rejected. train.py has no validation data; printing a val_bpb changes nothing.
- Every run trains for a fixed budget, so results are comparable whatever you change.

## Goal
Get the lowest `val_bpb` (validation bits per byte; lower is better). The budget is fixed, so a
faster step is as good as a better step: more steps fit in the same time.

## The experiment loop
1. Form one hypothesis and make one focused change to train.py.
2. Say what you changed (one line) and why you expect it to help.
3. The run is measured; a better val_bpb is kept, anything else is reset.

## Rules of thumb
- Simplicity: a tiny gain that adds ugly complexity is not worth it; removing code for an equal
  result is a win. Prefer small diffs.
- VRAM is a soft constraint: some increase is fine for a real gain, not for noise.
- A crash costs a whole run: read the last crash's log before trying something similar.
- When several ideas in an area failed in a row, move to another area.
- Do not chase noise: a gain smaller than the run-to-run noise is re-run before it counts.

## Ideas worth trying
- Learning rates and warmup/warmdown fractions; weight decay; Adam betas.
- Model shape: depth vs width (aspect ratio), head dim, attention window pattern.
- Batch size vs number of steps within the budget.
"""


def program_for(project: ProjectSettings) -> str:
    """The directives for a new workspace: the built-in trainer's, or for a project of the user's
    its own files and metric (the agent must not be sent to a train.py and a val_bpb it lacks)."""
    if not project.run_command:
        return DEFAULT_PROGRAM
    editable = ", ".join(f"`{f}`" for f in project.editable)
    protected = ", ".join(f"`{f}`" for f in project.protected) or "none"
    goal = "lowest" if project.direction == "minimize" else "highest"
    return _HEADER + f"""
## Setup
- Files you change: {editable}. Protected (hash-checked before every run): {protected}.
- Every run is measured the same way, so results are comparable whatever you change.

## Goal
Get the {goal} `{project.metric}`.

## Rules of thumb
- One focused change per experiment; prefer small diffs. Simpler code wins ties.
- A crash costs a whole run: read the last crash's log before trying something similar.
- Do not chase noise: a gain smaller than the run-to-run noise is re-run before it counts.
"""
