"""Whole nights of the real engine on synthetic landscapes whose truth is known
(tests/fakes/landscape.py): the decision rule keeps what is real and nothing else, and a run of
discards never stops the loop. Deterministic: one slot, the noise of the n-th run is fixed."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from nightlab.loop.engine import run_engine
from nightlab.loop.state import ledger, views
from nightlab.loop.state.store import Store

from tests.fakes import landscape
from tests.fakes.scripted_proposer import ScriptedProposer


def _night(tmp_path: Path, land: landscape.Landscape, n: int, proposer: object = None, **loop: object):
    settings = landscape.make_workspace(tmp_path, land, **loop)
    run_engine(settings, n, proposer=proposer)  # type: ignore[arg-type]
    store = Store.for_workspace(settings.workspace_path)
    return settings.workspace_path, store, ledger.experiments(store)


def test_a_night_on_a_flat_landscape_keeps_nothing(tmp_path: Path) -> None:
    land = landscape.make("flat", seed=0)
    _, _, rows = _night(tmp_path, land, 40)
    assert [e.kind for e in rows[:3]] == ["baseline"] * 3  # the noise is measured first, by default
    assert "run-to-run noise ± " in rows[2].reason
    assert not [e for e in rows if e.status == "keep" and e.kind != "baseline"]
    assert sum(e.kind == "proposal" for e in rows) >= 20  # the night went on: proposals, not only repeats


def test_the_first_baseline_assumes_a_noise_in_proportion_to_its_metric(tmp_path: Path, capsys) -> None:
    """Nothing is measured before the night's first run: the prior (a share of the metric) scales
    with that run's own value, as every later one does with the best's, not with 1.0."""
    land = dataclasses.replace(landscape.make("flat", seed=0), base=4.0)
    settings = landscape.make_workspace(tmp_path, land)
    run_engine(settings, 1)
    first = ledger.experiments(Store.for_workspace(settings.workspace_path))[0]
    assert first.metric is not None and first.metric > 3
    prior = settings.loop.noise_prior * first.metric
    assert first.reason == f"baseline; run-to-run noise ± {prior:.4f} (assumed until repeats measure it)"
    assert "nightlab engine: 1 experiment recorded; stopping" in capsys.readouterr().err


def test_a_change_truly_better_by_3_sigma_is_kept(tmp_path: Path) -> None:
    land = landscape.make("one_big", seed=0)  # K00 alone matters: 3 σ at its optimum
    best = {n: 1.0 for n in land.names} | {"K00": 2.0 ** land.c[0]}
    proposer = ScriptedProposer([{"set": {"K01": 2.0}}, {"set": {"K00": round(best["K00"], 2)}}, {"set": {"K02": 0.5}}])
    repo, _, rows = _night(tmp_path, land, 10, proposer)
    kept = [e for e in rows if e.status == "keep" and e.kind != "baseline"]
    assert [e.params for e in kept] == [{"K00": round(best["K00"], 2)}]
    assert landscape.true_at(repo, land, kept[0].commit) < land.base - 2.9 * land.sigma
    # autoresearch.jsonl's confidence: the keep's gain in standard errors of the difference
    lines = [json.loads(line) for line in (repo / ledger.AUTORESEARCH_JSONL).read_text().splitlines()[1:]]
    confidence = next(r["confidence"] for r in lines if r["commit"] == kept[0].commit[:7])
    assert confidence == pytest.approx(kept[0].confidence) and confidence > 2
    # a new best is measured again until it has the baseline's number of runs (its own were lucky)
    assert sum(e.commit == kept[0].commit and e.metric is not None for e in rows) >= 3
    assert any(e.description == "re-measure the best on " + e.hardware for e in rows if e.commit == kept[0].commit)
    # what people read: the gain with its error, n = runs of the best vs runs of the baseline
    found = views.night_gain(Store.for_workspace(repo), rows)
    assert found is not None and found[1].gain > 2 * found[1].se and found[1].n_incumbent == 3
    assert f"gain +{found[1].gain:.6f} ± {found[1].se:.6f}" in views.best_text(repo)


def test_a_gain_no_fresh_run_has_measured_yet_is_said_to_be_unconfirmed(tmp_path: Path) -> None:
    """A night that stops right after a keep (a --max-experiments limit) states the gain from the
    run that was picked for luck: /best, /status and the report say it is not confirmed yet; the
    first fresh run of the best removes the warning."""
    land = landscape.make("one_big", seed=0)
    proposer = ScriptedProposer([{"set": {"K00": round(2.0 ** land.c[0], 2)}}])
    settings = landscape.make_workspace(tmp_path, land)
    run_engine(settings, 4, proposer=proposer)  # type: ignore[arg-type]
    repo = settings.workspace_path
    rows = ledger.experiments(Store.for_workspace(repo))
    assert rows[-1].status == "keep" and rows[-1].kind == "proposal"
    unconfirmed = "n = 1 vs 3; not confirmed yet: from the run that got it kept, likely too high"
    assert unconfirmed in views.best_text(repo) and unconfirmed in views.status_text(repo)
    assert unconfirmed in views.report_markdown(repo)
    run_engine(settings, 5, proposer=proposer)  # type: ignore[arg-type]  # (a total) re-measures the new best
    assert unconfirmed not in views.best_text(repo) and "n = 1 vs 3)" in views.best_text(repo)


def test_a_run_of_discards_never_pauses_the_loop_and_is_said_once(tmp_path: Path) -> None:
    land = landscape.make("flat", seed=1)
    proposer = ScriptedProposer([{"set": {"K00": 1.0 + k / 100}} for k in range(1, 13)])  # nothing has an effect
    _, store, rows = _night(tmp_path, land, 12, proposer, baseline_runs=1, max_runs=1,
                            pause_after_failures=4, remeasure_every=0)
    assert len(rows) == 12 and ledger.paused(store) is None
    events = store.events_after(0)
    assert not [e for e in events if e.kind == "self_paused"]
    alerts = [e.payload["text"] for e in events if e.kind == "alert"]
    assert len(alerts) == 1 and alerts[0].startswith("4 experiments in a row without a keep: the search widens")


def test_a_gain_whose_noise_no_repeat_has_measured_says_its_error_is_assumed(tmp_path: Path) -> None:
    """With one baseline run and nothing repeated, the ± beside a gain is loop.noise_prior's guess:
    /best, /status and the report said it as measured, and the report that the repeats measured it."""
    land = landscape.make("one_big", seed=0)
    proposer = ScriptedProposer([{"set": {"K00": round(2.0 ** land.c[0], 2)}}])
    settings = landscape.make_workspace(tmp_path, land, baseline_runs=1, noise_prior=0.001)
    run_engine(settings, 2, proposer=proposer)  # type: ignore[arg-type]
    repo = settings.workspace_path
    rows = ledger.experiments(Store.for_workspace(repo))
    assert [(e.kind, e.status) for e in rows] == [("baseline", "keep"), ("proposal", "keep")]
    assumed = "± from loop.noise_prior: no run repeated yet to measure the noise"
    assert assumed in views.best_text(repo) and assumed in views.status_text(repo)
    report = views.report_markdown(repo)
    assert assumed in report and "the repeats" not in report


def test_the_engines_line_for_a_result_run_again_says_undecided_as_the_digest_does(tmp_path: Path, capsys) -> None:
    """The journal read '#2 discard 0.992712 re-running to decide' beside the digest's '🔁 #2 undecided'."""
    land = landscape.make("one_big", seed=0)
    proposer = ScriptedProposer([{"set": {"K00": round(2.0 ** land.c[0], 2)}}])
    settings = landscape.make_workspace(tmp_path, land, baseline_runs=1)
    run_engine(settings, 2, proposer=proposer)  # type: ignore[arg-type]
    said = capsys.readouterr().err
    assert re.search(r"nightlab engine: #2 undecided [\d.]+ re-running to decide: better by", said), said


