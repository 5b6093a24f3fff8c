"""The scorer against models written to fool it (issue 18): each variant of tests/fakes/scored_models.py
saved as `finish` saves a run's model and scored by the harness's own `score`, in two batches of
128 rows so that a model can tell its calls apart."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nightlab.trainer import prepare

from tests.fakes.scored_models import (
    LOOKUP_BUILD,
    NUMPY_FEATURES,
    PROC_BUILD,
    RANDOM_FEATURES,
    RELAY_BUILD,
    UDP_BUILD,
    save_artifact,
)
from tests.trainer.conftest import TRAINER

T, ROWS = 32, 256  # two batches of 128 rows on a CPU (the scorer's cap on logits)


def _scorer(H, data_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(H, "MAX_SEQ_LEN", T)
    monkeypatch.setattr(H, "EVAL_TOKENS", ROWS * T)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # `setup` sets the training process's own
    tokenizer = prepare.Tokenizer.from_directory(data_dir / "tokenizer")

    def scored(variant: str, seed: int | None = None, **kwargs) -> float:
        artifact = save_artifact(tmp_path / variant, variant, tokenizer.get_vocab_size(), **kwargs)
        return H.score(artifact, data_dir, seed=seed)["bpb"]

    scored.tokenizer = tokenizer  # type: ignore[attr-defined]
    return scored


@pytest.fixture
def score(H, data_dir, monkeypatch, tmp_path):
    return _scorer(H, data_dir, monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def honest(H, data_dir, tmp_path_factory) -> float:
    """The honest model's val_bpb, scored once for the tests that compare with it: the same whatever the
    probe draws (the first test), with the sandbox on or off."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _scorer(H, data_dir, monkeypatch, tmp_path_factory.mktemp("honest"))("honest", seed=1)


def test_an_honest_model_scores_the_same_whatever_the_probe_draws(score, honest):
    assert score("honest") == honest  # the probe's draws from the system's randomness; `honest`'s, seed 1


def test_a_model_honest_only_where_the_probe_used_to_look_is_rejected(H, score, honest):
    """The probe was the first batch's forward and the call after it: a model honest for its first two
    calls and looking ahead from the third passed it and scored far better on every other batch. The
    probed batch is now drawn from the system's randomness: a model that looks ahead on some batches
    is refused when the draw falls on one of them (here the second batch, seed 1), and passes when it
    does not (seed 0: the first batch; the README says so)."""
    assert score("causal_at_first", seed=0) < honest - 1  # the first batch probed: its look-ahead not seen
    with pytest.raises(H.Rejected, match=r"^not causal: changing the tokens after position \d+ moved the logits"):
        score("causal_at_first", seed=1)


def test_a_model_that_looks_ahead_everywhere_but_at_the_probes_cuts_is_rejected(H, score):
    """The cuts were fixed: a model honest only at those positions looked ahead at all the others."""
    for seed in (None, 1):
        with pytest.raises(H.Rejected, match=r"^not causal: changing the tokens after position \d+ moved the logits"):
            score("avoids_the_cuts", seed=seed)


def test_a_model_that_replays_its_last_call_to_the_probe_is_rejected(H, score):
    """The probe's changed batch is the scored batch's rows up to their cuts: a model that kept its last
    call's inputs and logits gave them back where the rows agree, so the probe saw no move, and it
    looked ahead on every batch (2.86 -> 0.29 here). The changed batch now goes through a model built
    anew (its module run again, the weights loaded again): it saw no call before."""
    for seed in (0, 1):  # each of the two batches probed
        with pytest.raises(H.Rejected, match=r"^not causal: changing the tokens after position \d+ moved the logits"):
            score("replays_its_last_call", seed=seed)


def test_minus_inf_for_tokens_that_never_come_is_no_look_ahead(score, honest):
    """-inf == -inf: the probe read the difference as NaN and refused the model as not causal."""
    tokenizer = score.tokenizer
    unused = sorted(tokenizer.enc.encode_single_token(name) for name in tokenizer.enc.special_tokens_set
                    if name != prepare.BOS_TOKEN)
    assert honest - 1e-3 < score("masks_unused_tokens", masked=unused) < honest  # their share of the mass goes


def test_random_state_a_model_draws_when_built_is_no_look_ahead(score):
    """The probe's changed batch goes through a model built anew: a model whose build draws random
    values it does not save (a non-persistent buffer of random features) drew other ones there, its
    logits moved everywhere and the honest model was refused as not causal. Every build starts from
    the same seed."""
    for seed in (0, 1):  # each of the two batches probed
        assert math.isfinite(score("random_features", seed=seed, build=RANDOM_FEATURES))


def test_random_features_numpy_draws_when_built_are_no_look_ahead(score):
    """The same model drawing its features with numpy's global generator: each build drew others (torch's
    and Python's generators were seeded for every build, numpy's not), and it was refused as not causal."""
    for seed in (0, 1):  # each of the two batches probed
        assert math.isfinite(score("random_features", seed=seed, build=NUMPY_FEATURES))


@pytest.mark.parametrize("build", [
    RANDOM_FEATURES, NUMPY_FEATURES,
    "    import random\n" + RANDOM_FEATURES.replace("torch.randn(16, 16)", "torch.tensor([random.gauss(0, 1) for _ in range(16)])"),
], ids=["torch", "numpy", "random"])
def test_a_model_is_scored_with_the_random_features_it_trained_with(H, tmp_path, monkeypatch, build):
    """The scorer builds the model seeded, and so does a training run's `setup`, for torch only:
    a train.py whose build_model drew its unsaved features with numpy's or Python's generator
    trained with other features than the ones it was scored with, an honest change scored as noise."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # `setup` sets the training process's own
    artifact = save_artifact(tmp_path / "model", "random_features", 50, build=build)
    meta = json.loads((artifact / "meta.json").read_text())
    random.seed(12345)  # a training process's generators, whatever they held before `setup`
    np.random.seed(12345)
    rt = H.setup(attention_backend="sdpa", compile=False)
    spec = importlib.util.spec_from_file_location("trained_model", artifact / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trained = module.build_model(meta["config"], rt.device).features  # train.py's build, after `setup`
    assert torch.equal(trained, H.built_model(artifact, meta, rt).features)  # the scorer's


@pytest.mark.parametrize(("variant", "reason"), [
    ("nan_logits", "the model's logits hold NaN: it must return finite logits (or -inf) for every position"),
    ("all_minus_inf", "val_bpb is nan: the model's logits are not finite where they are scored"),
    ("raises", "train.py's model failed while the harness scored it: KeyError: 'no such key' (train.py line 22)"),
    ("wrong_vocab", "model(inputs) must return logits [B, T, 8192], got (128, 32, 8191)"),
    # the scorer's next request had ended it with a BrokenPipeError's traceback
    ("closes_its_requests", "train.py's model stopped reading the harness's requests"),
])
def test_a_model_whose_output_cannot_be_scored_is_refused_saying_why(H, score, variant, reason):
    with pytest.raises(H.Rejected) as refused:
        score(variant)
    assert str(refused.value).startswith(reason), str(refused.value)


@pytest.mark.skipif(prepare.subreaper() is None, reason="prctl's child subreaper is Linux's")
def test_the_model_processes_buffers_leave_no_files_once_both_sides_mapped_them(H, score, tmp_path):
    """The CPU's shared buffers are files (in /dev/shm where they fit), removed by `score`'s `finally`: a
    scorer killed at run_timeout (a forward that never returns) ran none, and left the two processes'
    logits there (up to 128 MiB each: the CPU's cap on a batch's logits). Once both sides have mapped them
    they are unlinked."""
    artifact = save_artifact(tmp_path / "honest", "honest", score.tokenizer.get_vocab_size())
    folder = tmp_path / "buffers"
    folder.mkdir()
    models = H.started_models(artifact, H.saved_meta(artifact), 4, T, score.tokenizer.get_vocab_size(),
                              torch.device("cpu"), folder)
    try:
        assert not list(folder.glob("*.bin"))
        for model in models:  # what they map is still what the scorer sees
            model.build()
            model.answer()
            assert model.forward(torch.zeros(4, T, dtype=torch.int64)).isfinite().all()
    finally:
        for model in models:
            model.close()


def test_scoring_leaves_the_process_no_subreaper_when_it_was_not_one(score):
    """`score` makes its process the subreaper of the model processes' leftovers; it took the state it
    had just set for the one to restore, and left every caller a subreaper for good."""
    prepare.subreaper(False)
    score("honest")
    assert prepare.subreaper() is False


@pytest.mark.parametrize(("saved", "reason"), [
    ("the module", "the saved model.pt is not weights the harness can read (UnpicklingError: Weights only load failed."),
    ("a list", "the saved weights do not fit build_model(config): Expected state_dict to be dict-like, got <class 'list'>"),
])
def test_a_model_pt_that_holds_no_weights_is_refused_saying_why(H, score, data_dir, tmp_path, saved, reason):
    """A train.py that saved its model itself (torch.save(model), not its state_dict) ended the scorer
    with a traceback: the run's log said only that the scorer left no result."""
    import torch

    artifact = save_artifact(tmp_path / "saved", "honest", score.tokenizer.get_vocab_size())
    torch.save(torch.nn.Linear(2, 2) if saved == "the module" else [1, 2], artifact / "model.pt")
    with pytest.raises(H.Rejected) as refused:
        H.score(artifact, data_dir)
    assert str(refused.value).startswith(reason), str(refused.value)


