"""The fixed harness: data sources (local, mirror over real HTTP, stdlib), tokenizer,
dataloader and evaluate_bpb. Self-made data only: every test runs on a fresh machine."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from nightlab.trainer import prepare as P

from tests.conftest import REPO
from tests.fakes.hf_server import FakeHF
from tests.waiting import wait_until

SAMPLES = {
    "ascii": "Hello world! Numbers: 1234567. def f(x): return x ** 2",
    "accented": "Crème brûlée, naïve façade, Ångström, Straße, Ελληνικά, Ærø",
    "cjk": "你好，世界。日本語のテキストです。한국어 문장입니다.",
    "emoji": "Launch 🚀🚀 then 👩‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵 and 🤖 robots 🎉",
}
MULTILINGUAL = list(SAMPLES.values()) + [
    "Le café est très chaud ; l'été dernier était magnifique à Montréal.",
    "Über den Wolken muß die Freiheit wohl grenzenlos sein, sagte er.",
    "東京は日本の首都であり、人口が多い都市です。北京是中国的首都。",
    "Good morning ☀️ see you at 10:30 🕥 with ☕ and 🥐 at the café.",
]


def _stdlib_paragraphs(limit_chars: int) -> list[str]:
    """Blank-line separated pieces of stdlib sources: documents of varied length."""
    docs: list[str] = []
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if para.strip():
                docs.append(para)
                total += len(para)
        if total >= limit_chars:
            return docs
    return docs


def write_shards(directory: Path, shards: list[list[str]], column: str = "text") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, docs in enumerate(shards):
        path = directory / f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({column: docs}), path, row_group_size=256)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]]]:
    """A folder of 3 parquet shards (2 train + val), ~600 KB: code paragraphs + multilingual text."""
    paras = _stdlib_paragraphs(600_000)
    shards = [paras[i::3] + [f"{s} ({i}, {k})" for k, s in enumerate(MULTILINGUAL * 20)] for i in range(3)]
    directory = tmp_path_factory.mktemp("corpus")
    write_shards(directory, shards)
    return directory, shards


@pytest.fixture(scope="module")
def data_dir(corpus: tuple[Path, list[list[str]]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return P.prepare(str(corpus[0]), -1, tmp_path_factory.mktemp("cache"), progress=lambda _: None)


@pytest.fixture(scope="module")
def tokenizer(data_dir: Path) -> P.Tokenizer:
    return P.Tokenizer.from_directory(data_dir / "tokenizer")


def tiny_shard_bytes(tag: str) -> bytes:
    sink = pa.BufferOutputStream()
    docs = [f"{tag} document {i}: {MULTILINGUAL[i % len(MULTILINGUAL)]} " * (1 + i % 5) for i in range(200)]
    pq.write_table(pa.table({"text": docs}), sink)
    return sink.getvalue().to_pybytes()


MIRROR_NAMES = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", "shard_06542.parquet"]


@pytest.fixture
def mirror() -> FakeHF:
    with FakeHF({name: tiny_shard_bytes(name) for name in MIRROR_NAMES}) as server:
        yield server


def mirror_prepare(server: FakeHF, cache: Path, messages: list[str] | None = None, **kw) -> Path:
    kw = {"retries": 3, "backoff_s": 0.01, "workers": 4} | kw
    return P.prepare(server.url, 3, cache, progress=(messages.append if messages is not None else None), **kw)


# --- settings -------------------------------------------------------------------------


def test_constants_and_settings_follow_environment() -> None:
    assert (P.VOCAB_SIZE, P.DEFAULT_MAX_SEQ_LEN, P.DEFAULT_TIME_BUDGET, P.DEFAULT_EVAL_TOKENS) == (
        8192, 2048, 300, 40 * 524288,
    )
    settings = P.harness_settings(
        {"NIGHTLAB_MAX_SEQ_LEN": "512", "NIGHTLAB_TIME_BUDGET": "60", "NIGHTLAB_DATA_DIR": "/data/x"}
    )
    assert settings == {
        "MAX_SEQ_LEN": 512, "TIME_BUDGET": 60, "EVAL_TOKENS": 40 * 524288, "VOCAB_SIZE": 8192, "DATA_DIR": "/data/x",
    }
    assert P.harness_settings({"NIGHTLAB_CACHE": "/c"})["DATA_DIR"] == "/c/climbmix"
    assert set(P.harness_settings()) == {"MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "VOCAB_SIZE", "DATA_DIR"}
    for bad in ("abc", "0", "-5", "1.5"):
        with pytest.raises(P.PrepareError, match="NIGHTLAB_EVAL_TOKENS"):
            P.harness_settings({"NIGHTLAB_EVAL_TOKENS": bad})
    assert P.harness_settings({"NIGHTLAB_BUDGET_STEPS": "40"})["BUDGET_STEPS"] == 40  # recorded when in force
    with pytest.raises(P.PrepareError, match="NIGHTLAB_BUDGET_STEPS"):
        P.harness_settings({"NIGHTLAB_BUDGET_STEPS": "soon"})


def test_runs_as_top_level_module_without_torch(tmp_path: Path) -> None:
    """Copied next to train.py it imports as `prepare`; importing it never loads torch."""
    shutil.copy(REPO / "trainer" / "prepare.py", tmp_path / "prepare.py")
    code = "import sys, prepare; print(prepare.MAX_SEQ_LEN, prepare.TIME_BUDGET, 'torch' in sys.modules)"
    env = os.environ | {"NIGHTLAB_MAX_SEQ_LEN": "256", "NIGHTLAB_TIME_BUDGET": "30"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["256", "30", "False"]
    env["NIGHTLAB_TIME_BUDGET"] = "five"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "NIGHTLAB_TIME_BUDGET='five' is not an integer" in out.stderr


# --- local directory source -------------------------------------------------------------


def test_local_source_links_shards_and_trains_tokenizer(corpus, data_dir: Path) -> None:
    source, _ = corpus
    assert data_dir.name == P.source_id(str(source)) and data_dir.name.startswith("local-")
    assert sorted(p.name for p in data_dir.glob("shard_*.parquet")) == [p.name for p in sorted(source.glob("*"))]
    train, val = P.split_shards(data_dir)
    assert [p.name for p in train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert val.name == "shard_00002.parquet"
    spec = json.loads((data_dir / "tokenizer" / "tokenizer.json").read_text())
    assert spec["format"] == P.TOKENIZER_FORMAT and spec["bos_token"] == "<|reserved_0|>"
    assert not list(data_dir.rglob("*.pkl")) and not list(data_dir.rglob("*.tmp"))

    messages: list[str] = []
    files = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")}
    assert P.prepare(str(source), -1, data_dir.parent, progress=messages.append) == data_dir
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")} == files  # nothing written again
    assert "(0 new)" in messages[0] and "present" in messages[-1]


def test_local_source_takes_first_shards_and_last_as_validation(corpus, tmp_path: Path) -> None:
    data_dir = P.prepare(str(corpus[0]), 1, tmp_path, progress=lambda _: None)
    assert sorted(p.name for p in data_dir.glob("shard_*.parquet")) == ["shard_00000.parquet", "shard_00002.parquet"]


def test_local_source_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(P.PrepareError, match="is not a directory"):
        P.prepare(str(tmp_path / "nope"), 2, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(P.PrepareError, match="0 .parquet file.*: add files, or split the one you have into several"):
        P.prepare(str(tmp_path / "empty"), 2, tmp_path / "cache")
    write_shards(tmp_path / "hub" / "data", [["a"], ["b"]])  # a dataset's layout: the shards one level down
    with pytest.raises(P.PrepareError, match=r"2 lie in its subfolders \(e.g. .*hub/data/shard_00000.parquet\), point"
                                             " the source at the folder that holds them"):
        P.prepare(str(tmp_path / "hub"), 2, tmp_path / "cache")
    write_shards(tmp_path / "wrong", [["a"], ["b"]], column="content")
    with pytest.raises(P.PrepareError, match="no `text` column"):
        P.prepare(str(tmp_path / "wrong"), 2, tmp_path / "cache")
    (tmp_path / "norows").mkdir()
    for name in ("a", "b"):  # prepared, every run would wait forever for a first document
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "norows" / f"{name}.parquet")
    with pytest.raises(P.PrepareError, match=r"a.parquet is not a usable shard: no rows\."):
        P.prepare(str(tmp_path / "norows"), 2, tmp_path / "cache")

    assert P.main(["--source", str(tmp_path / "nope"), "--cache-dir", str(tmp_path / "c")]) == 1
    assert "prepare: error: data source" in capsys.readouterr().err


def damage_inside(path: Path) -> None:
    """Zero a shard's data pages, its magic and footer intact: what a disk error or a file rewritten
    after `prepare` leaves, and what the footer check cannot see."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4 : len(data) - footer] = bytes(len(data) - footer - 4)
    path.write_bytes(bytes(data))


