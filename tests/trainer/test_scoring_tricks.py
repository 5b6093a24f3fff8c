"""The scorer against models written to fool it (issue 18): each variant of tests/fakes/scored_models.py
saved as `finish` saves a run's model and scored by the harness's own `score`, in two batches of
128 rows so that a model can tell its calls apart."""

from __future__ import annotations

import sys

import pytest
from nightlab.trainer import prepare

from tests.fakes.scored_models import save_artifact

T, ROWS = 32, 256  # two batches of 128 rows on a CPU (the scorer's cap on logits)


@pytest.fixture
def score(H, data_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(H, "MAX_SEQ_LEN", T)
    monkeypatch.setattr(H, "EVAL_TOKENS", ROWS * T)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # `setup` sets the training process's own
    tokenizer = prepare.Tokenizer.from_directory(data_dir / "tokenizer")

    def scored(variant: str, seed: int | None = None, **kwargs) -> float:
        artifact = save_artifact(tmp_path / variant, variant, tokenizer.get_vocab_size(), **kwargs)
        return H.score(artifact, data_dir, seed=seed)["bpb"]

    scored.tokenizer = tokenizer  # type: ignore[attr-defined]
    return scored


def test_an_honest_model_scores_the_same_whatever_the_probe_draws(score):
    assert score("honest", seed=1) == score("honest")


def test_a_model_honest_only_where_the_probe_used_to_look_is_rejected(H, score):
    """The probe was the first batch's forward and the call after it: a model honest for its first two
    calls and looking ahead from the third passed it and scored far better on every other batch. The
    probed batch is now drawn from the system's randomness: a model that looks ahead on some batches
    is refused when the draw falls on one of them (here the second batch, seed 1), and passes when it
    does not (seed 0: the first batch; the README says so)."""
    honest = score("honest")
    assert score("causal_at_first", seed=0) < honest - 1  # the first batch probed: its look-ahead not seen
    with pytest.raises(H.Rejected, match=r"^not causal: changing the tokens after position \d+ moved the logits"):
        score("causal_at_first", seed=1)


def test_a_model_that_looks_ahead_everywhere_but_at_the_probes_cuts_is_rejected(H, score):
    """The cuts were fixed: a model honest only at those positions looked ahead at all the others."""
    for seed in (None, 1):
        with pytest.raises(H.Rejected, match=r"^not causal: changing the tokens after position \d+ moved the logits"):
            score("avoids_the_cuts", seed=seed)


def test_minus_inf_for_tokens_that_never_come_is_no_look_ahead(score):
    """-inf == -inf: the probe read the difference as NaN and refused the model as not causal."""
    tokenizer = score.tokenizer
    unused = sorted(tokenizer.enc.encode_single_token(name) for name in tokenizer.enc.special_tokens_set
                    if name != prepare.BOS_TOKEN)
    honest = score("honest")
    assert honest - 1e-3 < score("masks_unused_tokens", masked=unused) < honest  # their share of the mass goes


@pytest.mark.parametrize(("variant", "reason"), [
    ("nan_logits", "the model's logits hold NaN: it must return finite logits (or -inf) for every position"),
    ("all_minus_inf", "val_bpb is nan: the model's logits are not finite where they are scored"),
    ("raises", "train.py's model failed while the harness scored it: KeyError: 'no such key' (train.py line 22)"),
    ("wrong_vocab", "model(inputs) must return logits [B, T, 8192], got (128, 32, 8191)"),
])
def test_a_model_whose_output_cannot_be_scored_is_refused_saying_why(H, score, variant, reason):
    with pytest.raises(H.Rejected) as refused:
        score(variant)
    assert str(refused.value).startswith(reason), str(refused.value)


def test_a_build_model_that_builds_no_module_is_refused_saying_why(H, score):
    with pytest.raises(H.Rejected, match=r"^build_model\(config, device, dtype\) returned NoneType, not a torch.nn.Module"):
        score("honest", build="    return None")