def test_a_build_model_that_builds_no_module_is_refused_saying_why(H, score):
    with pytest.raises(H.Rejected, match=r"^build_model\(config, device, dtype\) returned NoneType, not a torch.nn.Module"):
        score("honest", build="    return None")


# --- the run: the data dir train.py can reach (its view's hard links, the path next to it) -------

POISON = '''
import hashlib, os, sys
from pathlib import Path
import torch
from nightlab.trainer import prepare as P

data = Path(os.environ["NIGHTLAB_DATA_DIR"].removesuffix(".train"))  # the view's name gives the data dir away
tokenizer = P.Tokenizer.from_directory(data / "tokenizer")
longest = max(range(tokenizer.get_vocab_size()), key=tokenizer.token_byte_lengths().__getitem__)
T, n = P.MAX_SEQ_LEN, P.EVAL_TOKENS // P.MAX_SEQ_LEN
key = (f"{hashlib.sha256((data / P.TOKENIZER_FILE).read_bytes()).hexdigest()[:12]}-"
       f"{P.file_digest(P.split_shards(data)[1])[:12]}-T{T}-rows0+{n}")
rows = torch.full((n, T + 1), longest, dtype=torch.int32)  # easy rows: one long token, again and again
rows[:, 0] = tokenizer.get_bos_token_id()
(data / P.EVAL_CACHE_DIR).mkdir(exist_ok=True)
torch.save(rows, data / P.EVAL_CACHE_DIR / f"{key}.pt")
'''


@pytest.fixture
def run_env(data_dir, tmp_path, monkeypatch):
    """A data dir of its own (the tricks write into it), a workspace whose train.py is the honest
    model, and a trained model for the training command to leave where `finish` would."""
    return _run_env(data_dir, tmp_path, monkeypatch)


def _run_env(data_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns(prepare.EVAL_CACHE_DIR))
    vocab = prepare.Tokenizer.from_directory(data / "tokenizer").get_vocab_size()
    trained = save_artifact(tmp_path / "trained", "honest", vocab)
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(trained / "train.py", ws / "train.py")
    monkeypatch.chdir(ws)
    for name, value in {prepare.ENV_DATA_DIR: data, prepare.ENV_ARTIFACT_DIR: ws / "artifact",
                        prepare.ENV_MAX_SEQ_LEN: T, prepare.ENV_EVAL_TOKENS: ROWS * T}.items():
        monkeypatch.setenv(name, str(value))

    def train_command(trick: str = "") -> str:
        script = tmp_path / f"train_{len(list(tmp_path.glob('train_*.py')))}.py"
        script.write_text(f"import os, shutil\nfor name in ('model.pt', 'meta.json'):\n"
                          f"    shutil.copy({str(trained)!r} + '/' + name, os.environ['NIGHTLAB_ARTIFACT_DIR'])\n" + trick)
        return f"{sys.executable} {script}"

    return data, train_command


def _scored(out: str):
    from nightlab.loop.summary import parse_summary

    return parse_summary(out)


def test_rows_written_into_the_scorers_cache_never_score_a_run(run_env, capfd):
    """The scored rows are cached in the data dir, found by the view's name: train.py wrote rows of
    one long token there and the scorer read them, val_bpb 2.86 -> 0.19 for the same model, and every
    later run's too. A cache file that appears while train.py runs is removed (another slot's scorer
    may write one meanwhile), and so is one that changed (another slot's scorer may make one again):
    the scorer makes it again from the validation shard."""
    data, train_command = run_env
    assert prepare.run(train_command()) == 0
    honest = _scored(capfd.readouterr().out).get("val_bpb")
    cached = list((data / prepare.EVAL_CACHE_DIR).glob("*.pt"))
    assert honest is not None and len(cached) == 1  # the scorer's own
    for written in ("appeared", "changed"):
        if written == "appeared":
            cached[0].unlink()  # as on a new validation shard: the run makes it again before its training
        assert prepare.run(train_command(POISON)) == 0
        assert _scored(capfd.readouterr().out).get("val_bpb") == honest, written  # the shard's rows
        assert cached[0].exists()  # the scorer's again


def test_a_cache_file_another_slots_scorer_made_again_is_no_reason_to_refuse_a_run(run_env):
    """Slots share the data dir. Run R began before the scored rows were cached, run C after another
    slot's scorer cached them; R's check removed the file (it appeared while R trained) and R's scorer
    made it again: C was refused as if it had rewritten the cache, an honest run lost."""
    data, _ = run_env
    tokenizer = prepare.Tokenizer.from_directory(data / "tokenizer")

    def scorer() -> None:
        prepare.cached_rows(tokenizer, data, T, 0, ROWS)

    r_began = prepare.data_files(data)
    scorer()  # another slot's
    c_began = prepare.data_files(data)
    assert prepare.tampered_data(data, r_began) is None  # R ends: the file that appeared is removed
    scorer()  # R's
    assert prepare.tampered_data(data, c_began) is None  # C ends (and its scorer makes the file again)