def test_a_shard_damaged_inside_is_named_not_a_traceback(corpus, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(corpus[0], source)
    damage_inside(source / "shard_00000.parquet")
    with pytest.raises(P.PrepareError) as err:  # the tokenizer reads it first
        P.prepare(str(source), -1, tmp_path / "cache", progress=lambda _: None)
    assert str(err.value).startswith(f"{source / 'shard_00000.parquet'} is damaged (")
    assert str(err.value).endswith("); replace it with a good copy (a downloaded shard: delete it and run"
                                   " `nightlab prepare`, which fetches it again)")


def test_a_shard_damaged_after_prepare_names_the_file_to_replace(
    corpus, tokenizer: P.Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    shutil.copytree(corpus[0], source)
    prepared = P.prepare(str(source), -1, tmp_path / "cache", progress=lambda _: None)
    view = P.training_view(prepared)  # train.py reads hard links of the source's files
    damage_inside(source / "shard_00001.parquet")  # the night goes on, the disk does not
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(view))
    with pytest.raises(P.DataError, match=f"^{source / 'shard_00001.parquet'} is damaged") as err:
        for _ in P.make_dataloader(tokenizer, 8, 256, "train", device="cpu"):
            pass
    assert "\n" not in str(err.value)  # pyarrow's words may span lines; the engine reads one


def test_a_cache_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(P.PrepareError) as err:
        P.prepare("stdlib", 2, tmp_path / "a-file" / "cache")  # as data.cache_dir = "/mnt/gone/cache"
    assert str(err.value) == (f"cannot create the data folder {tmp_path}/a-file/cache/stdlib: Not a directory;"
                              " set [data] cache_dir (or $NIGHTLAB_CACHE) to a folder you can write to")


def test_cli_prepares_a_local_source(corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert P.main(["--source", str(corpus[0]), "--shards", "2", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert f"NIGHTLAB_DATA_DIR={tmp_path / P.source_id(str(corpus[0]))}" in out.out
    assert "tokenizer: trained" in out.err


def test_a_climbmix_like_folder_as_local_source(tmp_path: Path) -> None:
    """Eight shards named like climbmix's: the first N train, the last is the validation shard."""
    paras = _stdlib_paragraphs(600_000)  # the tokenizer learns from the one training shard used
    source = tmp_path / "shards"
    write_shards(source, [paras] + [paras[i::50] for i in range(7)])
    data_dir = P.prepare(str(source), 1, tmp_path / "cache", progress=lambda _: None, tokenizer_max_chars=1_000_000)
    train, val = P.split_shards(data_dir)
    assert [p.name for p in train] == ["shard_00000.parquet"] and val.name == "shard_00007.parquet"
    assert P.Tokenizer.from_directory(data_dir / "tokenizer").get_vocab_size() == P.VOCAB_SIZE


# --- mirror source over real HTTP ------------------------------------------------------------


def test_mirror_download_retries_and_refetches(mirror: FakeHF, tmp_path: Path) -> None:
    data_dir = tmp_path / P.source_id(mirror.url)
    data_dir.mkdir()
    (data_dir / "shard_00000.parquet").write_bytes(mirror.files["shard_00000.parquet"][:1000])  # truncated earlier
    (data_dir / "shard_00001.parquet.x1y2.tmp").write_bytes(b"partial")  # left by a killed run
    mirror.fail("shard_00001.parquet", "500", "500")
    mirror.fail("shard_00002.parquet", "truncate")
    messages: list[str] = []
    assert mirror_prepare(mirror, tmp_path, messages) == data_dir
    assert data_dir.name.startswith("mirror-")
    for name in MIRROR_NAMES:
        assert (data_dir / name).read_bytes() == mirror.files[name]
    assert [mirror.requested(n) for n in MIRROR_NAMES] == [1, 3, 2, 1]
    assert any("shard_00000.parquet is invalid (no parquet magic at the end" in m for m in messages)
    assert any("shard_00001.parquet attempt 1/3 failed (HTTP 500" in m for m in messages)
    assert any("shard_00002.parquet attempt 1/3 failed (incomplete transfer" in m for m in messages)
    assert not list(data_dir.glob("*.tmp"))
    assert P.split_shards(data_dir)[1].name == "shard_06542.parquet"
    assert (data_dir / "tokenizer" / "tokenizer.json").exists()


def test_mirror_404_fails_at_once_with_a_clear_error(mirror: FakeHF, tmp_path: Path) -> None:
    del mirror.files["shard_06542.parquet"]
    with pytest.raises(P.PrepareError) as err:
        mirror_prepare(mirror, tmp_path)
    assert "shard_06542.parquet: HTTP 404" in str(err.value) and "Check the source URL" in str(err.value)
    assert mirror.requested("shard_06542.parquet") == 1


def test_mirror_serving_a_truncated_file_is_reported(mirror: FakeHF, tmp_path: Path) -> None:
    mirror.files["shard_00002.parquet"] = mirror.files["shard_00002.parquet"][:-100]
    with pytest.raises(P.PrepareError, match=r"shard_00002.parquet: failed after 3 attempts; last error: invalid file"):
        mirror_prepare(mirror, tmp_path)
    data_dir = tmp_path / P.source_id(mirror.url)
    assert not (data_dir / "shard_00002.parquet").exists() and (data_dir / "shard_00001.parquet").exists()
    assert not list(data_dir.glob("*.tmp"))


def test_mirror_interrupted_set_resumes(mirror: FakeHF, tmp_path: Path) -> None:
    mirror.fail("shard_00001.parquet", "500", "500")
    with pytest.raises(P.PrepareError, match="1 of 4 shards could not be downloaded"):
        mirror_prepare(mirror, tmp_path, retries=2)
    assert not (tmp_path / P.source_id(mirror.url) / "tokenizer").exists()
    data_dir = mirror_prepare(mirror, tmp_path, retries=2)
    assert [mirror.requested(n) for n in MIRROR_NAMES] == [1, 3, 1, 1]
    assert len(P.split_shards(data_dir)[0]) == 3
    before = len(mirror.requests)
    mirror_prepare(mirror, tmp_path)
    assert len(mirror.requests) == before  # complete: nothing fetched again


# --- stdlib source ---------------------------------------------------------------------------


def test_stdlib_source_builds_shards_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the stdlib source must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    data_dir = P.prepare("stdlib", 0, tmp_path, progress=lambda _: None, tokenizer_max_chars=300_000)
    assert data_dir == tmp_path / "stdlib"
    train, val = P.split_shards(data_dir)
    assert len(train) == 4 and val.name == "shard_00004.parquet"
    docs = P._stdlib_documents()
    assert len(docs) > 500 and any(d.startswith("assert\n\n") for d in docs)  # sources + pydoc topics
    assert pq.read_table(val).column("text").to_pylist() == docs[4::5]  # deterministic
    assert P.Tokenizer.from_directory(data_dir / "tokenizer").get_vocab_size() == P.VOCAB_SIZE


# --- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "why"), [
    ('{"mergeable_ranks": [', "not JSON: Expecting value: line 1 column 22 (char 21)"),  # a copy cut short
    ('{"vocab": {"a": 0}, "merges": []}', "format None, expected 'nightlab-bpe/1'"),  # another library's
    ('["a"]', "format 'list', expected 'nightlab-bpe/1'"),
])
def test_a_damaged_or_foreign_tokenizer_is_said_at_prepare(corpus, data_dir: Path, tmp_path: Path,
                                                           text: str, why: str) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(data_dir, cache / data_dir.name, symlinks=True)
    (cache / data_dir.name / P.TOKENIZER_FILE).write_text(text)
    with pytest.raises(P.PrepareError) as err:  # before any run, not by each run of the night
        P.prepare(str(corpus[0]), -1, cache, progress=lambda _: None)
    assert str(err.value) == (f"{cache / data_dir.name / P.TOKENIZER_FILE} is not a tokenizer nightlab can read"
                              f" ({why}); move it aside and run `nightlab prepare`, which trains one on the data"
                              " dir's shards")


def test_a_tokenizer_of_another_vocabulary_size_is_said_at_prepare(corpus, data_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(data_dir, cache / data_dir.name, symlinks=True)
    path = cache / data_dir.name / P.TOKENIZER_FILE
    spec = json.loads(path.read_text())  # as one trained elsewhere with a smaller vocabulary
    spec["mergeable_ranks"] = spec["mergeable_ranks"][:1000]
    spec["special_tokens"] = {name: 1000 + i for i, name in enumerate(spec["special_tokens"])}
    path.write_text(json.dumps(spec))
    messages: list[str] = []
    P.prepare(str(corpus[0]), -1, cache, progress=messages.append)
    assert messages[-1] == (f"tokenizer: present at {path}, but its vocabulary is 1,004, not 8,192 (copied from"
                            " elsewhere, or trained on little text?): results are comparable only with runs on this"
                            " same tokenizer; to train the usual one, move it aside and run `nightlab prepare`")


def test_a_tokenizer_removed_after_prepare_fails_the_run_with_what_to_do(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    prepared = tmp_path / "data"
    shutil.copytree(data_dir, prepared, symlinks=True)
    (prepared / P.TOKENIZER_FILE).unlink()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_DATA_DIR, str(prepared))
    assert P.run(f"{sys.executable} -c pass") == 1
    assert capfd.readouterr().out == (f"FAIL: data: no tokenizer at {prepared / P.TOKENIZER_FILE} (removed since it was"
                                      " prepared?); run `nightlab prepare` again, which trains it on the same shards\n")


def test_tokenizer_shape_and_specials(tokenizer: P.Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == P.VOCAB_SIZE
    assert tokenizer.get_bos_token_id() == P.VOCAB_SIZE - 4
    assert tokenizer.enc.special_tokens_set == set(P.SPECIAL_TOKENS)
    assert tokenizer.encode("12345") == [tokenizer.enc.encode_single_token(t) for t in ("12", "34", "5")]
    assert tokenizer.encode("hi", prepend="<|reserved_0|>")[0] == tokenizer.get_bos_token_id()
    assert tokenizer.encode(["a b", "c"], prepend=tokenizer.get_bos_token_id()) == [
        [tokenizer.get_bos_token_id()] + tokenizer.encode("a b"),
        [tokenizer.get_bos_token_id()] + tokenizer.encode("c"),
    ]
    # special-token text inside documents is ordinary text, never a BOS
    assert tokenizer.get_bos_token_id() not in tokenizer.encode("x <|reserved_0|> y")


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_tokenizer_round_trip_and_byte_counts(tokenizer: P.Tokenizer, kind: str) -> None:
    text = SAMPLES[kind]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    lengths = tokenizer.token_byte_lengths()
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    token_bytes = P.get_token_bytes("cpu", tokenizer)
    assert token_bytes.dtype == torch.int32 and int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_are_raw_bytes_and_zero_for_specials(tokenizer: P.Tokenizer) -> None:
    lengths = tokenizer.token_byte_lengths()
    assert lengths[-4:] == [0, 0, 0, 0] and min(lengths[:-4]) >= 1
    assert lengths[:256] == [1] * 256  # the byte tokens, incl. the partial UTF-8 ones upstream counts as 3


def test_get_token_bytes_defaults_to_the_data_dir(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data_dir))
    assert P.get_token_bytes().tolist() == P.Tokenizer.from_directory().token_byte_lengths()
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data_dir / "missing"))
    with pytest.raises(P.PrepareError, match="no tokenizer at"):
        P.Tokenizer.from_directory()


# --- dataloader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_dataloader_invariants(
    tokenizer: P.Tokenizer, data_dir: Path, corpus, split: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data_dir))
    shards = corpus[1]
    docs = [d for s in (shards[:-1] if split == "train" else shards[-1:]) for d in s]
    doc_bytes = {d.encode("utf-8") for d in docs}
    B, T = 4, 64
    loader = P.make_dataloader(tokenizer, B, T, split, device="cpu")
    bos = tokenizer.get_bos_token_id()
    for _ in range(5):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long and x.is_contiguous()
        assert isinstance(epoch, int) and epoch >= 1  # the small val shard cycles
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert ((x >= 0) & (x < tokenizer.get_vocab_size())).all()
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():  # the full row of T+1 tokens
            cuts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            for start, end in itertools.pairwise(cuts):
                piece = b"".join(tokenizer.enc.decode_single_token_bytes(t) for t in row[start + 1 : end])
                if end < len(row):  # a whole document: no padding, nothing invented
                    assert piece in doc_bytes
                else:  # the last piece may be cropped
                    assert any(d.startswith(piece) for d in doc_bytes)
    first = [next(P.make_dataloader(tokenizer, B, T, split, device="cpu"))[0] for _ in range(2)]
    assert torch.equal(*first)  # deterministic


