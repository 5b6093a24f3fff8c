"""The engine: the experiment cycle as a restartable state machine (ARCHITECTURE.md: the engine).

    cycle.py      the phases in order: startup -> plan -> propose -> launch -> poll -> decide
                  -> record -> export, and the checkpoint between steps
    startup.py    the workspace as a restart finds it; the keys the views read
    planning.py   waves and the async mode's next member: baselines, hardware and drift pins
    proposing.py  proposing -> committed (and rebases re-made on the best)
    launching.py  committed -> running: a free slot, the protected files, the executor
    polling.py    running -> ended: one batched poll, kills carried out
    deciding.py   ended -> finished: the judge (judge.py, decision.py), best of wave, checks,
                  the second opinion on a keep
    recording.py  finished -> recorded: git to keep/reset, the experiment and its event, self-pause
    exporting.py  recorded -> done: results.tsv / autoresearch.jsonl, confirm runs, rebases
    outcome.py    Outcome: what deciding hands to recording and exporting (stored per candidate)
    context.py    what every phase shares (settings, workspace, git, executor, slots, paths)
    steering.py   the pending commands, applied at each checkpoint
    streaks.py    failures in a row, experiments without a keep
    process.py    run_engine, `python -m nightlab.loop.engine` (main)
"""

from nightlab.loop.engine.cycle import Engine
from nightlab.loop.engine.process import main, run_engine

__all__ = ["Engine", "main", "run_engine"]