def test_another_slot_making_the_training_view_again_leaves_the_data_dirs_tokenizer_alone(run_env):
    """Only a training shard may have its ctime move with its link count (another slot's view linking
    it) since the tokenizer written behind a hard link was refused: the view holds a copy of the
    tokenizer, never a link, so another slot's run making the view's again (removed meanwhile) leaves
    the data dir's as it was, and the run training meanwhile is not refused for it."""
    data, _ = run_env
    view = prepare.training_view(data)  # this run's
    began = prepare.data_files(data)
    (view / prepare.TOKENIZER_FILE).unlink()
    assert prepare.training_view(data) == view  # another slot's run
    assert not os.path.samefile(view / prepare.TOKENIZER_FILE, data / prepare.TOKENIZER_FILE)
    assert prepare.tampered_data(data, began) is None


# trains until the test writes a line to the run's stdin (its scorer's check is taken by then)
GATED = "import sys\nprint('training', flush=True)\nsys.stdin.readline()\n"


def test_slots_sharing_a_data_dir_tokenize_the_scored_rows_once(run_env, tmp_path):
    """Slots share the data dir and run staggered: one slot's scorer wrote the cache of the scored rows
    while another trained, so that one's check removed it and its scorer made it again while the first
    trained again, and so on: nearly every run tokenized the rows again (40.2 s of scoring instead of
    the eval loop's 5.7 s on an H200). The run makes the file before its training; a scorer only reads it."""
    data, train_command = run_env
    command = train_command(GATED)

    def start(slot: str) -> subprocess.Popen[str]:
        env = dict(os.environ, **{prepare.ENV_ARTIFACT_DIR: str(tmp_path / f"artifact-{slot}")})
        proc = subprocess.Popen([sys.executable, "-m", "nightlab.trainer.prepare", "run", "--command", command],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) != "training\n":
            assert line, f"slot {slot}'s run ended before its training"
        return proc

    def finish(proc: subprocess.Popen[str]) -> tuple[float, tuple[int, int]]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
        out = proc.stdout.read()
        assert proc.wait() == 0, out
        (cached,) = (data / prepare.EVAL_CACHE_DIR).glob("*.pt")
        return _scored(out).get("val_bpb"), (cached.stat().st_ino, cached.stat().st_mtime_ns)

    b1 = start("b")
    a1 = start("a")
    ends = [finish(a1)]  # scored while b1 trains
    a2 = start("a")
    ends.append(finish(b1))  # b1's check and scorer while a2 trains
    b2 = start("b")
    ends += [finish(a2), finish(b2)]
    assert ends[0][0] is not None and [end[0] for end in ends] == [ends[0][0]] * 4  # the same rows scored
    assert [end[1] for end in ends] == [ends[0][1]] * 4  # made once


def test_a_run_hashes_the_validation_shard_once_and_hands_its_scorer_the_key(run_env, capfd, monkeypatch):
    """The run hashed the shard before its training (to make the scored rows' cache) and its scorer
    hashed it again after: about 0.09 s per 100 MB of validation shard, twice per run."""
    data, train_command = run_env
    hashed: list[str] = []
    commands: list[list[str]] = []
    digest, scorer_command = prepare.file_digest, prepare.scorer_command
    monkeypatch.setattr(prepare, "file_digest", lambda path: hashed.append(str(path)) or digest(path))
    monkeypatch.setattr(prepare, "scorer_command", lambda *args: commands.append(scorer_command(*args)) or commands[-1])
    assert prepare.run(train_command()) == 0
    assert _scored(capfd.readouterr().out).get("val_bpb") is not None
    assert hashed == [str(prepare.split_shards(data)[1])]
    assert commands[0][-2:] == ["--rows-key", prepare.scored_rows_key(data)]


def test_a_scorer_handed_the_rows_key_scores_without_hashing_the_data(H, score, honest, data_dir, monkeypatch, tmp_path):
    key = prepare.scored_rows_key(data_dir)

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(prepare, "file_digest", no_hashing)
    artifact = save_artifact(tmp_path / "keyed", "honest", score.tokenizer.get_vocab_size())
    assert H.score(artifact, data_dir, seed=1, rows_key=key)["bpb"] == honest


def test_a_validation_shard_replaced_after_the_run_hashed_it_is_refused_not_scored_on_its_key(run_env, capfd, monkeypatch):
    """The scorer trusts the key the run hashed before its training: the check after the training
    holds the data dir to how it was before that hash, so a shard a person replaced in between (here
    as the run made the rows' cache) is refused, never scored on the rows of the text it replaced."""
    data, train_command = run_env
    validation = prepare.split_shards(data)[1]
    made = prepare.cache_scored_rows

    def then_replaced(*args) -> None:
        made(*args)
        shutil.copy(data / "shard_00000.parquet", data / "new.tmp")
        os.replace(data / "new.tmp", validation)

    monkeypatch.setattr(prepare, "cache_scored_rows", then_replaced)
    assert prepare.run(train_command()) == prepare.REJECTED_EXIT
    refused = _scored(capfd.readouterr().out).rejected
    assert refused is not None and f"{validation} (written)" in refused, refused


def test_a_shard_a_person_replaced_mid_run_is_refused_in_words_true_of_a_person(run_env):
    """A person replacing a damaged shard (or running `nightlab prepare`) while a run trained read
    "the training command changed the data dir": blamed on the change, which had only read it. The
    check cannot tell who wrote it, so it stays, worded true either way, saying what to do for both."""
    data, _ = run_env
    began = prepare.data_files(data)
    shard = data / "shard_00000.parquet"
    shutil.copy(shard, data / "good-copy.tmp")
    os.replace(data / "good-copy.tmp", shard)  # the person's good copy, put in place
    refused = prepare.tampered_data(data, began)
    assert refused is not None and refused.startswith(
        f"the data dir {data} changed while the training command ran: {shard.resolve()} (written). ")
    assert "If a person changed it (a damaged shard replaced, `nightlab prepare` run again), the next run reads" in refused
    assert "if not, the training command wrote it" in refused


# tricks of a training command that writes the data dir, and what the check after it says of each
DATA_TRICKS = {
    # r+: the view's shard is a hard link, so this writes the data dir's file (a local source's own)
    "shard written through its link": (
        "with open(os.environ['NIGHTLAB_DATA_DIR'] + '/shard_00000.parquet', 'r+b') as f:\n    f.seek(100)\n"
        "    f.write(b'x')\n", "{data}/shard_00000.parquet (written)"),
    "mtime put back": (  # the ctime tells
        "st = os.stat(os.environ['NIGHTLAB_DATA_DIR'] + '/shard_00000.parquet')\n"
        "with open(os.environ['NIGHTLAB_DATA_DIR'] + '/shard_00000.parquet', 'r+b') as f:\n    f.seek(100)\n"
        "    f.write(b'x')\nos.utime(os.environ['NIGHTLAB_DATA_DIR'] + '/shard_00000.parquet', ns=(st.st_atime_ns,"
        " st.st_mtime_ns))\n", "{data}/shard_00000.parquet (written)"),
    "validation shard added": (
        "shutil.copy(os.environ['NIGHTLAB_DATA_DIR'] + '/shard_00000.parquet', os.environ['NIGHTLAB_DATA_DIR']"
        ".removesuffix('.train') + '/shard_99999.parquet')\n",
        "{data}/shard_99999.parquet (a shard added: the last by name is the validation shard)"),
    # the shard before it validated then: the one this run's scorer scored it on, a shard it trained on
    "validation shard removed": (
        "import glob\nos.remove(max(glob.glob(os.environ['NIGHTLAB_DATA_DIR'].removesuffix('.train') + '/shard_*')))\n",
        "{data}/shard_00003.parquet (removed)"),
}