def test_dataloader_yields_fresh_tensors_on_cpu(tokenizer: P.Tokenizer, data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data_dir))
    loader = P.make_dataloader(tokenizer, 1, 32, "train", device="cpu")
    x1, _, _ = next(loader)
    kept = x1.clone()
    next(loader)
    assert torch.equal(x1, kept)


def test_dataloader_over_shards_emptied_after_prepare_fails_instead_of_spinning(
    tokenizer: P.Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("shard_00000.parquet", "shard_00001.parquet"):  # train + val, both without a row
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), data / name)
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data))
    with pytest.raises(P.PrepareError, match="no documents in shard_00000.parquet .*`nightlab prepare`"):
        next(P.make_dataloader(tokenizer, 1, 32, "train", device="cpu"))


def test_training_shards_without_text_are_refused_at_prepare(tmp_path: Path) -> None:
    """Empty and null texts passed prepare with a tokenizer of 0 merges, and the night trained on nothing."""
    source = tmp_path / "source"
    write_shards(source, [["", ""], [None, ""], ["validation text"]])
    with pytest.raises(P.PrepareError) as err:
        P.prepare(str(source), -1, tmp_path / "cache", progress=lambda _: None)
    assert str(err.value) == (f"the training shards hold no text: the `text` of every document in"
                              f" {source / 'shard_00000.parquet'}, {source / 'shard_00001.parquet'} is empty or null;"
                              " give shards with text and run `nightlab prepare` again")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dataloader_on_cuda(tokenizer: P.Tokenizer, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data_dir))
    x, y, _ = next(P.make_dataloader(tokenizer, 2, 32, "train", device="cuda"))
    cpu_x, cpu_y, _ = next(P.make_dataloader(tokenizer, 2, 32, "train", device="cpu"))
    assert x.is_cuda and torch.equal(x.cpu(), cpu_x) and torch.equal(y.cpu(), cpu_y)


