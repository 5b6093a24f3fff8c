"""Proposers: `search` (built in, a Bayesian model of the metric over UPPER_CASE constants) and `agent` (an external
coding-agent command). The engine picks one with `make_proposer(settings)`."""

from __future__ import annotations

from collections.abc import Callable

from nightlab.loop.proposers.base import (
    PastExperiment,
    Proposal,
    ProposalContext,
    ProposalError,
    Proposer,
)
from nightlab.loop.state.config import Settings
from nightlab.loop.state.errors import UserError

__all__ = [
    "PastExperiment",
    "Proposal",
    "ProposalContext",
    "ProposalError",
    "Proposer",
    "make_proposer",
]


def make_proposer(settings: Settings, tick: Callable[[], None] | None = None) -> Proposer:
    """The proposer the config names (`[proposer] kind`).

    `tick`: called about once a second while a slow proposer (an agent) works, so the engine
    can keep its liveness tick fresh and check commands; raising from it aborts the proposal.
    """
    # Imported here so the engine never loads numpy's model when it runs an agent, and vice versa.
    if settings.proposer.kind == "agent":
        from nightlab.loop.proposers.agent import AgentProposer
        from nightlab.loop.workspace import missing_program

        # Said once at the start (the daemon stops with it in chat), not as a crash per proposal
        # until the loop pauses itself after a night's worth of them.
        problem = missing_program(settings.proposer.agent.command, settings.workspace_path)
        if problem is not None:
            raise UserError(f"[proposer.agent] command starts {problem} (a service's PATH may lack where it is"
                            f" installed: give its full path); install the agent, or fix [proposer.agent] command"
                            f" in {settings.origin}")
        return AgentProposer(settings.proposer.agent, settings.loop.switch_area_after, tick)
    from nightlab.loop.proposers.search import SearchProposer

    search = SearchProposer(
        seed=settings.proposer.seed,
        switch_area_after=settings.loop.switch_area_after,
        target=settings.workspace_path / settings.project.editable[0],
        noise_prior=settings.loop.noise_prior,
    )
    if search.unparsable:  # once at the start, like the two below
        raise UserError(search.unparsable)
    if search.unsearchable:  # as for the agent: once at the start, not a crash per proposal
        raise UserError(f"{search.unsearchable} ([proposer] kind in {settings.origin})")
    return search