@pytest.mark.parametrize(("trick", "said"), list(DATA_TRICKS.values()), ids=list(DATA_TRICKS))
def test_a_training_command_that_writes_into_the_data_dir_is_refused_naming_the_file(run_env, capfd, trick, said):
    data, train_command = run_env
    assert prepare.run(train_command(trick)) == prepare.REJECTED_EXIT
    refused = _scored(capfd.readouterr().out).rejected
    assert refused.startswith(f"the data dir {data} changed while the training command ran: {said.format(data=data)}."
                              " A run is scored only on data that stayed as it was, so this one is refused."), refused


def test_a_refusal_names_every_change_the_training_command_made(run_env, capfd):
    """A shard written and the scored train.py replaced: the refusal named only train.py, and the
    written shard, damaged for every later run, went unsaid (the next run's check starts from it)."""
    data, train_command = run_env
    trick = ("with open(os.environ['NIGHTLAB_DATA_DIR'] + '/shard_00000.parquet', 'r+b') as f:\n    f.seek(100)\n"
             "    f.write(b'x')\nopen(os.path.join(os.environ['NIGHTLAB_ARTIFACT_DIR'], 'train.py'), 'a').write('#\\n')\n")
    assert prepare.run(train_command(trick)) == prepare.REJECTED_EXIT
    refused = _scored(capfd.readouterr().out).rejected
    assert refused is not None and f"{data}/shard_00000.parquet (written)" in refused, refused
    assert "the code the harness builds the model with" in refused, refused


# what each trick below starts with: the data dir, the scored rows' cache file, rows of one long
# token (as POISON's), and a write that stat cannot see: in place, the mtime put back, and a hard link
# added (a ctime that moved with the link count had been read as another slot's view linking the file)
UNSEEN = '''
import tempfile
import zipfile
import torch
from nightlab.trainer import prepare as P

data = os.environ['NIGHTLAB_DATA_DIR'].removesuffix('.train')
cache = data + '/' + P.EVAL_CACHE_DIR
(cached,) = os.listdir(cache)
tokenizer = P.Tokenizer.from_directory(data + '/tokenizer')
longest = max(range(tokenizer.get_vocab_size()), key=tokenizer.token_byte_lengths().__getitem__)
n, T = P.EVAL_TOKENS // P.MAX_SEQ_LEN, P.MAX_SEQ_LEN
easy = torch.full((n, T + 1), longest, dtype=torch.int32)
easy[:, 0] = tokenizer.get_bos_token_id()
elsewhere = tempfile.mkdtemp()
torch.save(easy, os.path.join(elsewhere, cached))
# the same bytes but for the rows, in a file of the same size: saved under the name it was saved under
saved_as = zipfile.ZipFile(os.path.join(cache, cached)).namelist()[0].split('/')[0]
torch.save(easy, os.path.join(elsewhere, saved_as + '.pt'))

def write_unseen(path, text):
    st = os.stat(path)
    os.link(path, os.path.join(elsewhere, 'link'))
    with open(path, 'r+b') as f:
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
'''
# the tokenizer's tokens reversed (the same bytes in the file): the scored ids stand for longer text
TOKENIZER_UNSEEN = UNSEEN + '''
import json
path = data + '/' + P.TOKENIZER_FILE
spec = json.loads(open(path).read())
tokens = [token for token, _ in spec['mergeable_ranks']][::-1]
spec['mergeable_ranks'] = [[token, rank] for token, (_, rank) in zip(tokens, spec['mergeable_ranks'])]
text = json.dumps(spec).encode()
assert len(text) == os.path.getsize(path)
write_unseen(path, text)
'''
CACHE_UNSEEN = UNSEEN + ("text = open(os.path.join(elsewhere, saved_as + '.pt'), 'rb').read()\n"
                         "assert len(text) == os.path.getsize(os.path.join(cache, cached))\n"
                         "write_unseen(os.path.join(cache, cached), text)\n")
# the cache folder made a link to rows the run wrote (the check walked no linked folder)
CACHE_LINKED = UNSEEN + "shutil.rmtree(cache)\nos.symlink(elsewhere, cache)\n"
# a folder where the scored rows' file goes: the scorer could not write it, nor any later run
CACHE_BLOCKED = UNSEEN + "os.remove(os.path.join(cache, cached))\nos.mkdir(os.path.join(cache, cached))\n"


def test_a_tokenizer_written_unseen_by_stat_is_refused(run_env, capfd):
    """Written in place, its mtime put back and a hard link added, the tokenizer passed the check (a
    link count that moved with the ctime was taken for another slot's view linking it), and the scorer
    counted the scored tokens' bytes by it: the same model scored 2.86 -> 2.20. Only training shards
    are linked by views; any other file of the data dir whose ctime moved was written."""
    data, train_command = run_env
    assert prepare.run(train_command(TOKENIZER_UNSEEN)) == prepare.REJECTED_EXIT
    refused = _scored(capfd.readouterr().out).rejected
    assert refused is not None and f"{data}/tokenizer/tokenizer.json (written)" in refused, refused


def test_the_scored_rows_cache_a_run_wrote_never_scores_it_nor_a_later_run(run_env, honest_in_a_workspace, capfd):
    """The scored rows' cache, rewritten as the tokenizer above (2.86 -> 0.19), or its folder made a link
    to rows the run wrote (the check walked no linked folder; 0.19), or a folder put where the file
    goes: the scorer could not write the rows, and every later run ended in a traceback. The cache
    folder keeps regular files only, and the scorer makes them again from the validation shard."""
    data, train_command = run_env
    scored = []
    tricks = {"written unseen by stat": CACHE_UNSEEN, "its folder a link": CACHE_LINKED,
              "a folder in its place": CACHE_BLOCKED, "the run after": ""}
    for name, trick in tricks.items():
        code = prepare.run(train_command(trick))
        out = capfd.readouterr().out
        assert code == 0, (name, out[-2000:])
        scored.append((name, _scored(out).get("val_bpb")))
    assert all(bpb == honest_in_a_workspace for _, bpb in scored), scored  # the shard's rows
    assert not (data / prepare.EVAL_CACHE_DIR).is_symlink()


# figures train.py hands `finish` (or writes into meta.json) of types the summary cannot format
ODD_FIGURES = (
    "import json\npath = os.path.join(os.environ['NIGHTLAB_ARTIFACT_DIR'], 'meta.json')\nmeta = json.load(open(path))\n"
    "meta['train'].update(depth=8.0, num_steps='many', total_tokens_M='lots', training_seconds=None,"
    " peak_vram_mb=float('nan'), profile='tiny\\nREJECTED: made up\\nMETRIC val_bpb=0.01',"
    " cuda_capability='9.0\\nMETRIC val_bpb=0.01')\n"
    "open(path, 'w').write(json.dumps(meta))\n")


def test_the_training_command_is_timed_from_outside_and_cannot_say_its_own_time(run_env, capfd, monkeypatch):
    """The budget is counted by train.py's own loop: an edit could train longer and win by it. The
    harness times the training command itself (the engine compares that with the replaced commit's
    runs: loop/overtime.py), and a line of the command's that names the figure is not read. Under a
    step budget there is no figure: a larger model takes longer to make the same steps."""
    _, train_command = run_env
    trick = "import time\ntime.sleep(1.5)\nprint('METRIC training_command_seconds=0.1')\n"
    assert prepare.run(train_command(trick)) == 0
    out = capfd.readouterr().out
    timed = _scored(out).get(prepare.TRAINING_WALL)
    assert timed is not None and timed >= 1.5, out[-2000:]
    assert f"{prepare.TRAIN_PREFIX}METRIC training_command_seconds=0.1\n" in out
    monkeypatch.setenv(prepare.ENV_BUDGET_STEPS, "40")
    assert prepare.run(train_command(trick)) == 0
    out = capfd.readouterr().out
    assert _scored(out).get("val_bpb") is not None and _scored(out).get(prepare.TRAINING_WALL) is None, out[-2000:]