# --- evaluate_bpb -----------------------------------------------------------------------------


class UniformModel(torch.nn.Module):
    """Uniform logits over V tokens: the loss of every target is ln V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = torch.zeros(*x.shape, self.vocab) + self.anchor
        return torch.nn.functional.cross_entropy(logits.view(-1, self.vocab), y.view(-1), reduction=reduction)


def test_evaluate_bpb_matches_hand_computation(
    tokenizer: P.Tokenizer, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data_dir))
    B, T, steps = 2, 128, 3
    monkeypatch.setattr(P, "MAX_SEQ_LEN", T)
    monkeypatch.setattr(P, "EVAL_TOKENS", steps * B * T + 5)
    lengths = tokenizer.token_byte_lengths()
    loader = P.make_dataloader(tokenizer, B, T, "val", device="cpu")
    targets = [t for _ in range(steps) for t in next(loader)[1].view(-1).tolist()]
    scored = [t for t in targets if t != tokenizer.get_bos_token_id()]
    assert len(scored) < len(targets)  # the case that matters: some targets are BOS
    expected = len(scored) * math.log(tokenizer.get_vocab_size()) / (math.log(2) * sum(lengths[t] for t in scored))

    model = UniformModel(tokenizer.get_vocab_size())
    bpb = P.evaluate_bpb(model, tokenizer, B)
    assert bpb == pytest.approx(expected, rel=1e-6)
    assert P.evaluate_bpb(model, tokenizer, B) == bpb  # deterministic

    monkeypatch.setattr(P, "EVAL_TOKENS", B * T - 1)
    with pytest.raises(ValueError, match="NIGHTLAB_EVAL_TOKENS"):
        P.evaluate_bpb(model, tokenizer, B)


# --- the run: training without validation data, scoring in the harness -------------------------


def test_training_view_has_no_validation_shard(data_dir: Path, tokenizer: P.Tokenizer, monkeypatch) -> None:
    view = P.training_view(data_dir)
    train, val = P.split_shards(data_dir)
    assert sorted(p.name for p in view.glob("shard_*.parquet")) == [p.name for p in train]
    assert val is not None and not (view / val.name).exists()
    assert not any(p.is_symlink() for p in view.glob("shard_*.parquet"))  # hard links: no path back
    assert P.split_shards(view) == (sorted(view.glob("shard_*.parquet")), None)
    assert P.training_view(data_dir) == view and P.training_view(view) == view  # idempotent
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(view))
    next(P.make_dataloader(tokenizer, 2, 32, "train", device="cpu"))
    with pytest.raises(P.PrepareError, match="holds no validation data: train.py runs without it"):
        next(P.make_dataloader(tokenizer, 2, 32, "val", device="cpu"))


@pytest.mark.parametrize("blocked", ["parent not writable", "a file where the view goes"])
def test_a_training_view_that_cannot_be_made_is_said_in_one_line(
        data_dir: Path, tmp_path: Path, monkeypatch, capfd, blocked: str) -> None:
    """A data dir prepared by another user, in a folder this one cannot write: the run (and the
    daemon's start, loop/runenv.py) ended in a PermissionError traceback instead of saying which
    folder and what to do. (Root writes anywhere: there a file in the view's place stands in.)"""
    if blocked == "parent not writable" and os.geteuid() == 0:
        pytest.skip("root writes into any folder")
    ours = tmp_path / "shared" / "data"
    shutil.copytree(data_dir, ours, ignore=shutil.ignore_patterns(P.EVAL_CACHE_DIR))
    if blocked == "parent not writable":
        ours.parent.chmod(0o555)
    else:
        P.training_view_dir(ours).write_text("")
    try:
        with pytest.raises(P.DataError, match=f"cannot make {P.training_view_dir(ours)}, .*: make {ours.parent}"
                           " writable for this user, or prepare the data in a folder it can write"):
            P.training_view(ours)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv(P.ENV_DATA_DIR, str(ours))
        monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
        assert P.run(_script(tmp_path, "t.py", SAVE)) == 1
        out = capfd.readouterr().out
        assert out.startswith(f"FAIL: data: cannot make {P.training_view_dir(ours)}") and out.count("\n") == 1
    finally:
        ours.parent.chmod(0o755)


def _prepared_again(source: Path, data_dir: Path) -> Path:
    P._link_local_shards(source, -1, data_dir, lambda _: None)
    return P.training_view(data_dir)


def test_a_folder_prepared_again_trains_on_what_it_holds_now_never_on_its_validation_shard(
    data_dir: Path, tmp_path: Path
) -> None:
    """A file removed from the folder left its old link behind: a link to the validation file then
    sorted last, and the shard before it, the same file, became training data."""
    source = tmp_path / "folder"
    source.mkdir()
    for name in ("a", "b", "c", "d"):
        (source / f"{name}.parquet").write_bytes(tiny_shard_bytes(name))
    ours = tmp_path / "local-x"
    (ours / "tokenizer").mkdir(parents=True)
    shutil.copy(data_dir / P.TOKENIZER_FILE, ours / P.TOKENIZER_FILE)
    view = _prepared_again(source, ours)
    (source / "c.parquet").unlink()
    view = _prepared_again(source, ours)
    train, val = P.split_shards(ours)
    assert (val.resolve(), [p.resolve() for p in train]) == ((source / "d.parquet").resolve(),
                                                             [(source / f"{n}.parquet").resolve() for n in "ab"])
    # a name that now holds another file is that file in the training view too, not the old one
    (source / "ab.parquet").write_bytes(tiny_shard_bytes("ab"))  # sorts between a and b: shard 1
    view = _prepared_again(source, ours)
    assert [os.path.samefile(view / p.name, source / f"{n}.parquet") for p, n in
            zip(P.split_shards(ours)[0], ["a", "ab", "b"], strict=True)] == [True, True, True]
    # a data dir whose training shards hold its validation file is refused, saying which
    os.symlink((source / "d.parquet").resolve(), ours / "shard_00000.parquet.tmp")
    os.replace(ours / "shard_00000.parquet.tmp", ours / "shard_00000.parquet")
    with pytest.raises(P.DataError, match=r"shard_00000.parquet and shard_00003.parquet in .* are one file"):
        P.training_view(ours)


def _spec(data_dir: Path) -> dict:
    return json.loads((data_dir / P.TOKENIZER_FILE).read_text())


@pytest.mark.parametrize("change", ["the last file removed", "a file renamed to sort last"])
def test_a_tokenizer_trained_on_what_validates_now_is_trained_again_once(tmp_path: Path, change: str) -> None:
    """A folder prepared, then its files changed: the file that validates now was a training file, and
    the tokenizer kept from before had learnt from the text that scores every run."""
    source = tmp_path / "folder"
    source.mkdir()
    for name in "abc":
        (source / f"{name}.parquet").write_bytes(tiny_shard_bytes(name))
    data_dir = P.prepare(str(source), -1, tmp_path / "cache", progress=lambda _: None)
    assert [s["name"] for s in _spec(data_dir)["trained_on"]["shards"]] == ["shard_00000.parquet", "shard_00001.parquet"]
    if change == "the last file removed":
        (source / "c.parquet").unlink()
        validates = source / "b.parquet"
    else:
        (source / "a.parquet").rename(source / "d.parquet")
        validates = source / "d.parquet"
    said: list[str] = []
    P.prepare(str(source), -1, tmp_path / "cache", progress=said.append)
    assert said[1] == (f"tokenizer: training it again: it was trained on the text of {validates}, the validation shard"
                       " now, and must not have seen the text that scores the runs")
    assert said[2].startswith("tokenizer: training BPE")
    digests = {s["sha256"] for s in _spec(data_dir)["trained_on"]["shards"]}
    assert P.file_digest(validates) not in digests and len(digests) == len(P.split_shards(data_dir)[0])
    # prepared again unchanged: kept, nothing written
    tokenizer = (data_dir / P.TOKENIZER_FILE).stat().st_mtime_ns
    said.clear()
    P.prepare(str(source), -1, tmp_path / "cache", progress=said.append)
    assert said[-1].startswith(f"tokenizer: present at {data_dir / P.TOKENIZER_FILE}")  # (a small vocabulary)
    assert (data_dir / P.TOKENIZER_FILE).stat().st_mtime_ns == tokenizer


def test_a_tokenizer_that_recorded_only_shard_names_is_trained_again_when_the_validation_name_is_one(
    tmp_path: Path,
) -> None:
    """An older nightlab's tokenizer records its shards' names: the validation shard's name among them
    is all there is to go by."""
    source = tmp_path / "folder"
    source.mkdir()
    for name in "abc":
        (source / f"{name}.parquet").write_bytes(tiny_shard_bytes(name))
    ours = P.prepare(str(source), -1, tmp_path / "cache", progress=lambda _: None)
    spec = _spec(ours)
    spec["trained_on"]["shards"] = ["shard_00000.parquet", "shard_00001.parquet"]
    (ours / P.TOKENIZER_FILE).write_text(json.dumps(spec))
    said: list[str] = []
    P.prepare(str(source), -1, tmp_path / "cache", progress=said.append)  # unchanged: kept
    assert said[-1].startswith(f"tokenizer: present at {ours / P.TOKENIZER_FILE}")
    (source / "c.parquet").unlink()
    P.prepare(str(source), -1, tmp_path / "cache", progress=said.append)
    assert ("tokenizer: training it again: it was trained on a shard named shard_00001.parquet, the validation shard's"
            f" name now ({source / 'b.parquet'}); trained by an older nightlab, it recorded names, not contents, so it"
            " may have seen the text that scores the runs") in said
    assert isinstance(_spec(ours)["trained_on"]["shards"][0], dict)


def test_a_copy_of_the_validation_file_among_the_training_files_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "folder"
    source.mkdir()
    for name in "abc":
        (source / f"{name}.parquet").write_bytes(tiny_shard_bytes(name))
    (source / "b2.parquet").write_bytes(tiny_shard_bytes("b"))  # the same size, other text: fine
    shutil.copyfile(source / "c.parquet", source / "a-copy.parquet")
    with pytest.raises(P.PrepareError) as err:
        P.prepare(str(source), -1, tmp_path / "cache", progress=lambda _: None)
    assert str(err.value) == (f"{source / 'a-copy.parquet'} and {source / 'c.parquet'} (the last file, the validation"
                              " shard) hold the same text: runs would train on the text that scores them; remove one"
                              f" of the two from {source}")


def test_eval_rows_are_the_validation_loader_rows_tokenized_once(
    data_dir: Path, tokenizer: P.Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIGHTLAB_DATA_DIR", str(data_dir))
    x, y, _ = next(P.make_dataloader(tokenizer, 6, 32, "val", device="cpu"))
    rows = P.cached_rows(tokenizer, data_dir, 32, 0, 6)
    assert torch.equal(rows[:, :-1].long(), x) and torch.equal(rows[:, 1:].long(), y)  # what evaluate_bpb scores
    assert len(list((data_dir / P.EVAL_CACHE_DIR).glob("*.pt"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached rows were tokenized again")

    monkeypatch.setattr(P, "packed_rows", no_tokenizing)
    assert torch.equal(P.cached_rows(tokenizer, data_dir, 32, 0, 6), rows)
    monkeypatch.undo()
    later = P.cached_rows(tokenizer, data_dir, 32, 6, 6)  # a held-out slice: the rows after them
    assert torch.equal(later, P.cached_rows(tokenizer, data_dir, 32, 0, 12)[6:])


def _folder_with_validation(data_dir: Path, tmp_path: Path, validation: list[str]) -> Path:
    """A data dir of a local folder (the module's tokenizer) whose last file holds `validation`."""
    source = tmp_path / "folder"
    source.mkdir(exist_ok=True)
    (source / "a.parquet").write_bytes(tiny_shard_bytes("a"))
    pq.write_table(pa.table({"text": validation}), source / "z.parquet", compression="none", use_dictionary=False)
    ours = tmp_path / "local-x"
    (ours / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copy(data_dir / P.TOKENIZER_FILE, ours / P.TOKENIZER_FILE)
    P._link_local_shards(source, -1, ours, lambda _: None)
    return ours


def test_a_link_to_nothing_in_the_folder_is_said_not_silently_skipped(tmp_path: Path) -> None:
    """A link whose target moved away sorted last: the file before it validated, and nothing said why."""
    source = tmp_path / "folder"
    source.mkdir()
    for name in ("a", "b"):
        (source / f"{name}.parquet").write_bytes(tiny_shard_bytes(name))
    os.symlink(tmp_path / "elsewhere" / "c.parquet", source / "c.parquet")
    said: list[str] = []
    (tmp_path / "local-x").mkdir()
    P._link_local_shards(source, -1, tmp_path / "local-x", said.append)
    assert said[0] == f"data: {source / 'c.parquet'} is a link to nothing ({tmp_path / 'elsewhere' / 'c.parquet'}), left out"


def test_a_validation_file_replaced_by_one_of_the_same_size_is_scored_on_its_own_rows(
    data_dir: Path, tokenizer: P.Tokenizer, tmp_path: Path
) -> None:
    """The scored rows were cached under the shard's name and size: a last file replaced by another of
    the same size (a regenerated split) was scored on the old file's rows, while the setting (its
    content's digest) said new text."""
    ours = _folder_with_validation(data_dir, tmp_path, ["the old validation text " * 40] * 50)
    old = P.cached_rows(tokenizer, ours, 32, 0, 6)
    before = (tmp_path / "folder" / "z.parquet").stat().st_size
    ours = _folder_with_validation(data_dir, tmp_path, ["the new validation text " * 40] * 50)
    assert (tmp_path / "folder" / "z.parquet").stat().st_size == before
    new = P.cached_rows(tokenizer, ours, 32, 0, 6)
    assert not torch.equal(new, old)
    assert tokenizer.decode(new[0].tolist()).startswith("<|reserved_0|>the new validation text")
    assert len(list((ours / P.EVAL_CACHE_DIR).glob("*.pt"))) == 1  # the old text's rows are gone


def test_a_validation_shard_without_text_is_a_data_problem_naming_it(
    data_dir: Path, tokenizer: P.Tokenizer, tmp_path: Path
) -> None:
    """Only empty strings: every row was BOS, no byte to score, and the scorer died dividing by zero."""
    ours = _folder_with_validation(data_dir, tmp_path, [""] * 20)
    with pytest.raises(P.DataError, match=r"folder/z.parquet, the validation shard, holds no text .* `nightlab prepare`"):
        P.cached_rows(tokenizer, ours, 32, 0, 6)


@pytest.mark.parametrize("validation", [["a short validation text"] * 3, ["one long document " * 200_000]],
                         ids=["few documents", "one huge row"])
def test_a_validation_shard_too_small_for_the_scored_rows_is_said_and_tokenized_once(
    data_dir: Path, tokenizer: P.Tokenizer, tmp_path: Path, capfd: pytest.CaptureFixture[str], validation: list[str]
) -> None:
    """The rows then repeat its text, said nowhere. And the loader's 1000-document buffer went round
    such a shard again and again, tokenizing every document anew each time: a validation shard of one
    8M-character row was never scored."""
    ours = _folder_with_validation(data_dir, tmp_path, validation)
    encoded: list[int] = []

    class Counting(P.Tokenizer):
        def encode(self, text, prepend=None, num_threads=8):  # type: ignore[no-untyped-def]
            encoded.append(len(text))
            return super().encode(text, prepend, num_threads)

    P.cached_rows(Counting(tokenizer.enc), ours, 32, 0, 6)
    assert "of the 6 scored rows differ: the validation shard" in capfd.readouterr().err
    assert encoded == [len(validation)]  # each document once
    P.cached_rows(tokenizer, data_dir, 32, 0, 6)  # a shard that holds them: nothing said
    assert "note:" not in capfd.readouterr().err


def test_the_scored_rows_made_before_a_run_hash_the_validation_shard_once(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their cache file's name was made twice, each time hashing the whole shard (gigabytes may be)."""
    ours = _folder_with_validation(data_dir, tmp_path, [f"validation text {i} " * 40 for i in range(50)])
    hashed: list[Path] = []
    digest = P.file_digest
    monkeypatch.setattr(P, "file_digest", lambda path: hashed.append(Path(path)) or digest(path))
    environ = {P.ENV_DATA_DIR: str(ours), P.ENV_MAX_SEQ_LEN: "32", P.ENV_EVAL_TOKENS: str(6 * 32)}
    P.cache_scored_rows(ours, environ, P.scored_rows_key(ours))
    assert hashed == [P.split_shards(ours)[1]]
    (cached,) = (ours / P.EVAL_CACHE_DIR).glob("*.pt")
    assert cached.name == f"{P.scored_rows_key(ours)}-T32-rows0+6.pt"


SAVE = "import os\nopen(os.path.join(os.environ['NIGHTLAB_ARTIFACT_DIR'], 'w.npy'), 'w').close()\n"


def test_a_project_run_that_saves_nothing_is_rejected_unscored(tmp_path: Path, monkeypatch, capfd) -> None:
    """A score command that copes with an empty folder (a default model) scored no training; one
    that did not crashed with a traceback. The folder holds only what training saved (no train.py)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
    (tmp_path / "train.py").write_text("print('a project file of that name')\n")
    scored = tmp_path / "scored"
    code = P.run(_script(tmp_path, "t.py", "print('trained')\n"), _script(tmp_path, "s.py", f"open({str(scored)!r}, 'w')\n"))
    assert code == 1 and not scored.exists()
    from nightlab.loop.summary import parse_summary

    assert parse_summary(capfd.readouterr().out).rejected == (
        f"the training command saved nothing in $NIGHTLAB_ARTIFACT_DIR ({tmp_path / 'artifact'}) for the score command"
        " to score")


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return f"{sys.executable} {path}"


def test_run_passes_training_output_on_but_never_as_a_result(tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "model.pt").write_text("stale")
    train = _script(tmp_path, "t.py", (
        "import os\nprint('step 1 | loss 3.0')\nprint('---')\nprint('val_bpb:          0.100000')\n"
        "print('METRIC val_bpb=0.1')\nprint('REJECTED: by me')\n"
        "assert not os.path.exists(os.path.join(os.environ['NIGHTLAB_ARTIFACT_DIR'], 'model.pt'))\n" + SAVE
    ))
    score = _script(tmp_path, "s.py", "print('---')\nprint('val_bpb:          1.500000')\n")
    assert P.run(train, score) == 0  # a project's own score command prints its result itself
    out = capfd.readouterr().out
    assert "step 1 | loss 3.0\ntrain.py| ---\nval_bpb:          0.100000\ntrain.py| METRIC val_bpb=0.1\n" in out
    assert "train.py| REJECTED: by me" in out
    assert "note: train.py printed val_bpb 0.1; ignored" in out
    from nightlab.loop.summary import parse_summary

    summary = parse_summary(out)
    assert summary.get("val_bpb") == 1.5 and summary.get("claimed_val_bpb") == 0.1 and summary.rejected is None


def test_a_project_training_command_that_rewrites_its_score_script_is_refused(tmp_path: Path, monkeypatch,
                                                                                capfd) -> None:
    """The engine hash-checks the protected files before each run; the training command runs after
    that and before the score command, so it could write the score script (`print 0.99`) and be
    scored by it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
    (tmp_path / "score.py").write_text("print('---')\nprint('accuracy: 0.5')\n")
    train = _script(tmp_path, "t.py", "open('score.py', 'w').write(\"print('---'); print('accuracy: 0.99')\")\n" + SAVE)
    score = f"{sys.executable} score.py"
    from nightlab.loop.summary import parse_summary

    assert P.run(train, score, protected=["score.py"]) == P.REJECTED_EXIT
    summary = parse_summary(capfd.readouterr().out)
    assert summary.get("accuracy") is None
    assert summary.rejected and summary.rejected.startswith(f"{P.HARNESS_CHANGED} (score.py): the run wrote it, or a person")
    (tmp_path / "score.py").write_text("print('---')\nprint('accuracy: 0.5')\n")  # an honest run: scored
    assert P.run(_script(tmp_path, "h.py", SAVE), score, protected=["score.py"]) == 0
    assert parse_summary(capfd.readouterr().out).get("accuracy") == 0.5


@pytest.mark.parametrize(("millions", "shown"), [(0.16384, "0.163840"), (499.63, "499.6")])
def test_the_tokens_trained_say_something_at_the_tiny_profiles_size(capsys, millions: float, shown: str) -> None:
    """The tiny profile trains a fraction of a million tokens: upstream's one decimal said 0.0."""
    P.print_result({"bpb": 1.0, "score_seconds": 1.0, "eval_seconds": 1.0, "train": {"total_tokens_M": millions}},
                   None)
    out = capsys.readouterr().out
    from nightlab.loop.summary import parse_summary

    assert f"\ntotal_tokens_M:   {shown}\n" in out and f"\nMETRIC total_tokens_M={shown}\n" in out
    assert parse_summary(out).get("total_tokens_M") == float(shown)


def test_training_output_cannot_pose_as_a_result_past_the_prefix_with_a_carriage_return(
        tmp_path: Path, monkeypatch, capfd) -> None:
    """A `\r` or a Unicode line separator inside a line: the prefix went before the whole line, and
    a parser splitting there read the METRIC after it (a project's score command: 0.99, not 0.5)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
    train = _script(tmp_path, "t.py", (
        "print('progress\\rMETRIC accuracy=0.99')\nprint('\\rMETRIC accuracy=0.98')\n"
        "print('x\\u2028METRIC accuracy=0.97')\nprint('step 9\\r---\\naccuracy: 0.96')\n" + SAVE
    ))
    score = _script(tmp_path, "s.py", "print('---')\nprint('accuracy: 0.5')\n")
    assert P.run(train, score) == 0
    from nightlab.loop.summary import parse_summary

    assert parse_summary(capfd.readouterr().out).get("accuracy") == 0.5


@pytest.mark.parametrize(("set_by_user", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_run_lets_openmp_workers_sleep_unless_told_otherwise(tmp_path: Path, monkeypatch, capfd, set_by_user,
                                                              expected) -> None:
    """Training and scoring share the CPU with the daemon: their OpenMP workers must not spin."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
    if set_by_user is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", set_by_user)
    show = "import os\nprint('{}', os.environ.get('OMP_WAIT_POLICY'))\n"
    assert P.run(_script(tmp_path, "t.py", show.format("train") + SAVE), _script(tmp_path, "s.py", show.format("score"))) == 0
    out = capfd.readouterr().out
    assert f"train {expected}\n" in out and f"score {expected}\n" in out


def test_run_stops_when_training_fails_and_says_which_step_failed(tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
    scored = tmp_path / "scored"
    code = P.run(_script(tmp_path, "t.py", "raise SystemExit(7)\n"), _script(tmp_path, "s.py", f"open({str(scored)!r}, 'w')\n"))
    assert code == 7 and not scored.exists()
    assert "FAIL: the training command exited with code 7" in capfd.readouterr().out
    failing = _script(tmp_path, "s.py", "raise SystemExit('no weights')\n")
    assert P.run(_script(tmp_path, "t.py", SAVE), failing) == 1
    assert capfd.readouterr().out.endswith("no weights\nFAIL: the score command exited with code 1\n")


def test_a_cancelled_run_takes_its_training_process_with_it(tmp_path: Path) -> None:
    """`prepare.py run` keeps its children in the run's process group: the executor's kill of a
    run (timeout, stall, /kill) ends the training process too."""
    import psutil
    from nightlab.loop.executors import RunSpec, Slot
    from nightlab.loop.executors.local import LocalExecutor

    shutil.copy(REPO / "trainer" / "prepare.py", tmp_path / "prepare.py")
    ex = LocalExecutor()
    handle = ex.launch(RunSpec(f"{sys.executable} prepare.py run --command 'sleep 600'", tmp_path,
                               tmp_path / "runs" / "1.log", Slot("cpu0"), {}))
    wait_until(lambda: [p for p in psutil.Process(handle.pid).children(recursive=True) if p.name() == "sleep"],
               "the training command to start", 30)
    tree = [psutil.Process(handle.pid), *psutil.Process(handle.pid).children(recursive=True)]
    ex.cancel(handle, grace_s=2)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_upstreams_imports_still_resolve() -> None:
    """Upstream autoresearch's train.py imports these from prepare (bench/trainer.py --other)."""
    for name in ("MAX_SEQ_LEN", "TIME_BUDGET", "Tokenizer", "make_dataloader", "evaluate_bpb"):
        assert hasattr(P, name), name


def test_the_harness_lines_after_progress_ended_by_a_carriage_return_are_read(
        tmp_path: Path, monkeypatch, capfd) -> None:
    """Training's last progress line ended in `\\r`, no newline: the score command's `---` block, or the
    harness's REJECTED line, went on that line and was not read (a crash, "no accuracy in the log")."""
    from nightlab.loop.summary import parse_summary

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
    progress = "import sys\nsys.stdout.write('epoch 1\\repoch 2\\r')\n"
    score = _script(tmp_path, "s.py", "print('---')\nprint('accuracy: 0.5')\n")
    assert P.run(_script(tmp_path, "t.py", progress + SAVE), score) == 0
    assert parse_summary(capfd.readouterr().out).get("accuracy") == 0.5
    assert P.run(_script(tmp_path, "t.py", progress), score) == 1
    assert parse_summary(capfd.readouterr().out).rejected.startswith("the training command saved nothing")


def test_a_training_command_that_removed_the_artifact_folder_is_rejected_without_a_traceback(
        tmp_path: Path, monkeypatch, capfd) -> None:
    """`shutil.rmtree($NIGHTLAB_ARTIFACT_DIR)` to start clean, the model saved elsewhere: the check
    for a saved model ended the harness in a FileNotFoundError traceback."""
    from nightlab.loop.summary import parse_summary

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
    train = _script(tmp_path, "t.py", "import os, shutil\nshutil.rmtree(os.environ['NIGHTLAB_ARTIFACT_DIR'])\n")
    assert P.run(train, _script(tmp_path, "s.py", "print('---')\nprint('accuracy: 0.5')\n")) == 1
    assert parse_summary(capfd.readouterr().out).rejected.startswith("the training command saved nothing")


def _run_on_a_copy(corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the corpus prepared as the data dir `P.run` trains on, from tmp_path; the copy's folder.
    One scored row: `run` makes the scored rows' cache before training, and the default 21M eval
    tokens cycled the small validation shard for over a minute per test."""
    source = tmp_path / "source"
    shutil.copytree(corpus[0], source)
    monkeypatch.setenv(P.ENV_DATA_DIR, str(P.prepare(str(source), -1, tmp_path / "cache", progress=lambda _: None)))
    monkeypatch.setenv(P.ENV_EVAL_TOKENS, str(P.MAX_SEQ_LEN))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(P.ENV_ARTIFACT_DIR, str(tmp_path / "artifact"))
    return source


def test_a_data_failure_is_checked_on_the_file_it_names_not_on_every_shard(
        corpus, tmp_path: Path, monkeypatch, capfd) -> None:
    """After a run failed saying its data did, the harness read every training shard through before
    it believed it: minutes to hours on a data dir of thousands of shards (climbmix has ~6,500), and
    a damaged shard the run never met was said as its failure. Now the tokenizer and the shard the
    claim names are read; a claim about a file outside the data dir finds nothing there."""
    from nightlab.loop.judge import Measurement, failure_reason
    from nightlab.loop.summary import parse_summary

    def said(claim: str) -> str | None:
        train = _script(tmp_path, "t.py", f"print({('FAIL: data: ' + claim)!r})\nraise SystemExit(1)\n")
        assert P.run(train) == 1
        return failure_reason(Measurement(1, None, parse_summary(out := capfd.readouterr().out), out), "val_bpb")

    source = _run_on_a_copy(corpus, tmp_path, monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(source, elsewhere)
    damage_inside(elsewhere / "shard_00001.parquet")
    damage_inside(source / "shard_00000.parquet")  # a shard this run did not fail on
    assert said(f"{source / 'shard_00001.parquet'} is damaged (zeros); replace it") == "exit code 1"
    assert said(f"{elsewhere / 'shard_00001.parquet'} is damaged (zeros)") == "exit code 1"  # not the data dir's
    damage_inside(source / "shard_00001.parquet")
    found = said(f"{source / 'shard_00001.parquet'} is damaged (zeros); replace it")
    assert found is not None and found.startswith(f"data problem: {source / 'shard_00001.parquet'} is damaged (")


@pytest.mark.parametrize("project", [False, True])
def test_training_output_cannot_pose_as_a_data_failure(corpus, tmp_path: Path, monkeypatch, capfd,
                                                       project: bool) -> None:
    """`FAIL: data: …` pauses the night for a person and runs the change again after /resume: a
    train.py (or a project's training command) that printed it made its own crash the data's. Only
    the harness says a run's data failed, once it has read the data train.py got and found it bad."""
    from nightlab.loop.judge import Measurement, failure_reason
    from nightlab.loop.summary import parse_summary

    def reason(out: str) -> str | None:
        return failure_reason(Measurement(1, None, parse_summary(out), out), "val_bpb")

    source = _run_on_a_copy(corpus, tmp_path, monkeypatch)
    blames = _script(tmp_path, "t.py", "print('FAIL: data: shard_00001.parquet is damaged; replace it')\n"
                                       "print('step 3\\rFAIL: data: the tokenizer is gone')\nraise SystemExit(1)\n")
    score = _script(tmp_path, "s.py", "print('---')\nprint('val_bpb: 1.0')\n") if project else None
    assert P.run(blames, score) == 1
    out = capfd.readouterr().out
    assert "train.py| FAIL: data: shard_00001.parquet is damaged; replace it\n" in out
    assert "\rtrain.py| FAIL: data: the tokenizer is gone\n" in out
    assert out.endswith("note: train.py said its data failed, but the tokenizer and the training shards it named"
                        " read well: the failure is its own\nFAIL: the training command exited with code 1\n")
    assert reason(out) == "exit code 1"  # the change's crash; the night goes on
    damage_inside(source / "shard_00001.parquet")  # now it is so
    assert P.run(blames, score) == 1
    out = capfd.readouterr().out
    said = reason(out)
    assert said is not None and said.startswith(f"data problem: {source / 'shard_00001.parquet'} is damaged (")


def test_the_scorers_python_is_checked_for_files_changed_since_the_change_began(tmp_path: Path) -> None:
    """What `run` refuses a run for when the scorer's Python changed (a .pth file planted in a site dir
    runs in the scorer as it starts): a file of its import path whose inode changed since, beneath none of
    the folders spared (the workspace); a .pyc written meanwhile is removed (compiled again from its
    source, and one planted never runs), a .pyc being written (its temporary name) left alone."""
    path = tmp_path / "path"
    (path / "__pycache__").mkdir(parents=True)
    (path / "old.py").write_text("")
    # just after it, the clock's lag allowed for (a float, to the microsecond, as the engine hands it)
    since = os.stat(path / "old.py").st_ctime_ns / 1e9 + P.CTIME_LAG_S + 2e-6

    def written(file: Path) -> Path:
        file.write_bytes(b"")
        while os.stat(file).st_ctime_ns <= since * 1e9 + 1000:  # within the clock's lag: changed after `since`
            file.chmod(0o644)
        return file

    (path / "ws").mkdir()
    made = [written(path / "planted.pth"), written(path / "__pycache__" / "old.cpython-311.pyc"),
            written(path / "__pycache__" / "old.pyc.123"), written(path / "ws" / "train.py")]
    zipped = written(tmp_path / "modules.zip")  # a zip on the path (python311.zip, say): Python imports from it
    (tmp_path / "lib").mkdir()
    library = written(tmp_path / "lib" / "libgomp.so.1")  # in a folder the dynamic loader looks in first
    environ = {"PYTHONPATH": os.pathsep.join([str(path), str(zipped), str(tmp_path / "gone.zip")]),
               "LD_LIBRARY_PATH": str(tmp_path / "lib")}
    assert {path.resolve(), zipped.resolve(), library.parent.resolve()} <= set(P.python_roots(environ))
    assert P.environment_changes(since, environ, [(path / "ws").resolve()]) == sorted(
        [str(made[0].resolve()), str(zipped.resolve()), str(library.resolve())])
    assert not made[1].exists() and made[2].exists()
    assert P.environment_changes(since, {}, []) == []  # this Python: nothing written since