def test_repeats_that_give_identical_numbers_are_not_said_to_measure_a_noise(tmp_path: Path) -> None:
    """A trainer with a fixed seed (the tiny CPU profile) gives a commit the same number every run:
    the digest said 'run-to-run noise ± 0.0058 (measured from 2+ repeats)' and the chart 'runs vary ±
    0.0045' when the runs had not varied at all, the ± being loop.noise_prior's shrunk by them."""
    land = dataclasses.replace(landscape.make("one_big", seed=0), sigma=0.0)  # its effects, without noise
    proposer = ScriptedProposer([{"set": {"K00": round(2.0 ** land.c[0], 2)}}])
    settings = landscape.make_workspace(tmp_path, land, noise_prior=0.001)  # the change clears the prior's bar
    run_engine(settings, 4, proposer=proposer)  # type: ignore[arg-type]
    repo = settings.workspace_path
    rows = ledger.experiments(Store.for_workspace(repo))
    assert len({e.metric for e in rows[:3]}) == 1
    assert rows[2].reason.endswith("(assumed: the repeats gave the same number, so they measure no noise)")
    caption = views.chart_caption(repo)
    assert "runs vary" not in caption and "repeats gave the same number" in caption
    identical = "± from loop.noise_prior: the repeated runs gave the same number, so they measure no noise"
    assert identical in views.best_text(repo) and identical in views.report_markdown(repo)