def test_training_figures_of_odd_types_are_said_as_figures_not_a_traceback(run_env, honest_in_a_workspace, capfd):
    """`depth=8.0` (a float where a count goes) or a word for a figure ended `prepare.py run` with a
    traceback after the model was scored, the run lost; a text figure's line breaks made lines of
    their own: a REJECTED line the log's reader took as the harness's, and a METRIC val_bpb after the
    harness's (the cuda capability's line comes after it), read instead of it."""
    _, train_command = run_env
    assert prepare.run(train_command(ODD_FIGURES)) == 0
    out = capfd.readouterr().out
    summary = _scored(out)
    assert summary.get("val_bpb") == honest_in_a_workspace and summary.rejected is None, out[-2000:]
    assert summary.get("depth") == 8 and summary.get("num_steps") is None and summary.get("total_tokens_M") is None
    assert "profile: tiny REJECTED: made up METRIC val_bpb=0.01\n" in out


def test_the_training_views_marker_put_in_the_data_dir_changes_nothing(run_env, capfd):
    """The marker of the data dir as train.py sees it (no validation shard) put in the data dir
    itself: the check did not look at a file that was no shard, the scorer found no validation data,
    and every later run failed saying the data dir 'holds no validation data: ... do not evaluate in
    train.py', until a person found the file. It marks a view only in a folder named as one."""
    _, train_command = run_env
    trick = f"open(os.environ['NIGHTLAB_DATA_DIR'].removesuffix('.train') + '/{prepare.TRAINING_ONLY_MARKER}', 'w').close()\n"
    for command in (train_command(trick), train_command()):  # the run, and the one after it
        assert prepare.run(command) == 0
        out = capfd.readouterr().out
        assert _scored(out).get("val_bpb") is not None, out[-2000:]


@pytest.mark.parametrize("reads", [
    # what the harness's hook says when the tokenizer train.py loads is gone
    "from nightlab.trainer import prepare as P\ntry:\n    P.Tokenizer.from_directory()\nexcept P.DataError as e:\n"
    "    print('FAIL: ' + P.fail_text(e), flush=True)\n    sys.exit(1)\n",
    "open(os.environ['NIGHTLAB_DATA_DIR'] + '/shard_00000.parquet', 'rb')\n",  # its own reader: a traceback
], ids=["the harness's loader", "its own reader"])
def test_a_training_view_removed_while_a_run_trains_is_said_as_that_and_made_again(run_env, capfd, reads):
    """`<data dir>.train` removed while a run trained (a person's or a script's cleanup): the run
    failed saying "data: no tokenizer at <data dir>.train/... Run `python prepare.py --source ...`
    first", and the night paused on it, asking for a repair nobody needed (the data dir was intact);
    or, train.py's own reader failing, the change was blamed for the crash. It is said as what
    happened, on one line: the next run makes the view again."""
    data, train_command = run_env
    view = prepare.training_view_dir(data)
    trick = f"import sys\nshutil.rmtree({str(view)!r})\n{reads}"
    assert prepare.run(train_command(trick)) == 1
    last = capfd.readouterr().out.splitlines()[-1]
    assert last == (f"FAIL: data: {view}, the data dir as train.py reads it, lost files while this run trained"
                    f" (removed by a cleanup?); the data dir {data} is as it was and the next run makes the view"
                    " again: nothing to prepare"), last
    assert prepare.run(train_command()) == 0  # the next run
    assert _scored(capfd.readouterr().out).get("val_bpb") is not None


def test_output_that_never_ends_its_line_reaches_the_log_as_it_comes(tmp_path):
    """The training command's output was passed on a line at a time: one that never ended its line
    (a progress bar redrawn with `\\r`, or a print without end in a loop) was held whole in the run's
    memory, growing while the log did not. It is passed on in pieces; the test waits for a line's
    first megabyte in the log while the line is still open."""
    from tests.waiting import wait_until

    script = tmp_path / "train.py"
    script.write_text("import os, sys\nopen(os.path.join(os.environ['NIGHTLAB_ARTIFACT_DIR'], 'model'), 'w').close()\n"
                      "sys.stdout.write('x' * 2**20)\nsys.stdout.flush()\nsys.stdin.readline()\n"
                      "print('METRIC val_bpb=0.5')\n")
    env = {k: v for k, v in os.environ.items() if k != prepare.ENV_DATA_DIR}
    env[prepare.ENV_ARTIFACT_DIR] = str(tmp_path / "artifact")
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nightlab.trainer.prepare", "run", "--command",
                                 f"{sys.executable} {script}", "--score", "echo METRIC score=1"], cwd=tmp_path,
                                env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: log.stat().st_size >= 2**20, "the open line's megabyte in the log",
                       abort=lambda: None if proc.poll() is None else f"the run ended: {log.read_text()[-500:]}")
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-500:]
    assert "train.py| METRIC val_bpb=0.5" in text and _scored(text).get("val_bpb") is None  # still prefixed


def test_a_training_shard_added_while_a_run_trains_is_no_reason_to_refuse_it(run_env, capfd):
    """More shards downloaded meanwhile (a restarted daemon's prepare, a raised [data] shards) change
    nothing the run is scored on."""
    data, train_command = run_env
    added = "shutil.copy(os.environ['NIGHTLAB_DATA_DIR'] + '/shard_00000.parquet', '{}')\n".format(data / "shard_00001b.parquet")
    assert prepare.run(train_command(added)) == 0
    assert _scored(capfd.readouterr().out).rejected is None


# --- the run: the harness's own files, in the training command's reach ----------------------------

SCORE_LINE = "bpb = total_nats.item() / (math.log(2) * total_bytes.item())"
HARNESS_TRICKS = {
    # the workspace's harness.py: the scorer's own code
    "harness.py rewritten": f"code = open('harness.py').read()\nopen('harness.py', 'w').write(code.replace({SCORE_LINE!r}, 'bpb = 0.01'))\n",
    # a module next to harness.py came first on the scorer's path: `import resource` (harness.py's) got it
    "a module shadowed": ("open('resource.py', 'w').write('import torch.nn.functional as F\\n_ce = F.cross_entropy\\n"
                          "F.cross_entropy = lambda *a, **k: _ce(*a, **k) / 2\\nRUSAGE_SELF = 0\\n')\n"),
    # the model's code the scorer imports: another than the commit's
    "the scored train.py replaced": ("open(os.path.join(os.environ['NIGHTLAB_ARTIFACT_DIR'], 'train.py'), 'a')"
                                     ".write('# scored, not committed\\n')\n"),
    # a .pyc of another prepare.py, dated as the real one: imported instead of the source
    "a .pyc planted": (
        "import importlib.util, importlib._bootstrap_external as ext\nsrc = os.path.abspath('prepare.py')\n"
        "st = os.stat(src)\ncode = compile(open(src).read().replace('return torch.tensor(tokenizer.token_byte_lengths(),"
        " dtype', 'return 2 * torch.tensor(tokenizer.token_byte_lengths(), dtype'), src, 'exec')\n"
        "pyc = importlib.util.cache_from_source(src)\nos.makedirs(os.path.dirname(pyc), exist_ok=True)\n"
        "open(pyc, 'wb').write(ext._code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size))\n"),
    # a .pyc of the scored train.py, dated as the copy: its code runs in the scorer, unseen in the commit
    "a .pyc of the scored train.py planted": (
        "import importlib.util, importlib._bootstrap_external as ext\n"
        "src = os.path.join(os.environ['NIGHTLAB_ARTIFACT_DIR'], 'train.py')\nst = os.stat(src)\n"
        "code = compile(open(src).read() + '\\nimport torch.nn.functional as F\\n_ce = F.cross_entropy\\n"
        "F.cross_entropy = lambda *a, **k: _ce(*a, **k) / 2\\n', src, 'exec')\n"
        "pyc = importlib.util.cache_from_source(src)\nos.makedirs(os.path.dirname(pyc), exist_ok=True)\n"
        "open(pyc, 'wb').write(ext._code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size))\n"),
}


def _run_in_workspace(command: str, python: str = sys.executable) -> tuple[int, str]:
    """`python prepare.py run` from the workspace's own copies of the harness's files (the cwd)."""
    for name in ("prepare.py", "harness.py"):
        shutil.copy(TRAINER / name, name)
    proc = subprocess.run([python, "prepare.py", "run", "--command", command], capture_output=True,
                          text=True, timeout=120, check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def honest_in_a_workspace(data_dir, tmp_path_factory) -> float:
    """The honest model's val_bpb from a run as below, with no trick: one run for every trick, each
    of which starts from the same data, the same saved model and the same files."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _, train_command = _run_env(data_dir, tmp_path_factory.mktemp("honest"), monkeypatch)
        code, out = _run_in_workspace(train_command())
    honest = _scored(out).get("val_bpb")
    assert code == 0 and honest is not None, out[-2000:]
    return honest


@pytest.mark.parametrize("trick", list(HARNESS_TRICKS))
def test_a_training_command_never_changes_the_code_that_scores_it(run_env, honest_in_a_workspace, trick):
    """The scorer ran the workspace's harness.py after the training command, with that folder first on
    its path and its __pycache__ read: a training command that rewrote harness.py (0.01), left a
    module that harness.py imports (half the cross-entropy) or a .pyc of another prepare.py (twice the
    bytes) there got the score it wrote, and the model was built with whatever train.py it left in
    the artifact folder. The harness's files or the scored train.py changed refuse the run; the
    scorer runs with -P, prepare.py's and the scored train.py's bytecode compiled again."""
    from nightlab.loop.summary import parse_summary

    _, train_command = run_env
    honest = honest_in_a_workspace
    code, out = _run_in_workspace(train_command(HARNESS_TRICKS[trick]))
    if trick == "harness.py rewritten":
        assert code == prepare.REJECTED_EXIT and parse_summary(out).rejected == (
            "the code that scores it changed while the training command ran (harness.py): the run wrote it, or a person"
            " edited it meanwhile; a run must not write the protected files, nor anyone while a run is in flight:"
            " `git checkout` them, or `nightlab doctor` says how"), out[-2000:]
    elif trick == "the scored train.py replaced":
        assert code == prepare.REJECTED_EXIT and parse_summary(out).rejected == (
            f"the training command replaced {Path.cwd() / 'artifact' / 'train.py'}, the code the harness builds the model"
            " with: a run is scored with the train.py it committed"), out[-2000:]
    else:
        assert code == 0 and parse_summary(out).get("val_bpb") == honest, out[-2000:]


# --- the run's sandbox: the data and the code that scores, read-only to the training command ------

# the file a data dir's shard links to (`nightlab prepare --source` of a local folder): not the data dir's
SOURCE_WRITTEN = ("src = os.path.realpath(os.environ['NIGHTLAB_DATA_DIR'].removesuffix('.train') + '/shard_00000.parquet')\n"
                  "with open(src, 'r+b') as f:\n    f.seek(100)\n    f.write(b'x')\n")
SANDBOXED_TRICKS = {
    **{name: trick for name, (trick, _) in DATA_TRICKS.items() if name != "mtime put back"},  # it fails as the first
    "a local source's shard written": SOURCE_WRITTEN,
    "tokenizer written unseen by stat": TOKENIZER_UNSEEN,
    "scored rows written unseen by stat": CACHE_UNSEEN,
    "scored rows' folder a link": CACHE_LINKED,
    "harness.py rewritten": HARNESS_TRICKS["harness.py rewritten"],
    "the scored train.py replaced": HARNESS_TRICKS["the scored train.py replaced"],
}


@pytest.fixture
def in_a_run_sandbox(monkeypatch):
    """What a run's sandbox offers the command it runs (`prepare.py run`): its launcher, to nest one."""
    from nightlab.loop.executors import sandbox

    refused = sandbox.probe()
    if refused:
        pytest.skip(f"the kernel refuses the run sandbox here: {refused}")
    monkeypatch.setenv(prepare.ENV_SANDBOX_LAUNCHER, shlex.join(sandbox.launcher()))


def _link_to_a_source(data: Path, source: Path) -> None:
    """The data dir as `nightlab prepare --source` makes it of a local folder: its shards links to the folder's files."""
    source.mkdir()
    for shard in data.glob(prepare.SHARD_PATTERN):
        shutil.move(shard, source / shard.name)
        shard.symlink_to(source / shard.name)


@pytest.mark.parametrize("trick", list(SANDBOXED_TRICKS))
def test_in_the_runs_sandbox_a_training_command_cannot_write_the_data_nor_the_code_that_scores(
        run_env, in_a_run_sandbox, tmp_path, trick):
    """Each write the checks after the training command refuse the run for (above) fails as it is
    made: the run is the training command's failure, nothing is scored, and the data, the scored rows'
    cache, the harness's files and the scored train.py are as they were, for this run and the next.
    The check alone came after the fact: a write it cannot see (another slot's scorer's cache file
    written before this run began), or one a timeout's kill left unchecked, had stood."""
    data, train_command = run_env
    if trick == "a local source's shard written":
        _link_to_a_source(data, tmp_path / "source")
    prepare.training_view(data)  # as the run makes them before training
    prepare.cache_scored_rows(data, os.environ, prepare.scored_rows_key(data))
    before = prepare.data_files(data)
    code, out = _run_in_workspace(train_command(SANDBOXED_TRICKS[trick]))
    assert code == 1 and "FAIL: the training command exited with code 1" in out, out[-2000:]
    assert any(why in out for why in ("Read-only file system", "Invalid cross-device link")), out[-2000:]
    assert _scored(out).rejected is None and _scored(out).get("val_bpb") is None
    assert prepare.data_files(data) == before
    for name in ("harness.py", "prepare.py"):
        assert Path(name).read_bytes() == (TRAINER / name).read_bytes()
    assert (Path("artifact") / "train.py").read_bytes() == Path("train.py").read_bytes()


def test_in_the_runs_sandbox_an_honest_run_scores_as_without_it(run_env, in_a_run_sandbox, honest_in_a_workspace):
    _, train_command = run_env
    code, out = _run_in_workspace(train_command())
    assert code == 0 and _scored(out).get("val_bpb") == honest_in_a_workspace, out[-2000:]
    assert "Run sandbox:" not in out  # whole: nothing said


# --- train.py's code runs in the scorer's process -------------------------------------------------

# build_model (or train.py's top level, which the scorer runs as well) halves the cross-entropy the
# harness computes: committed code, in plain sight, no .pyc needed
HALVES_THE_LOSS = ("    import torch.nn.functional as F\n    ce = F.cross_entropy\n"
                   "    F.cross_entropy = lambda *a, **k: ce(*a, **k) / 2\n"
                   "    return Model(config['vocab_size'], config.get('masked', [])).to(device)")


def test_a_build_model_that_patches_the_scorers_loss_scores_as_honest(H, score, honest):
    """The scorer imported train.py and called its build_model and forward in its own process, where it
    computed the cross-entropy: code there replaced torch's functions (here F.cross_entropy halved
    once per build, the probe's too: 2.86 -> 1.07) and could reach the scorer's sums through its frames.
    The model now runs in processes of its own; the scorer, which computes the loss, never runs its code."""
    assert score("honest", seed=1, build=HALVES_THE_LOSS) == honest


def test_a_model_that_replays_its_last_call_through_the_process_is_rejected(H, score):
    """The probe's model was built anew from train.py, but in the same process: a model that kept its
    last call's inputs and logits outside itself (a module in sys.modules, not the model's attributes)
    gave them back to the fresh model, which passed the probe while every batch looked ahead (2.86 ->
    0.29). The probe's model now has a process of its own, started before the scored model's first call."""
    with pytest.raises(H.Rejected, match=r"^not causal: "):
        score("replays_through_the_process", seed=1)



@pytest.mark.parametrize(("variant", "build"), [("replays_through_a_file", None), ("replays_through_a_socket", UDP_BUILD),
                                               ("replays_through_the_keyring", None)], ids=["file", "udp", "keyring"])
def test_a_model_that_hands_its_calls_to_the_probes_process_is_rejected(H, score, honest, monkeypatch, variant, build):
    """Apart, the two model processes still shared the machine: the scored one left each call's inputs
    in a file (or sent them over UDP to a port the probe's bound when built, or added them as keys to
    the user's keyring), and the probe's model gave back, where its changed rows agreed with them, the
    logits the scored one had given, while every batch looked ahead (the keyring, confined: 2.86 ->
    0.195). Both are confined (landlock: no file written outside a folder of their own; seccomp: no
    socket, no key): the calls never arrive. NIGHTLAB_SANDBOX=0 shows what that stops where the calls
    outlive the scored process (a file, a key); the UDP socket it had is gone before the probe's
    process runs train.py's code."""
    kwargs = {"build": build} if build else {}
    with pytest.raises(H.Rejected, match=r"^not causal: changing the tokens after position \d+ moved the logits"):
        score(variant, seed=1, **kwargs)
    if variant != "replays_through_a_socket":
        monkeypatch.setenv(H.ENV_SANDBOX, "0")
        assert score(variant, seed=1, **kwargs) < honest - 1


def _io_uring() -> bool:
    import ctypes

    ring = ctypes.CDLL(None, use_errno=True).syscall(425, 1, ctypes.create_string_buffer(120))  # io_uring_setup
    if ring >= 0:
        os.close(ring)
    return ring >= 0 and prepare.landlock_abi() > 0


@pytest.mark.skipif(sys.platform != "linux" or not _io_uring(), reason="a kernel with io_uring and landlock")
def test_a_confined_model_process_makes_no_io_uring(H, score, honest):
    """seccomp denied socket(), but not io_uring_setup: through an io_uring (IORING_OP_SOCKET, then
    IORING_OP_SENDMSG) a confined model process still made and used the UDP socket the sandbox keeps
    from it. Its forward here fails when it gets a ring."""
    assert score("makes_an_io_uring", seed=1) == honest


def test_a_model_that_hands_its_calls_to_the_probes_process_through_proc_is_rejected(H, score):
    """Confined, the two model processes still saw each other in /proc: the scored one wrote each call's
    inputs over its own command line (its argv, its own memory) and the probe's, running meanwhile,
    read them in /proc/<pid>/cmdline and acknowledged in its own, then gave back, where its changed
    rows agreed with them, the logits the scored one had given, while every batch looked ahead (2.86
    -> 0.195, any user). The probe's process runs train.py's code only once the scored one is killed."""
    with pytest.raises(H.Rejected, match=r"^not causal: changing the tokens after position \d+ moved the logits"):
        score("replays_through_proc", seed=1, build=PROC_BUILD)


def test_a_model_whose_scored_process_leaves_a_child_to_hand_its_calls_on_is_rejected(H, score):
    """The probe's process ran train.py's code once the scored one was killed, but not what it had
    started: a child forked when the scored model was built (a relay), piped its calls, outlived it
    and wrote them over its own command line for the probe's process, which passed the probe while
    every batch looked ahead (2.86 -> 0.195). The scorer is the subreaper of what the model processes
    start, and kills what the scored one left before the probe's builds."""
    with pytest.raises(H.Rejected, match=r"^not causal: changing the tokens after position \d+ moved the logits"):
        score("replays_through_a_child", seed=1, build=RELAY_BUILD)


def test_a_model_that_reads_the_validation_rows_scores_as_honest(H, score, honest, monkeypatch, data_dir):
    """A forward that read the scored rows from the data dir's cache predicted each next token from
    the first row agreeing with its input so far: causal, so the probe passed it, and the held-out
    slice is in the same file. The model's processes read the Python installation and the artifact
    only: it finds no rows and scores as the honest model it also is."""
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data_dir))
    assert score("reads_the_validation_rows", seed=1) == honest
    monkeypatch.setenv(H.ENV_SANDBOX, "0")
    assert score("reads_the_validation_rows", seed=1) < honest - 1