def test_where_every_repeat_gives_the_same_number_nothing_is_run_again_and_the_prior_stands(tmp_path: Path) -> None:
    """A fixed-seed trainer (the tiny CPU profile): its repeats pooled as zeros shrank the prior, so a
    gain under the prior's z SE was re-run (for the same number) and ever smaller ones were kept as a
    night went on; a new best was run again baseline_runs times, each giving its number once more."""
    land = dataclasses.replace(landscape.make("one_big", seed=0), sigma=0.0)
    c, a = land.c[0], land.a[0]
    small = round(2.0 ** (c * (1 - 0.8**0.5)), 3)  # about a fifth of K00's whole effect
    best = round(2.0 ** c, 2)
    ones = {n: 1.0 for n in land.names}
    small_gain = land.base - land.true(ones | {"K00": small})
    prior = 0.001  # noise_prior x the metric (1.0): the z = 2 bar for 1 run vs 3 is 2 x 0.001 x (4/3) ** 0.5
    assert 0.001 < small_gain < 2 * prior * (4 / 3) ** 0.5 < a * c**2 - 0.003  # under the bar; the best far over
    proposer = ScriptedProposer([{"set": {"K00": small}}, {"set": {"K00": best}}, {"set": {"K01": 2.0}}])
    _, _, rows = _night(tmp_path, land, 6, proposer, noise_prior=prior)
    assert [e.kind for e in rows] == ["baseline"] * 3 + ["proposal"] * 3  # no re-run, no re-measure of the best
    assert rows[3].status == "discard" and rows[3].reason.endswith("(a re-run gives the same number)")
    assert f"± {prior * (4 / 3) ** 0.5:.4f}" in rows[3].reason  # the prior's, not shrunk by the repeats
    assert rows[4].status == "keep" and rows[4].params == {"K00": best}


def test_a_best_where_every_repeat_gives_the_same_number_is_not_said_to_await_a_fresh_run(tmp_path: Path) -> None:
    """A fixed-seed trainer's new best is not run again (a run gives its number once more): /best,
    /status and the report said its gain was 'not confirmed yet: ... likely too high until a fresh
    run re-measures it' for the rest of the night, for a number no run could change."""
    land = dataclasses.replace(landscape.make("one_big", seed=0), sigma=0.0)
    proposer = ScriptedProposer([{"set": {"K00": round(2.0 ** land.c[0], 2)}}])
    repo, _, rows = _night(tmp_path, land, 4, proposer, noise_prior=0.001)
    assert rows[-1].status == "keep" and rows[-1].kind == "proposal"
    for text in (views.best_text(repo), views.status_text(repo), views.report_markdown(repo)):
        assert "n = 1 vs 3; ± from loop.noise_prior: the repeated runs gave the same number" in text
        assert "not confirmed yet" not in text