def test_a_data_dir_the_model_can_read_is_said(H, score, monkeypatch, tmp_path, capsys):
    """The sandbox lets the model read the Python installation, its import path and the artifact: a
    data dir beneath one of them (inside the repository of an editable install) stays readable, and
    the run's log says so, with what to do."""
    score("honest", seed=1)
    assert "but the data dir" not in capsys.readouterr().out
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(tmp_path / "honest" / "data"))
    score("honest", seed=1)
    assert (f", but the data dir {tmp_path / 'honest' / 'data'} lies beneath {tmp_path / 'honest'}, which it reads:"
            " keep the data elsewhere") in capsys.readouterr().out


@pytest.mark.xfail(strict=True, reason="open: the training command reads the whole validation shard (held-out rows too)")
def test_a_model_that_memorised_the_held_out_rows_too_is_doubted_by_the_second_opinion(H, score, data_dir, tmp_path):
    """The training command runs as the user: it finds the data dir by the view's name and reads the
    validation shard, the held-out rows as well as the scored ones (as `eval_rows` does here), and
    saves them in the weights (a buffer); a forward that predicts each next token from the first of
    those rows agreeing with its input so far is causal and passes the probe: val_bpb 2.86 scored
    0.39, and on held-out slice 0, 2.90 scored 0.44, so the second opinion sees the gain hold and no
    SUSPECT (memorising only the scored rows is flagged, tests/loop/test_integrity.py)."""
    tokenizer = score.tokenizer
    rows = torch.cat([H.eval_rows(tokenizer, data_dir, "val"), H.eval_rows(tokenizer, data_dir, "heldout", 0)]).long()
    artifact = save_artifact(tmp_path / "lookup", "looks_up_the_validation_rows", tokenizer.get_vocab_size(),
                             build=LOOKUP_BUILD)
    torch.save({**torch.load(artifact / "model.pt"), "rows": rows}, artifact / "model.pt")
    meta = json.loads((artifact / "meta.json").read_text())
    meta["config"]["rows"] = list(rows.shape)
    (artifact / "meta.json").write_text(json.dumps(meta))
    honest = save_artifact(tmp_path / "honest", "honest", tokenizer.get_vocab_size())
    assert H.score(artifact, data_dir, "val", seed=1)["bpb"] < H.score(honest, data_dir, "val", seed=1)["bpb"] - 1
    assert H.score(artifact, data_dir, "heldout", 0, seed=1)["bpb"] > H.score(honest, data_dir, "heldout", 0, seed=1)["bpb"] - 0.1


def test_a_model_process_the_harness_cannot_start_is_the_harnesss_failure_not_the_models(H, score, monkeypatch):
    """A model process whose own setup failed (here the dtype asked for; on a GPU, CUDA IPC refused)
    ended before a word, read as train.py's model ending its process: the change refused for the
    harness's failure. It is the run's failure, saying what failed."""
    monkeypatch.setenv("NIGHTLAB_DTYPE", "int8")
    with pytest.raises(H.HarnessError) as failed:
        score("honest", seed=1)
    assert str(failed.value) == ("the scorer's model process could not start (SystemExit: 1); its last line: FAIL:"
                                 " NIGHTLAB_DTYPE='int8' is not one of bf16, fp16, fp32; set one of them or unset it")


def test_an_exit_hook_of_train_py_never_runs(H, score, monkeypatch, tmp_path):
    """A build_model that set an exit hook and then called sys.exit ended its model process through
    the interpreter's normal exit, which ran the hook (here unconfined: NIGHTLAB_SANDBOX=0, so it may
    write beside itself). The model process leaves with os._exit however it ends."""
    monkeypatch.setenv(H.ENV_SANDBOX, "0")
    build = ("    import atexit, os, sys\n"
             "    atexit.register(lambda: open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hooked'), 'w').close())\n"
             "    sys.exit(0)\n")
    with pytest.raises(H.Rejected, match=r"^train.py's model ended its process \(exit code 0\)"):
        score("honest", seed=1, build=build)
    assert not (tmp_path / "honest" / "hooked").exists()


@pytest.mark.xfail(strict=True, reason="open: a look-ahead under PROBE_ATOL passes (lowering it needs the GPU's noise measured)")
def test_a_model_that_looks_ahead_by_less_than_the_probes_tolerance_is_rejected(H, score):
    """The probe allows the logits up to its cut to move by 0.01 (numerical noise): a model that raises
    the next token's logit by 0.0099 moves them by less, passes, and scores 0.0030 better on the same
    weights (2.8576 -> 2.8546), the size of a kept change."""
    with pytest.raises(H.Rejected, match=r"^not causal: "):
        score("nudges_ahead", seed=1)

# A process the training command leaves running (a double fork, a new session): once the scorer starts,
# after the checks of the data dir, it writes rows of one long token into the scored rows' cache
LEFT_RUNNING = UNSEEN + '''
import sys, time
trainer = os.getpid()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        fd = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(fd, std)
        scorer = None
        while scorer is None:
            for pid in filter(str.isdigit, os.listdir('/proc')):
                try:
                    cmdline = open(f'/proc/{pid}/cmdline', 'rb').read()
                except OSError:
                    continue
                if b'harness.py' in cmdline and os.environ['NIGHTLAB_ARTIFACT_DIR'].encode() in cmdline:
                    scorer = pid
            time.sleep(0.005)
        shutil.copy(os.path.join(elsewhere, cached), os.path.join(cache, cached))
    os._exit(0)
os.wait()
'''


def test_a_process_the_training_command_leaves_running_never_reaches_its_score(run_env, honest_in_a_workspace, capfd):
    """The checks of the data dir and the harness's files came when the training command ended; a
    process it started and left running (detached: a double fork, a new session) wrote the scored
    rows' cache after them, as the scorer started (2.86 -> 0.19), and could have stayed for the runs
    after. A run ends what its training command left running before it checks and scores."""
    _, train_command = run_env
    assert prepare.run(train_command(LEFT_RUNNING)) == 0
    out = capfd.readouterr().out
    assert _scored(out).get("val_bpb") == honest_in_a_workspace, out[-2000:]


# a .pth file in the environment's site-packages: every Python started from it runs its `import` line,
# the scorer too (here: math.log doubled in the scorer's process only, so val_bpb is halved)
PTH_LINE = ("import sys, math; exec(\"math.log = lambda *a, _l=vars(math).setdefault('_log', math.log): 2 * _l(*a)\")"
            " if 'score' in sys.argv and any(a.endswith('harness.py') for a in sys.argv) else None\n")
PTH_PLANTED = f"import site\nopen(os.path.join(site.getsitepackages()[0], 'zz_nightlab_trick.pth'), 'w').write({PTH_LINE!r})\n"


def _venv_over_this_one(tmp_path: Path) -> tuple[str, Path]:
    """A virtual environment of its own, over this one's packages: a file planted there reaches no
    other test. Its python and its site dir."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_dir = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    (site_dir / "packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(venv / "bin" / "python"), site_dir


def test_a_pth_file_the_training_command_plants_is_never_scored_with(run_env, honest_in_a_workspace, tmp_path):
    """The training command runs unconfined, as the user, and the virtual environment is the user's: a
    .pth file it left in site-packages ran in the scorer's process as Python started (here it doubles
    math.log there: 2.86 scored 1.43). The run checks the scorer's Python after the training: a file
    changed there since the change began refuses it, naming the file (the engine pauses the night).
    Where there is no run sandbox: in one, the write fails (below)."""
    _, train_command = run_env
    python, site_dir = _venv_over_this_one(tmp_path)
    code, out = _run_in_workspace(train_command(PTH_PLANTED).replace(sys.executable, python, 1), python)
    assert code == prepare.REJECTED_EXIT and _scored(out).get("val_bpb") is None, out[-2000:]
    assert f"REJECTED: {prepare.PYTHON_CHANGED} since " in out and f"({site_dir / 'zz_nightlab_trick.pth'}):" in out
    # why it is refused, and why the engine pauses for a person: left there, it halves the runs after
    code, out = _run_in_workspace(train_command(), python)
    assert code == 0 and _scored(out).get("val_bpb") < honest_in_a_workspace * 0.6, out[-2000:]


def test_in_the_runs_sandbox_a_training_command_cannot_plant_a_pth_file(run_env, in_a_run_sandbox,
                                                                       honest_in_a_workspace, tmp_path):
    """The scorer's Python is read-only to the training command there: its write fails as it is made,
    the run is its crash (no night paused for a person), and the next run scores as before."""
    _, train_command = run_env
    python, site_dir = _venv_over_this_one(tmp_path)
    code, out = _run_in_workspace(train_command(PTH_PLANTED).replace(sys.executable, python, 1), python)
    assert code == 1 and "Read-only file system" in out and prepare.PYTHON_CHANGED not in out, out[-2000:]
    assert not (site_dir / "zz_nightlab_trick.pth").exists()
    code, out = _run_in_workspace(train_command(), python)
    assert code == 0 and _scored(out).get("val_bpb") == honest_in_a_workspace, out[-2000:]
