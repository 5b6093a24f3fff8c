"""The FIXED harness of nightlab's experiment template (upstream autoresearch's prepare.py).

It prepares the data (parquet shards with a `text` column + a BPE tokenizer) and provides
what every train.py relies on and must not change: the constants, the tokenizer, the
BOS-aligned dataloader and the metric `evaluate_bpb`.

    python prepare.py --source climbmix --shards 10   # download 10 + 1 shards, train tokenizer
    python prepare.py --source stdlib                 # offline corpus from Python's stdlib
    python prepare.py --source ../shared/corpus       # a local folder of parquet shards
    python prepare.py --source https://mirror/path    # a mirror with climbmix's layout

Two ways in, so the module depends on nothing of nightlab's and keeps torch out of the
daemon: it runs as a top-level module copied next to train.py (`from prepare import ...`),
and the daemon imports it as `nightlab.trainer.prepare` to download data. torch is
imported lazily inside the functions that need it.

A data dir holds `shard_*.parquet` and `tokenizer/tokenizer.json`; the shard that sorts
last is the validation shard. The trainer finds it through NIGHTLAB_DATA_DIR.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import math
import os
import pickle
import re
import shlex
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, overload

import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

# ---------------------------------------------------------------------------
# Constants. Upstream's values; a profile may override the first three through the
# environment (set by nightlab's executor), VOCAB_SIZE is a property of the tokenizer.
# ---------------------------------------------------------------------------

DEFAULT_MAX_SEQ_LEN = 2048  # context length
DEFAULT_TIME_BUDGET = 300  # training time budget in seconds (5 minutes)
DEFAULT_EVAL_TOKENS = 40 * 524288  # number of validation tokens evaluate_bpb scores
VOCAB_SIZE = 8192
# What a run's val_bpb measures, as a number: raised by a change to prepare.py or harness.py that
# can move it (the rows scored and how, the budget, the speed training runs at); a change of
# messages or of how a failure is said leaves it. The daemon reads it from a workspace's copy: a
# copy brought up to another number is a new setting, its best measured again (loop/workspace.py).
SCORE_VERSION = 1

ENV_MAX_SEQ_LEN = "NIGHTLAB_MAX_SEQ_LEN"
ENV_TIME_BUDGET = "NIGHTLAB_TIME_BUDGET"
ENV_EVAL_TOKENS = "NIGHTLAB_EVAL_TOKENS"
ENV_DATA_DIR = "NIGHTLAB_DATA_DIR"
ENV_CACHE = "NIGHTLAB_CACHE"
ENV_ARTIFACT_DIR = "NIGHTLAB_ARTIFACT_DIR"  # where train.py's run saves the trained model
ENV_RUN_STARTED = "NIGHTLAB_RUN_STARTED"  # set by `run` for the scorer's total_seconds
ENV_BUDGET_STEPS = "NIGHTLAB_BUDGET_STEPS"  # a step budget instead of TIME_BUDGET (harness.py)
# when the run's change began (the engine: its candidate made, before an agent edits): `run` refuses to
# score when anything in the scorer's Python changed since (`environment_changes`); unset, the run's start
ENV_PYTHON_SINCE = "NIGHTLAB_PYTHON_SINCE"
DEFAULT_ARTIFACT_DIR = ".nightlab/artifact"
ARTIFACT_FILES = ("model.pt", "meta.json", "train.py")  # what the scorer reads of a saved model, all it is kept with
TRAINING_ONLY_MARKER = "TRAINING_ONLY"  # in a data dir without its validation shard (see `run`)
TRAINING_VIEW_SUFFIX = ".train"  # <data dir>.train, next to it: that view (`training_view_dir`)
EVAL_CACHE_DIR = "eval-cache"
REJECTED_EXIT = 3  # `run` and the scorer: the run was refused (the REJECTED line before says why)

# Data sources
BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # the last climbmix shard is shard_06542.parquet
VAL_SHARD = MAX_SHARD  # pinned validation shard (climbmix and mirrors)
SHARD_PATTERN = "shard_*.parquet"
STDLIB_TRAIN_SHARDS = 4  # the stdlib corpus: 4 training shards + 1 validation shard
STDLIB_PIECE_CHARS = 3000  # stdlib documents are cut into pieces of about this size
DOWNLOAD_WORKERS = 8
DOWNLOAD_RETRIES = 5
DOWNLOAD_BACKOFF_S = 1.0  # first retry waits this long, then doubles
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation, not per file
PARQUET_MAGIC = b"PAR1"

# Tokenizer
TOKENIZER_DIR = "tokenizer"  # in a data dir (and in its training view)
TOKENIZER_FILE = f"{TOKENIZER_DIR}/tokenizer.json"
TOKENIZER_FORMAT = "nightlab-bpe/1"
TOKENIZER_MAX_CHARS = 1_000_000_000  # cap on the training text (upstream's)
TOKENIZER_DOC_CAP = 10_000  # characters taken from any one document (upstream's)
# GPT-4 style split, digits in groups of 1-2 instead of 1-3 (upstream's)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]

Progress = Callable[[str], None]


class PrepareError(Exception):
    """Data or settings are missing or wrong; the message says what and what to do."""


class DataError(PrepareError):
    """Prepared data that went bad after `prepare` checked it (a damaged or missing shard, a missing
    or unreadable tokenizer): no change to train.py can run until a person fixes it."""


DATA_FAIL = "FAIL: data: "  # how a run says so (its last words); the engine pauses the loop on it
# How `run` begins its refusal of a run during which the code that scores it changed: the run's own
# write, or a person's edit of the workspace's harness while it trained (a single slot runs there); it
# cannot tell which, so it says both, and the engine puts the harness back and runs the change again once.
HARNESS_CHANGED = "the code that scores it changed while the training command ran"
# How `run` begins its refusal of a run when the Python the scorer runs in (its standard library, its
# site dirs) changed: a package a person installed, or a file the run or the agent wrote there (a .pth
# file in site-packages runs in every Python started, the scorer too). The engine pauses the night on it.
PYTHON_CHANGED = "the Python environment the scorer runs in changed"
# `run`'s METRIC for the training command's wall clock, timed from outside it (start-up included), under
# a time budget: that is counted by train.py's own loop, so the engine compares this with the replaced
# commit's runs to tell a change that trained past it (loop/overtime.py).
TRAINING_WALL = "training_command_seconds"


def fail_text(error: PrepareError) -> str:
    """A FAIL line's text for `error`, on one line (the engine reads one): a data problem says it is one."""
    return " ".join((f"data: {error}" if isinstance(error, DataError) else str(error)).split())


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    """A positive integer from the environment, or `default` when unset or empty."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise PrepareError(f"{name}={raw!r} is not an integer; set a positive whole number or unset it") from None
    if value <= 0:
        raise PrepareError(f"{name}={raw!r} must be positive; set a positive whole number or unset it")
    return value


MAX_SEQ_LEN = _env_int(os.environ, ENV_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
TIME_BUDGET = _env_int(os.environ, ENV_TIME_BUDGET, DEFAULT_TIME_BUDGET)
EVAL_TOKENS = _env_int(os.environ, ENV_EVAL_TOKENS, DEFAULT_EVAL_TOKENS)


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where prepared data dirs live: $NIGHTLAB_CACHE or ~/.cache/nightlab."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_CACHE, "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "nightlab"


def get_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The data dir in force: $NIGHTLAB_DATA_DIR, else the default climbmix dir.

    Read at call time (not import time) so one process can point at several data dirs.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_DATA_DIR, "").strip()
    return Path(raw).expanduser() if raw else cache_root(environ) / "climbmix"


def harness_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The harness values a trainer started with `environ` would use (no argument: this process's);
    a bad value raises PrepareError naming the variable. `nightlab doctor` says what is in force
    with it; the tests hold the profiles' and the config's environments to what the harness accepts."""
    if environ is None:
        seq_len, budget, eval_tokens = MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS
    else:
        seq_len = _env_int(environ, ENV_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
        budget = _env_int(environ, ENV_TIME_BUDGET, DEFAULT_TIME_BUDGET)
        eval_tokens = _env_int(environ, ENV_EVAL_TOKENS, DEFAULT_EVAL_TOKENS)
    settings: dict[str, Any] = {
        "MAX_SEQ_LEN": seq_len,
        "TIME_BUDGET": budget,
        "EVAL_TOKENS": eval_tokens,
        "VOCAB_SIZE": VOCAB_SIZE,
        "DATA_DIR": str(get_data_dir(environ)),
    }
    env = os.environ if environ is None else environ
    if env.get(ENV_BUDGET_STEPS, "").strip():  # a step budget replaces TIME_BUDGET (tiny profile)
        settings["BUDGET_STEPS"] = _env_int(env, ENV_BUDGET_STEPS, 1)
    return settings


def _stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Shards: naming, validation, splits
# ---------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def parquet_problem(path: Path) -> str | None:
    """Why `path` is not a usable shard, or None if it is.

    Checks the cheap things first (size, `PAR1` at head and tail) so a truncated download
    is caught without parsing, then lets pyarrow read the footer and looks for `text`.
    """
    try:
        size = path.stat().st_size
        if size < 2 * len(PARQUET_MAGIC):
            return f"{size} bytes, too small to be parquet"
        with open(path, "rb") as f:
            head = f.read(len(PARQUET_MAGIC))
            f.seek(-len(PARQUET_MAGIC), os.SEEK_END)
            tail = f.read(len(PARQUET_MAGIC))
        if head != PARQUET_MAGIC:
            return "no parquet magic at the start"
        if tail != PARQUET_MAGIC:
            return "no parquet magic at the end (truncated?)"
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as e:
        return f"unreadable: {e}"
    if "text" not in schema.names:
        return f"no `text` column (columns: {', '.join(schema.names) or 'none'})"
    if not pa.types.is_string(schema.field("text").type) and not pa.types.is_large_string(schema.field("text").type):
        return f"column `text` has type {schema.field('text').type}, expected string"
    if meta.num_rows == 0:  # the data loader would wait forever for a first document
        return "no rows"
    return None


def _row_groups(path: Path) -> Iterator[list[str | None]]:
    """A shard's `text` column, a row group at a time."""
    for column in _text_columns(path):
        yield column.to_pylist()


def _text_columns(path: Path) -> Iterator[pa.ChunkedArray]:
    """A shard's `text` column as arrow reads it, a row group at a time. `parquet_problem` reads only
    the footer, so a shard damaged inside (a disk error, a file changed after `prepare`) fails here,
    mid-read: said as the data problem it is, with what to do, not as pyarrow's traceback."""
    try:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            yield pf.read_row_group(rg, columns=["text"]).column("text")
    except (OSError, pa.ArrowException) as e:
        raise DataError(
            f"{_origin(Path(path))} is damaged ({' '.join(str(e).split())}); replace it with a good copy (a downloaded shard:"
            " delete it and run `nightlab prepare`, which fetches it again)"
        ) from None


def _origin(path: Path) -> Path:
    """The file a user can replace: a training view's file (a shard's hard link, the tokenizer's
    copy) names its data dir's, and a data dir's link to a local source names the source's file."""
    for view in (path.parent, path.parent.parent):
        data_dir = viewed_data_dir(view)
        if data_dir is not None and (view / TRAINING_ONLY_MARKER).exists():
            return (data_dir / path.relative_to(view)).resolve()
    return path.resolve()


def training_view_dir(data_dir: Path) -> Path:
    """Where `training_view` puts the data dir as train.py sees it: next to it, by name."""
    return data_dir.with_name(data_dir.name + TRAINING_VIEW_SUFFIX)


def viewed_data_dir(folder: Path) -> Path | None:
    """The data dir `folder` is the training view of, by its name; None for any other folder."""
    name = folder.name
    return folder.with_name(name.removesuffix(TRAINING_VIEW_SUFFIX)) if name.endswith(TRAINING_VIEW_SUFFIX) else None


def split_shards(data_dir: Path) -> tuple[list[Path], Path | None]:
    """(training shards, validation shard) of a data dir: the last shard by name validates.
    A training-only view (what train.py gets under `run`) has no validation shard: None. The view's
    marker counts only in a folder named as a view: one a run put in the data dir had made every
    later run fail, its validation shard taken for a training shard."""
    shards = sorted(Path(data_dir).glob(SHARD_PATTERN))
    if (Path(data_dir) / TRAINING_ONLY_MARKER).exists() and viewed_data_dir(Path(data_dir)) is not None and shards:
        return shards, None
    if len(shards) < 2:
        raise DataError(
            f"{data_dir} has {len(shards)} shard(s) ({SHARD_PATTERN}); at least 2 are needed "
            f"(training + validation). Run `python prepare.py --source ...` or set {ENV_DATA_DIR}."
        )
    return shards[:-1], shards[-1]


# ---------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------


def source_id(source: str) -> str:
    """Name of the data dir for a source: climbmix, stdlib, mirror-<hash>, local-<hash>."""
    if source in ("climbmix", "stdlib"):
        return source
    if source.startswith(("http://", "https://")):
        return "mirror-" + hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:10]
    path = Path(source).expanduser().resolve()
    return "local-" + hashlib.sha256(str(path).encode()).hexdigest()[:10]


def prepare(
    source: str = "climbmix",
    shards: int = 10,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    workers: int = DOWNLOAD_WORKERS,
    retries: int = DOWNLOAD_RETRIES,
    backoff_s: float = DOWNLOAD_BACKOFF_S,
    tokenizer_max_chars: int = TOKENIZER_MAX_CHARS,
) -> Path:
    """Make the data dir for `source` complete (shards + tokenizer) and return it.

    source: `climbmix`, `stdlib`, an http(s) base URL with climbmix's layout, or a folder
    of parquet shards with a `text` column. shards: training shards to use besides the
    validation shard (-1 = all; ignored by `stdlib`, which is always 4 + 1). Idempotent:
    valid files are kept, so a rerun resumes an interrupted set and a complete one returns
    at once. `progress` receives one line per step (default: stderr); downloads call it
    from worker threads, one call at a time.
    """
    say = progress or _stderr_progress
    base_url = BASE_URL if source == "climbmix" else source.rstrip("/")
    remote = _remote(source)
    if remote and shards != -1 and shards < 1:
        raise PrepareError(f"--shards must be at least 1 (or -1 for all), got {shards}")
    folder = _source_folder(source)
    data_dir = (cache_dir or cache_root()) / source_id(source)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create the data folder {data_dir}: {exc.strerror}; set [data] cache_dir"
                           f" (or ${ENV_CACHE}) to a folder you can write to") from None
    if remote:
        num_train = MAX_SHARD if shards == -1 else min(shards, MAX_SHARD)
        _download_shards(base_url, num_train, data_dir, say, workers, retries, backoff_s)
    elif source == "stdlib":
        _build_stdlib_shards(data_dir, say)
    elif folder is not None:
        _link_local_shards(folder, shards, data_dir, say)
    ensure_tokenizer(data_dir, say, max_chars=tokenizer_max_chars)
    return data_dir


def _remote(source: str) -> bool:
    return source == "climbmix" or source.startswith(("http://", "https://"))


def _source_folder(source: str) -> Path | None:
    """The folder of shards a source names (None: climbmix, stdlib or a mirror); PrepareError when
    it is not a directory."""
    if _remote(source) or source == "stdlib":
        return None
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise PrepareError(
            f"data source {source!r} is not a directory. Use `climbmix`, `stdlib`, an "
            "http(s) mirror URL, or a folder of parquet shards with a `text` column."
        )
    return folder


def check_source(source: str, shards: int) -> None:
    """PrepareError when a folder source cannot give data: not there, or files `local_shards`
    refuses. Asked before a night makes its workspace, so a refusal leaves nothing behind; what a
    download or the tokenizer may fail on shows only while preparing."""
    folder = _source_folder(source)
    if folder is not None:
        local_shards(folder, shards)


def _download_shards(
    base_url: str, num_train: int, data_dir: Path, say: Progress, workers: int, retries: int, backoff_s: float
) -> None:
    """Download training shards 0..num_train-1 and the pinned validation shard in parallel."""
    names = [shard_name(i) for i in range(num_train)] + [shard_name(VAL_SHARD)]
    for leftover in data_dir.glob("shard_*.parquet.*.tmp"):  # from a run that was killed
        leftover.unlink(missing_ok=True)
    missing = []
    for name in names:
        path = data_dir / name
        if path.exists():
            problem = parquet_problem(path)
            if problem is None:
                continue
            say(f"data: {name} is invalid ({problem}); fetching it again")
            path.unlink()
        missing.append(name)
    if not missing:
        say(f"data: all {len(names)} shards present in {data_dir}")
        return
    say(f"data: downloading {len(missing)} of {len(names)} shards from {base_url}")
    lock = threading.Lock()
    done = 0
    errors: list[str] = []

    def fetch(name: str) -> None:
        nonlocal done
        size = _download_one(f"{base_url}/{name}", data_dir / name, retries, backoff_s, say, lock)
        with lock:
            done += 1
            say(f"data: {done}/{len(missing)} {name} ({size / 1e6:.1f} MB)")

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(missing)))) as pool:
        for future in as_completed([pool.submit(fetch, name) for name in missing]):
            try:
                future.result()
            except PrepareError as e:
                errors.append(str(e))
    if errors:
        raise PrepareError(
            f"{len(errors)} of {len(missing)} shards could not be downloaded (the others are kept; "
            "rerun to resume):\n  " + "\n  ".join(sorted(errors))
            + "\nNo network on this machine? Use the offline corpus (--source stdlib, or"
            " [data] source = \"stdlib\") or a local folder of parquet shards (--source /path)."
        )


def _download_one(url: str, dest: Path, retries: int, backoff_s: float, say: Progress, lock: threading.Lock) -> int:
    """Fetch `url` into `dest` atomically (temp file, validate, rename); return its size.

    Retries server errors, network errors and invalid files with exponential backoff; a
    4xx (other than 408/429) is final, since asking again will not make the file appear.
    """
    last_error = ""
    for attempt in range(1, retries + 1):
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, out, 1 << 20)
                expected = response.headers.get("Content-Length")
            size = tmp.stat().st_size
            # http.client returns a short body without complaint when the connection drops
            if expected is not None and expected.isdigit() and size != int(expected):
                last_error = f"incomplete transfer ({size} of {expected} bytes)"
            elif (problem := parquet_problem(tmp)) is not None:
                last_error = f"invalid file ({problem})"
            else:
                os.replace(tmp, dest)
                return size
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise PrepareError(
                    f"{url}: HTTP {e.code} {e.reason}. Check the source URL; a mirror must serve "
                    f"climbmix's layout (<base>/shard_NNNNN.parquet, validation shard {shard_name(VAL_SHARD)})."
                ) from None
            last_error = f"HTTP {e.code} {e.reason}"
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, bad responses
            last_error = f"{type(e).__name__}: {e}"
        finally:
            tmp.unlink(missing_ok=True)
        if attempt < retries:
            delay = backoff_s * 2 ** (attempt - 1)
            with lock:
                say(f"data: {dest.name} attempt {attempt}/{retries} failed ({last_error}); retrying in {delay:g}s")
            time.sleep(delay)
    raise PrepareError(f"{url}: failed after {retries} attempts; last error: {last_error}")


def local_shards(source_dir: Path, shards: int) -> list[tuple[int, Path]]:
    """The (shard index, file) pairs a folder gives, each checked: files are taken in name order and
    keep their position as shard index, so the last one stays the validation shard: shard_00000..
    for the first `shards`, plus the last file. `nightlab doctor` asks it too (a bad file fails the run)."""
    files = sorted(p for p in source_dir.glob("*.parquet") if p.is_file())
    if len(files) < 2:
        nested = sorted(p for p in source_dir.glob("*/**/*.parquet") if p.is_file())
        raise PrepareError(
            f"{source_dir} has {len(files)} .parquet file(s); at least 2 are needed (training shards + the last"
            " one by name for validation): " + (f"{len(nested)} lie in its subfolders (e.g. {nested[0]}), point the"
                                                " source at the folder that holds them" if nested else
                                                "add files, or split the one you have into several")
        )
    count = len(files) - 1 if shards == -1 else min(shards, len(files) - 1)
    if count < 1:
        raise PrepareError(f"--shards must be at least 1 (or -1 for all), got {shards}")
    chosen = [(i, files[i]) for i in range(count)] + [(len(files) - 1, files[-1])]
    for _, src in chosen:
        problem = parquet_problem(src)
        if problem is not None:
            raise PrepareError(f"{src} is not a usable shard: {problem}. Shards need rows with a string column `text`.")
    validation = files[-1]
    for _, src in chosen[:-1]:  # a copy of the validation file: sizes first, so a folder of distinct files reads nothing
        if src.stat().st_size == validation.stat().st_size and file_digest(src) == file_digest(validation):
            raise PrepareError(f"{src} and {validation} (the last file, the validation shard) hold the same text:"
                               " runs would train on the text that scores them; remove one of the two from"
                               f" {source_dir}")
    return chosen


def _link_local_shards(source_dir: Path, shards: int, data_dir: Path, say: Progress) -> None:
    """Link (or copy, where links are impossible) a folder's parquet files (`local_shards`) into the data dir."""
    chosen = local_shards(source_dir, shards)
    for dangling in sorted(p for p in source_dir.glob("*.parquet") if p.is_symlink() and not p.exists()):
        say(f"data: {dangling} is a link to nothing ({os.readlink(dangling)}), left out")
    linked = 0
    for index, src in chosen:
        dest = data_dir / shard_name(index)
        if dest.exists() and dest.resolve() == src.resolve():
            continue
        tmp = data_dir / (dest.name + ".link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(src.resolve(), tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        linked += 1
    # The data dir is this folder's alone. A shard name left from an earlier prepare (a file since
    # removed, a --shards since lowered) would sort among these: a stale link to the validation file
    # sorted last and made the shard before it, the same file, training data.
    keep = {shard_name(index) for index, _ in chosen}
    for stale in data_dir.glob(SHARD_PATTERN):
        if stale.name not in keep:
            stale.unlink()
    say(f"data: {len(chosen)} shards from {source_dir} in {data_dir} ({linked} new)")


def _stdlib_documents() -> list[str]:
    """Documents of the offline corpus: stdlib .py sources, then pydoc topics, sorted."""
    from pydoc_data.topics import topics  # stdlib, but 0.5 MB: loaded only when needed

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            docs.append(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):  # a few test files are deliberately not UTF-8
            continue
    docs.extend(f"{name}\n\n{topics[name]}" for name in sorted(topics))
    # Cut long files at blank lines into climbmix-sized pieces: whole 20K-character modules make
    # the dataloader's 1000-document buffer slow to fill on a small CPU.
    return [piece for doc in docs for piece in _pieces(doc, STDLIB_PIECE_CHARS)]


def _pieces(text: str, size: int) -> list[str]:
    pieces: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + len(paragraph) > size:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current.strip():
        pieces.append(current)
    return pieces


def _build_stdlib_shards(data_dir: Path, say: Progress) -> None:
    """Write the offline corpus as 4 + 1 parquet shards, documents dealt round-robin."""
    names = [shard_name(i) for i in range(STDLIB_TRAIN_SHARDS + 1)]
    if all(parquet_problem(data_dir / n) is None for n in names):
        say(f"data: stdlib shards present in {data_dir}")
        return
    docs = _stdlib_documents()
    say(f"data: writing {len(docs)} stdlib documents ({sum(map(len, docs)) / 1e6:.1f}M chars) to {data_dir}")
    for i, name in enumerate(names):
        tmp = data_dir / (name + ".tmp")
        pq.write_table(pa.table({"text": docs[i :: len(names)]}), tmp, compression="zstd", row_group_size=1024)
        os.replace(tmp, data_dir / name)


# ---------------------------------------------------------------------------
# Tokenizer: trained with rustbpe, stored as JSON (no pickle), encoded with tiktoken
# ---------------------------------------------------------------------------


def _training_text(paths: list[Path], max_chars: int, say: Progress, read: dict[Path, int]) -> Iterator[str]:
    """Documents of the training shards, each capped, until `max_chars` in all; each shard opened is
    in `read` with the characters read from it (the text may end before the last ones)."""
    nchars = 0
    next_report = 100_000_000
    for path in paths:
        read[path] = 0
        for texts in _row_groups(path):
            for text in texts:
                doc = (text or "")[:TOKENIZER_DOC_CAP]
                nchars += len(doc)
                read[path] += len(doc)
                yield doc
                if nchars >= next_report:
                    say(f"tokenizer: read {nchars / 1e6:.0f}M chars")
                    next_report += 100_000_000
                if nchars >= max_chars:
                    return


def ensure_tokenizer(data_dir: Path, progress: Progress | None = None, *, max_chars: int = TOKENIZER_MAX_CHARS) -> Path:
    """Train the tokenizer on the data dir's training shards unless it exists; return its path.

    An existing tokenizer is kept even if shards were added later: changing it would make
    val_bpb incomparable with earlier runs on the same data dir. Unless it was trained on the text
    that is now the validation shard (a local folder's files removed or renamed since): then it is
    trained again, since it would score runs on text it learnt from; the validation shard changed
    anyway, so the runs' setting is a new one whether or not the tokenizer is trained again.
    """
    say = progress or _stderr_progress
    path = Path(data_dir) / TOKENIZER_FILE
    if path.exists():
        vocab = Tokenizer.from_directory(path.parent).get_vocab_size()  # a damaged or foreign one: said now
        _, validation = split_shards(data_dir)
        why = trained_on_validation(path, validation) if validation is not None else None
        if why is None:
            say(f"tokenizer: present at {path}" + ("" if vocab == VOCAB_SIZE else (
                f", but its vocabulary is {vocab:,}, not {VOCAB_SIZE:,} (copied from elsewhere, or trained on little"
                " text?): results are comparable only with runs on this same tokenizer; to train the usual one, move"
                " it aside and run `nightlab prepare`")))
            return path
        say(f"tokenizer: training it again: {why}")
    train_paths, _ = split_shards(data_dir)
    say(f"tokenizer: training BPE (vocab {VOCAB_SIZE}) on {len(train_paths)} shards")
    t0 = time.time()
    import rustbpe  # only to train a tokenizer: a box given a prepared data dir needs none

    trainer = rustbpe.Tokenizer()
    read: dict[Path, int] = {}
    trainer.train_from_iterator(
        _training_text(train_paths, max_chars, say, read), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN
    )
    if not any(read.values()):  # a tokenizer of bytes only, then runs that train on BOS tokens "successfully"
        raise PrepareError(f"the training shards hold no text: the `text` of every document in"
                           f" {', '.join(str(_origin(p)) for p in read)} is empty or null; give shards with text and"
                           " run `nightlab prepare` again")
    ranks = sorted(((bytes(token), rank) for token, rank in trainer.get_mergeable_ranks()), key=lambda kv: kv[1])
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    seconds = time.time() - t0
    if len(ranks) + len(specials) < VOCAB_SIZE:
        say(f"tokenizer: the text allowed only {len(ranks) - 256} merges; vocab is {len(ranks) + len(specials)}")
    spec = {
        "format": TOKENIZER_FORMAT,
        "pattern": trainer.get_pattern(),
        "mergeable_ranks": [[base64.b64encode(token).decode("ascii"), rank] for token, rank in ranks],
        "special_tokens": specials,
        "bos_token": BOS_TOKEN,
        # what it learnt from, by content: a shard that validates later is found among them (`trained_on_validation`)
        "trained_on": {"shards": [{"name": p.name, "bytes": p.stat().st_size, "sha256": file_digest(p)} for p in read],
                       "seconds": round(seconds, 2)},
    }
    tokenizer = Tokenizer(_encoding_from_spec(spec))
    sample = "Hello world! Numbers: 123. Unicode: 你好, café, 🚀"
    if tokenizer.decode(tokenizer.encode(sample)) != sample:
        raise PrepareError(f"the trained tokenizer does not round-trip {sample!r}; please report this")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec), encoding="utf-8")
    os.replace(tmp, path)
    say(f"tokenizer: trained in {seconds:.1f}s, vocab {tokenizer.get_vocab_size()}, saved to {path}")
    return path


def trained_on_validation(path: Path, validation: Path, shard: str | None = None) -> str | None:
    """Why the tokenizer at `path` has seen the text of the shard `validation` (named `shard` in the
    data dir, by default its own name), or None when it has not (or nothing says). It records the
    shards it read, by size and SHA-256, so only a shard of the validation shard's size is hashed; one
    from before that records their names only: the validation shard's name among them is taken as that
    file (a conservative guess: it costs one training)."""
    try:
        shards = json.loads(path.read_text(encoding="utf-8"))["trained_on"]["shards"]
        size = validation.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a foreign tokenizer records nothing; a validation shard that cannot be read fails the runs
    digest = None
    for read in shards if isinstance(shards, list) else []:
        if isinstance(read, str) and read == (shard or validation.name):
            return (f"it was trained on a shard named {read}, the validation shard's name now ({_origin(validation)});"
                    " trained by an older nightlab, it recorded names, not contents, so it may have seen the text"
                    " that scores the runs")
        if isinstance(read, dict) and read.get("bytes") == size:
            digest = digest or file_digest(validation)
            if read.get("sha256") == digest:
                return (f"it was trained on the text of {_origin(validation)}, the validation shard now, and must"
                        " not have seen the text that scores the runs")
    return None


def learnt_from(data_dir: Path) -> frozenset[tuple[int, str]] | None:
    """The shards (size, SHA-256) the data dir's tokenizer learnt from, as it records them: one folder's
    data prepared at two places has the same; None when it records none (foreign, or from before)."""
    try:
        shards = json.loads((Path(data_dir) / TOKENIZER_FILE).read_text(encoding="utf-8"))["trained_on"]["shards"]
        return frozenset((shard["bytes"], shard["sha256"]) for shard in shards) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _encoding_from_spec(spec: dict[str, Any]) -> tiktoken.Encoding:
    ranks = {base64.b64decode(token): rank for token, rank in spec["mergeable_ranks"]}
    return tiktoken.Encoding(
        name="nightlab-bpe",
        pat_str=spec["pattern"],
        mergeable_ranks=ranks,
        special_tokens=dict(spec["special_tokens"]),
    )


def _unreadable_tokenizer(path: Path, why: str) -> DataError:
    return DataError(f"{_origin(path)} is not a tokenizer nightlab can read ({why}); move it aside and run"
                        " `nightlab prepare`, which trains one on the data dir's shards")


class Tokenizer:
    """Upstream's tokenizer API over a tiktoken Encoding whose first special token is BOS."""

    def __init__(self, enc: tiktoken.Encoding) -> None:
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir: str | Path | None = None) -> Tokenizer:
        """Load `<tokenizer_dir>/tokenizer.json` (default: the data dir's `tokenizer/`)."""
        directory = Path(tokenizer_dir) if tokenizer_dir is not None else get_data_dir() / TOKENIZER_DIR
        path = directory / Path(TOKENIZER_FILE).name
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(
                f"no tokenizer at {path}. Run `python prepare.py --source ...` first, or set "
                f"{ENV_DATA_DIR} to a prepared data dir."
            ) from None
        except ValueError as e:  # cut short, or not text
            raise _unreadable_tokenizer(path, f"not JSON: {e}") from None
        if not isinstance(spec, dict) or spec.get("format") != TOKENIZER_FORMAT:
            found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
            raise _unreadable_tokenizer(path, f"format {found!r}, expected {TOKENIZER_FORMAT!r}")
        try:
            return cls(_encoding_from_spec(spec))
        except (ValueError, KeyError, TypeError) as e:
            raise _unreadable_tokenizer(path, f"{type(e).__name__}: {e}") from None

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    @overload
    def encode(self, text: str, prepend: int | str | None = None, num_threads: int = 8) -> list[int]: ...
    @overload
    def encode(self, text: list[str], prepend: int | str | None = None, num_threads: int = 8) -> list[list[int]]: ...
    def encode(
        self, text: str | list[str], prepend: int | str | None = None, num_threads: int = 8
    ) -> list[int] | list[list[int]]:
        """Token ids of a string (list[int]) or of a list of strings (list[list[int]]).

        Special-token text in the input is encoded as ordinary text; `prepend` (an id or a
        special token's name) is put in front of every sequence.
        """
        if isinstance(text, str):
            rows = [self.enc.encode_ordinary(text)]
        elif isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        else:
            raise TypeError(f"Invalid input type: {type(text)}")
        if prepend is not None:
            prepend_id = prepend if isinstance(prepend, int) else self.enc.encode_single_token(prepend)
            for row in rows:
                row.insert(0, prepend_id)
        return rows[0] if isinstance(text, str) else rows

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_byte_lengths(self) -> list[int]:
        """Bytes each token stands for; 0 for special tokens.

        Taken from the raw token bytes: decoding a token to str first (upstream) turns a
        partial UTF-8 sequence into a 3-byte U+FFFD and miscounts the bytes of the text.
        """
        special_ids = {self.enc.encode_single_token(name) for name in self.enc.special_tokens_set}
        return [
            0 if token_id in special_ids else len(self.enc.decode_single_token_bytes(token_id))
            for token_id in range(self.enc.n_vocab)
        ]


def get_token_bytes(device: Any = "cpu", tokenizer: Tokenizer | None = None):
    """int32 tensor [vocab]: bytes per token id (0 for special tokens), on `device`.

    Uses `tokenizer`, or the one in the data dir in force.
    """
    import torch  # lazy: the daemon imports this module and must never load torch

    tokenizer = tokenizer or Tokenizer.from_directory()
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------
# Dataloader and evaluation (imported by train.py)
# ---------------------------------------------------------------------------


def _default_device(torch: Any) -> Any:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _document_batches(paths: list[Path], tokenizer_batch_size: int = 128) -> Iterator[tuple[list[str], int]]:
    """Endless (documents, epoch) batches from the shards, in file order."""
    epoch = 1
    while True:
        found = False
        for path in paths:
            for docs in _row_groups(path):
                for i in range(0, len(docs), tokenizer_batch_size):
                    found = True
                    yield [d or "" for d in docs[i : i + tokenizer_batch_size]], epoch
        if not found:  # shards emptied after prepare: the loop would spin forever, waiting for a document
            raise _no_documents(paths)
        epoch += 1


def _no_documents(paths: list[Path]) -> DataError:
    return DataError(f"no documents in {', '.join(p.name for p in paths)} in {paths[0].parent}:"
                     " prepare the data again (`nightlab prepare`)")


def data_problem(data_dir: Path, claim: str) -> DataError | None:
    """What is wrong with the training data a run read (`training_view`'s folder), by the harness's
    own reading: the tokenizer loaded, and each training shard that `claim` (train.py's `FAIL: data:`
    words) names read through, by its name or by the file a user replaces (`_origin`, as the
    harness's DataError names it); None when all of that reads. `run` asks before it says a run's
    data failed: train.py's own word is no proof. Only the data dir's own files are read, so a claim
    about a file elsewhere finds nothing. Reading every shard took time that grows with the data
    dir's bytes (4.8 s for 6,500 small shards, 1.2 GB; climbmix's shards are far larger)."""
    try:
        Tokenizer.from_directory(Path(data_dir) / TOKENIZER_DIR)
        paths = split_shards(Path(data_dir))[0]
        named = [path for path in paths if path.name in claim or str(_origin(path)) in claim]
        if sum(len(column) for path in named for column in _text_columns(path)) == 0 and named == paths:
            raise _no_documents(paths)  # all read, none skipped: what `_document_batches` met
    except DataError as e:
        return e
    return None


def _split_paths(split: str, data_dir: Path) -> list[Path]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train_paths, val_path = split_shards(data_dir)
    if split == "train":
        return train_paths
    if val_path is None:
        raise PrepareError(
            f"{data_dir} holds no validation data: train.py runs without it, and the harness scores the"
            " trained model itself (`python prepare.py run`); do not evaluate in train.py"
        )
    return [val_path]


def _tokenized_batches(tokenizer: Tokenizer, paths: list[Path], keep_docs: int) -> Iterator[tuple[list[list[int]], int]]:
    """`_document_batches` tokenized, BOS first. Shards of at most `keep_docs` documents in all (the
    loader's buffer, which then holds every one of them anyway) are tokenized once and replayed: the
    buffer went round such shards many times, tokenizing each document again on every round and
    holding a copy per round (a validation shard of one 8M-character row had not been scored after 2
    minutes). The same rows either way: nothing changes a tokenized document."""
    bos = tokenizer.get_bos_token_id()
    kept: list[list[list[int]]] | None = []
    count = 0
    for docs, epoch in _document_batches(paths):
        if epoch > 1 and kept is not None:
            break
        encoded = tokenizer.encode(docs, prepend=bos)
        if kept is not None:
            count += len(encoded)
            kept.append(encoded)
            if count > keep_docs:  # larger shards: read again each round, as always
                kept = None
        yield encoded, epoch
    epoch = 2
    while kept is not None:
        for encoded in kept:
            yield encoded, epoch
        epoch += 1


def packed_rows(tokenizer: Tokenizer, paths: list[Path], T: int, buffer_size: int = 1000) -> Iterator[tuple[list[int], int]]:
    """Endless (row of T+1 token ids, epoch): BOS-aligned best-fit packing (upstream's).

    Every row starts at a document start (BOS); each step takes the longest buffered document
    that fits the rest of the row, and when none fits, crops the shortest to fill it exactly.
    No padding. Deterministic for given shards."""
    row_capacity = T + 1
    batches = _tokenized_batches(tokenizer, paths, buffer_size)
    doc_buffer: list[list[int]] = []
    epoch = 1
    while True:
        row: list[int] = []
        while len(row) < row_capacity:
            while len(doc_buffer) < buffer_size:
                docs, epoch = next(batches)
                doc_buffer.extend(docs)
            remaining = row_capacity - len(row)
            best_idx, best_len = -1, 0
            for i, doc in enumerate(doc_buffer):
                if best_len < len(doc) <= remaining:
                    best_idx, best_len = i, len(doc)
            if best_idx >= 0:
                row.extend(doc_buffer.pop(best_idx))
            else:
                shortest = min(range(len(doc_buffer)), key=lambda i: len(doc_buffer[i]))
                row.extend(doc_buffer.pop(shortest)[:remaining])
        yield row, epoch


def make_dataloader(
    tokenizer: Tokenizer, B: int, T: int, split: str, buffer_size: int = 1000, device: Any = None
) -> Iterator[tuple[Any, Any, int]]:
    """Endless (inputs [B, T], targets [B, T], epoch) from the data dir in force.

    Rows come from `packed_rows` and are shifted by one into inputs and targets.

    device: default cuda, else mps, else cpu. On CUDA the batch goes through pinned memory
    with a non-blocking copy and the yielded tensors are reused buffers (upstream's
    behaviour: consume a batch before asking for the next); elsewhere they are fresh.
    """
    import torch  # lazy: the daemon imports this module and must never load torch

    paths = _split_paths(split, get_data_dir())
    device = torch.device(device) if device is not None else _default_device(torch)
    rows_iter = packed_rows(tokenizer, paths, T, buffer_size)
    if device.type == "cuda":
        cpu_buffer = torch.empty(2 * B * T, dtype=torch.long, pin_memory=True)
        gpu_buffer = torch.empty(2 * B * T, dtype=torch.long, device=device)
        copied = torch.cuda.Event()  # the pinned buffer may be refilled once this has passed
        copied.record()

    while True:
        rows = []
        for _ in range(B):
            row, epoch = next(rows_iter)
            rows.append(row)
        batch = torch.tensor(rows, dtype=torch.long)
        if device.type == "cuda":
            copied.synchronize()
            cpu_buffer[: B * T].view(B, T).copy_(batch[:, :-1])
            cpu_buffer[B * T :].view(B, T).copy_(batch[:, 1:])
            gpu_buffer.copy_(cpu_buffer, non_blocking=True)
            copied.record()
            yield gpu_buffer[: B * T].view(B, T), gpu_buffer[B * T :].view(B, T), epoch
        else:
            yield batch[:, :-1].contiguous().to(device), batch[:, 1:].contiguous().to(device), epoch


def scored_shape(seq_len: int, eval_tokens: int) -> tuple[int, int]:
    """(T, n): the scored rows' length and count, EVAL_TOKENS // MAX_SEQ_LEN rows of MAX_SEQ_LEN + 1
    tokens (held-out slices are as many rows after them); PrepareError when not one row fits."""
    n = eval_tokens // seq_len
    if n < 1:
        raise PrepareError(f"EVAL_TOKENS={eval_tokens} is less than one row of {seq_len}; raise {ENV_EVAL_TOKENS}")
    return seq_len, n


def scored_rows_key(data_dir: Path) -> str:
    """What the scored rows are made of, as `cached_rows` keys them: the tokenizer's and the
    validation shard's content digests (12 hex digits each, joined by `-`)."""
    tok_hash = hashlib.sha256((Path(data_dir) / TOKENIZER_FILE).read_bytes()).hexdigest()[:12]
    # Keyed by the shard's content, not its name and size: a validation file replaced by one of the
    # same size (or another file under the shard's name) had its runs scored on the old file's rows.
    val_hash = file_digest(_split_paths("val", data_dir)[0])[:12]
    return f"{tok_hash}-{val_hash}"


def eval_cache_file(data_dir: Path, key: str, T: int, start: int, n: int) -> Path:
    """Where `cached_rows` keeps validation rows start..start+n of length T+1 made of `key` (made or not)."""
    return Path(data_dir) / EVAL_CACHE_DIR / f"{key}-T{T}-rows{start}+{n}.pt"


def cache_scored_rows(data_dir: Path, environ: Mapping[str, str], key: str) -> None:
    """Make the cache file of the rows the built-in scorer started with `environ` scores, if missing,
    before the training command starts. A cache file that appears or changes while a run trains is
    removed after it (`tampered_data`): slots sharing the data dir, their scorers writing it while
    another trained, removed it for each other, and nearly every run tokenized the rows again (on an
    H200, 40.2 s of scoring for the default 21M tokens, 5.7 s of it the eval loop). Made here, before
    this run trains, it is only read while runs of this data dir train. key: `scored_rows_key(data_dir)`."""
    settings = harness_settings(environ)
    T, n = scored_shape(settings["MAX_SEQ_LEN"], settings["EVAL_TOKENS"])
    if not eval_cache_file(data_dir, key, T, 0, n).is_file():
        cached_rows(Tokenizer.from_directory(Path(data_dir) / TOKENIZER_DIR), data_dir, T, 0, n, key)


def cached_rows(tokenizer: Tokenizer, data_dir: Path, T: int, start: int, n: int, key: str | None = None):
    """int32 tensor [n, T+1]: validation rows start..start+n of `packed_rows`, tokenized once per
    data dir (cached in its eval-cache/, keyed by the tokenizer, the shard's content and the shape), not
    once per run. Rows of other text or another tokenizer are removed as these are written.
    key: `scored_rows_key(data_dir)`, when the caller has it (None: found here)."""
    import torch  # lazy: the daemon imports this module and must never load torch

    paths = _split_paths("val", data_dir)
    key = scored_rows_key(data_dir) if key is None else key
    path = eval_cache_file(data_dir, key, T, start, n)
    if path.is_file():
        try:
            rows = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            rows = None  # a torn or foreign file: made again below
        if rows is not None and tuple(rows.shape) == (n, T + 1):
            return rows
    it = packed_rows(tokenizer, paths, T)
    rows_list = []
    for i, (row, epoch) in enumerate(it):
        if i >= start:
            rows_list.append(row)
        if len(rows_list) == n:
            break
    rows = torch.tensor(rows_list, dtype=torch.int32)
    if not (rows != tokenizer.get_bos_token_id()).any():  # nothing to score: bpb would divide by zero bytes
        raise DataError(f"{_origin(paths[0])}, the validation shard, holds no text (every `text` is empty): put"
                        " documents in it, or make a file with text the last by name, and run `nightlab prepare`")
    distinct = len({tuple(row) for row in rows_list})
    if distinct < n:  # a shard of few documents, or of documents longer than a row (cut to their first tokens)
        print(f"note: only {distinct} of the {n} {'held-out' if start else 'scored'} rows differ: the validation shard"
              f" {_origin(paths[0])} holds too few documents for them (one longer than a row is cut to its first"
              f" {T + 1} tokens; {ENV_EVAL_TOKENS} sets how many are scored); a last file with more scores more text",
              file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(rows, tmp)
    os.replace(tmp, path)
    for other in path.parent.glob("*.pt"):  # no run scores on them again: each can be tens of MB
        if not other.name.startswith(f"{key}-"):
            other.unlink(missing_ok=True)
    return rows


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (hex), read in blocks: a shard may be gigabytes. The engine's
    record of what runs are scored on (loop/dataid.py) hashes the validation shard with it too."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def evaluate_bpb(model: Any, tokenizer: Tokenizer, batch_size: int) -> float:
    """Bits per byte on the validation shard: THE metric, fixed so runs stay comparable.

    Contract: `model(x, y, reduction='none')` takes inputs and targets [B, T] (long) and
    returns the per-token cross-entropy in nats, B*T values in any shape. Scores the first
    EVAL_TOKENS // (batch_size * MAX_SEQ_LEN) batches of the validation loader (it cycles
    if the shard is shorter) on the model's device. bpb = sum of nats over target tokens /
    (ln 2 * sum of their UTF-8 bytes); special-token targets (0 bytes, e.g. BOS) are left
    out of both sums, so the value does not depend on the vocabulary.
    """
    import torch  # lazy: the daemon imports this module and must never load torch

    steps = EVAL_TOKENS // (batch_size * MAX_SEQ_LEN)
    if steps < 1:
        raise ValueError(
            f"EVAL_TOKENS={EVAL_TOKENS} is less than one batch ({batch_size} x {MAX_SEQ_LEN}); "
            f"raise {ENV_EVAL_TOKENS} or lower the batch size"
        )
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = param.device if param is not None else _default_device(torch)
    token_bytes = get_token_bytes(device, tokenizer)
    val_loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val", device=device)
    total_nats = 0.0
    total_bytes = 0
    with torch.no_grad():
        for _ in range(steps):
            x, y, _ = next(val_loader)
            loss = model(x, y, reduction="none").reshape(-1).float()
            nbytes = token_bytes[y.reshape(-1)]
            total_nats += loss[nbytes > 0].sum().item()
            total_bytes += nbytes.sum().item()
    return total_nats / (math.log(2) * total_bytes)


# ---------------------------------------------------------------------------
# `python prepare.py run`: train without the validation shard, then score in the harness
# ---------------------------------------------------------------------------

# Lines of the training command that could pose as the harness's result, or as its word that the data
# failed (which pauses the night for a person, and runs the change again): shown with a prefix.
_POSING = re.compile(r"^\s*(---\s*$|METRIC\s|REJECTED:|FAIL:)")
_CLAIMED = re.compile(r"^\s*(?:val_bpb:\s+|METRIC\s+val_bpb=)(\S+)\s*$")
TRAIN_PREFIX = "train.py| "
LINE_PIECE = 1 << 16  # bytes of a command's output line passed on at a time (`_stream`)


def _link(src: Path, dest: Path) -> None:
    """A hard link (no path back to the source), a symlink across file systems."""
    try:
        os.link(src, dest)
    except FileExistsError:  # another slot made it a moment ago
        pass
    except OSError:
        try:
            os.symlink(src, dest)
        except FileExistsError:
            pass


def _same_file(a: Path, b: Path) -> bool:
    """True also when one cannot be read (a source folder moved away): a link made before is kept,
    and the run that reads it says what is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return True


def training_view(data_dir: Path) -> Path:
    """The data dir train.py gets under `run`: its training shards and tokenizer, no validation
    shard (<data_dir>.train next to it, updated in place; safe for several slots at once)."""
    data_dir = Path(data_dir)
    train_paths, val_path = split_shards(data_dir)
    if val_path is None:
        return data_dir
    for path in train_paths:
        if path.resolve() == val_path.resolve():  # links to one file (a source folder's shards are links)
            raise DataError(f"{path.name} and {val_path.name} in {data_dir} are one file ({path.resolve()}): train.py"
                            " would train on the text that scores it; run `nightlab prepare` again")
    try:
        tokenizer = (data_dir / TOKENIZER_FILE).read_bytes()
    except FileNotFoundError:
        raise DataError(f"no tokenizer at {data_dir / TOKENIZER_FILE} (removed since it was prepared?); run"
                           " `nightlab prepare` again, which trains it on the same shards") from None
    view = training_view_dir(data_dir)
    try:
        _fill_view(view, train_paths, tokenizer)
    except OSError as e:  # a data dir prepared by another user, in a folder this one cannot write
        raise DataError(f"cannot make {view}, the data dir as train.py reads it, kept next to the data dir"
                        f" ({e.strerror}: {e.filename}): make {view.parent} writable for this user, or prepare the"
                        " data in a folder it can write (data.cache_dir, then `nightlab prepare`)") from None
    return view


def _view_lost(view: Path, data_dir: Path) -> DataError | None:
    """`training_view`'s folder missing a file of its data dir's after a run (removed by a cleanup
    while the run trained), or None. The data dir itself is intact (`run` has refused a run that
    changed it), and the next run's `training_view` makes the folder again: nothing to prepare."""
    if view == data_dir:  # no validation shard: train.py read the data dir itself
        return None
    if all((view / name).is_file() for name in [TOKENIZER_FILE, *(p.name for p in split_shards(data_dir)[0])]):
        return None
    return DataError(f"{view}, the data dir as train.py reads it, lost files while this run trained (removed by a"
                     f" cleanup?); the data dir {data_dir} is as it was and the next run makes the view again:"
                     " nothing to prepare")


def _fill_view(view: Path, train_paths: list[Path], tokenizer: bytes) -> None:
    """`training_view`'s folder brought up to the data dir's training shards and tokenizer."""
    (view / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in train_paths}
    for old in view.glob(SHARD_PATTERN):
        if old.name not in wanted:
            old.unlink(missing_ok=True)
    for path in train_paths:
        entry = view / path.name
        if not entry.exists():
            _link(path.resolve(), entry)
        elif not _same_file(entry, path):  # the name now holds another file (prepared again)
            # not by pid: runs in their sandboxes have pids of their own, the same in two runs
            fresh = entry.with_name(f"{entry.name}.{os.urandom(6).hex()}.tmp")
            fresh.unlink(missing_ok=True)
            _link(path.resolve(), fresh)
            os.replace(fresh, entry)
    if not (view / TOKENIZER_FILE).is_file() or (view / TOKENIZER_FILE).read_bytes() != tokenizer:
        fd, tmp = tempfile.mkstemp(dir=view / TOKENIZER_DIR, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(tokenizer)
        os.replace(tmp, view / TOKENIZER_FILE)
    (view / TRAINING_ONLY_MARKER).touch()


FileState = tuple[int, int, int, int, int]  # inode, size, mtime_ns, ctime_ns, link count


def data_files(data_dir: Path) -> dict[str, FileState]:
    """The data dir's files (shards, tokenizer, the scored rows' cache) by relative path, as stat
    sees them through links: what `run` compares before and after the training command."""
    found: dict[str, FileState] = {}
    for path in Path(data_dir).rglob("*"):
        if path.suffix == ".tmp":  # a scorer's cache file on its way in (another slot's)
            continue
        try:
            st = path.stat()
        except OSError:  # removed meanwhile
            continue
        if not path.is_dir():
            found[str(path.relative_to(data_dir))] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)
    return found


def _cached(name: str) -> bool:
    """A file of `data_files` that is the scored rows' cache (derived data, pruned by its writer)."""
    return Path(name).parts[0] == EVAL_CACHE_DIR


def _written(before: FileState, after: FileState, view_links: bool) -> bool:
    """A file's content may have changed: another inode, size or mtime, or a new ctime (which no one
    can set back), unless `view_links` (a training shard) and its link count moved with it: another
    slot's view linking the shard changes only both. Only training shards are so linked: a tokenizer
    or scored rows written in place, their mtime put back and a hard link added, had passed."""
    return before[:3] != after[:3] or (before[3] != after[3] and (before[4] == after[4] or not view_links))


def _regular_cache(data_dir: Path) -> None:
    """The scored rows' cache folder as the scorer makes it: a folder of regular files. A link in its
    place (to rows a run wrote elsewhere: the check walks no linked folder) or a link or folder in it
    (one where a cache file goes: no scorer could write the rows again) is removed."""
    cache = Path(data_dir) / EVAL_CACHE_DIR
    if cache.is_symlink() or (cache.exists() and not cache.is_dir()):
        cache.unlink()
        return
    for entry in cache.iterdir() if cache.is_dir() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_symlink() or not entry.is_file():
            entry.unlink(missing_ok=True)


def tampered_data(data_dir: Path, before: dict[str, FileState]) -> str | None:
    """What changed in the data dir while the training command ran, or None: by the training
    command, or by a person (a shard replaced, `nightlab prepare` run again) whom the check cannot
    tell from it, so the refusal is worded true of both. train.py gets a view of it whose
    shards are hard links (the same files: a write into one reaches the data dir, and a local
    source's own file), and the data dir's path can be guessed from the view's. The scored rows'
    cache is derived data: a cache file that appeared or changed is removed here, so no run is
    scored on rows written by train.py (the scorer makes it again from the validation shard), and
    is no reason to refuse the run: other slots' scorers add and replace cache files meanwhile (one
    this check removed for another run is made again, as often under the same inode number); the
    cache folder keeps regular files only (`_regular_cache`). A shard or tokenizer written or removed (the validation shard removed, the shard before it
    validates: one the run trained on), or a shard added that sorts last (it would validate), is."""
    _regular_cache(data_dir)
    after = data_files(data_dir)
    shards = {name for name in after if Path(name).match(SHARD_PATTERN) and "/" not in name}
    validation = max(shards, default=None)
    problems = []
    for name, state in sorted(after.items()):
        old = before.get(name)
        changed = old is not None and _written(old, state, view_links=name in shards and name != validation)
        if _cached(name):
            if old is None or changed:
                (Path(data_dir) / name).unlink(missing_ok=True)
        elif changed:
            problems.append(f"{_origin(Path(data_dir) / name)} (written)")
        elif old is None and name == validation:  # a training shard added (more downloaded) scores nothing
            problems.append(f"{Path(data_dir) / name} (a shard added: the last by name is the validation shard)")
    problems += [f"{Path(data_dir) / name} (removed)" for name in sorted(before.keys() - after.keys())
                 if not _cached(name)]  # the scorer's cache prunes itself
    if not problems:
        return None
    return (f"the data dir {data_dir} changed while the training command ran: {'; '.join(problems[:3])}"
            f"{f' and {len(problems) - 3} more' if len(problems) > 3 else ''}. A run is scored only on data that"
            " stayed as it was, so this one is refused. If a person changed it (a damaged shard replaced,"
            " `nightlab prepare` run again), the next run reads it as it is now; if not, the training command"
            " wrote it, damaging it for every run: put back a good copy (or remove it and run `nightlab prepare`"
            " again)")


def scorer_command(harness: Path, *args: str, command: str = "score") -> list[str]:
    """`python harness.py score ARGS` (or another of its commands) as the harness runs it after a training command that may have
    written anything next to it: -P, so harness.py's folder is not first on its path (harness.py
    puts it last: a torch.py or json.py a run left there is not what it imports; PYTHONPATH, which
    a cluster's modules set, still counts), unbuffered (its lines reach the log as they come). The
    cached bytecode of prepare.py there is removed (a .pyc of other code, dated as the source, was
    imported instead of it); the scorer compiles it again (a bytecode cache of its own, -X
    pycache_prefix, would compile all of torch at every start)."""
    for planted in (Path(harness).parent / "__pycache__").glob("prepare.*.pyc"):
        planted.unlink(missing_ok=True)
    return [sys.executable, "-P", "-u", str(harness), command, *args]


def python_roots(environ: Mapping[str, str]) -> list[Path]:
    """What the built-in scorer (this Python, with -P) imports from, as found now: PYTHONPATH's folders,
    the standard library (and its zip, where one has appeared), the site dirs with what their .pth files
    add, the user's site dir where Python reads one (made by a run, it is read by the scorer after), and
    LD_LIBRARY_PATH's folders.
    This process's path from the standard library on: before it come the script's folder (the workspace)
    and what a test runner put there."""
    import site

    bases = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    start = next((i for i, entry in enumerate(sys.path)
                  if entry and any(base in Path(entry).resolve().parents for base in bases)), 1)
    user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    # ... and the folders the dynamic loader looks in first, where a library planted shadows the one it loads
    loader = environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    entries = [*environ.get("PYTHONPATH", "").split(os.pathsep), *sys.path[start:], *user, *loader]
    found = list(dict.fromkeys(Path(entry).resolve() for entry in entries if entry and os.path.exists(entry)))
    return [f for f in found if not any(other in f.parents for other in found)]  # each file once


def installed_python(environ: Mapping[str, str], spared: Sequence[Path]) -> list[Path]:
    """The scorer's Python as installed, for a sandbox to hold read-only to what runs before the
    scorer (the training command, the agent): what of `python_roots` lies in its installation
    (beneath sys.prefix or sys.base_prefix: the standard library, the site dirs) or is the user's
    site dir, and the interpreter's folders (its link's, its binary's); none that is or holds one of
    `spared` (what that command writes). PYTHONPATH's and LD_LIBRARY_PATH's folders are left to
    `environment_changes`: they may be as wide as a home folder."""
    import site

    bases = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    user = Path(site.getusersitepackages()).resolve() if site.ENABLE_USER_SITE else None
    installed = [root for root in python_roots(environ) if root == user or any(b == root or b in root.parents for b in bases)]
    installed += sorted({Path(sys.executable).absolute().parent, Path(sys.executable).resolve().parent})
    kept = [Path(s).resolve() for s in spared]
    return [path for path in dict.fromkeys(installed) if not any(path == s or path in s.parents for s in kept)]


# a file's ctime comes from the kernel's coarse clock, up to a tick (1-10 ms) behind time.time(): a rename
# 3 ms after a time taken just before it had an earlier ctime than that time (seen here)
CTIME_LAG_S = 0.05


def environment_changes(since: float, environ: Mapping[str, str], spared: Sequence[Path]) -> list[str] | None:
    """The files in the scorer's Python (`python_roots`, beneath none of `spared`; and the interpreter, its
    link, its shared library and its virtual environment's pyvenv.cfg) whose inode changed
    after `since` (ctime: written, linked, renamed or made; no process can set it back), by `find` (a
    walk of ~100k files in a third of a second; Python's own took ten times that). A bytecode cache
    written meanwhile (any Python importing a module writes one) is removed instead: Python compiles
    it again from its source, and one planted there is never run. None where `find` could not say."""
    import subprocess

    since -= CTIME_LAG_S
    try:
        found = subprocess.run(["find", *map(str, python_roots(environ)), "!", "-type", "d", "-newerct",
                                f"@{since:.6f}", "-print0"], capture_output=True, check=False)
    except OSError:
        return None
    if found.returncode != 0 and not found.stdout:
        return None
    changed = []
    for path in (Path(os.fsdecode(raw)) for raw in found.stdout.split(b"\0") if raw):
        if any(path.is_relative_to(folder) for folder in spared):
            continue
        if path.parent.name == "__pycache__":
            if path.suffix != ".pyc":  # a .pyc being written (its temporary name): Python reads only .pyc there
                continue
            try:
                path.unlink(missing_ok=True)
                continue
            except OSError:
                pass
        changed.append(str(path))
    # the interpreter: its link (one made anew may name another Python), its binary and its shared library
    libpython = Path(str(sysconfig.get_config_var("LIBDIR")), str(sysconfig.get_config_var("LDLIBRARY")))
    for which in (Path(sys.executable), Path(sys.executable).resolve(), libpython, Path(sys.prefix, "pyvenv.cfg")):
        try:
            if os.lstat(which).st_ctime > since:
                changed.append(str(which))
        except OSError:
            pass
    return sorted(changed)


PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # prctl(2), Linux
LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture
ENV_SANDBOX = "NIGHTLAB_SANDBOX"  # 0: the scorer's model processes run unconfined (harness.confine)
# the run's sandbox launcher, offered by a whole one to the command it runs (loop/executors/sandbox.py)
ENV_SANDBOX_LAUNCHER = "NIGHTLAB_SANDBOX_LAUNCHER"
# The calls harness.confine denies a model process (seccomp), by machine (its audit arch, the calls'
# numbers), also read by `nightlab doctor`: what a model could talk to a sibling model process through
# where landlock does not reach: sockets (UDP), System V shared memory, message queues and semaphores,
# POSIX message queues, the kernel's keyrings (the user's keyring is every process's of the user, and a
# key outlives the process that added it: the probe's process read the scored one's calls there after
# it was killed), and io_uring (its IORING_OP_SOCKET makes a socket without socket()).
# (socket, socketpair, shmget, msgget, semget, mq_open, add_key, request_key, keyctl, io_uring_setup)
SECCOMP_DENIED = {"x86_64": (0xC000003E, (41, 53, 29, 68, 64, 240, 248, 249, 250, 425)),
                   "aarch64": (0xC00000B7, (198, 199, 194, 186, 190, 180, 217, 218, 219, 425))}


def landlock_abi() -> int:
    """The kernel's landlock ABI version, which the scorer's model processes confine themselves with
    (harness.confine); 0 where there is none (not Linux, a kernel before 5.13, or landlock left out
    of its `lsm=` list)."""
    import ctypes

    if sys.platform != "linux":
        return 0
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return 0
    return max(0, syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))  # its version


def subreaper(on: bool | None = None) -> bool | None:
    """Whether this process is its descendants' subreaper (orphans are reparented to it, not to init),
    after setting it when `on` is given; None where prctl is not there (not Linux)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    if on is not None:
        prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    state = ctypes.c_int()
    return None if prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(state), 0, 0, 0) != 0 else bool(state.value)


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc (empty where there is none). Not psutil: the harness runs
    in the trainer's environment, where only torch's stack, pyarrow and tiktoken may be installed."""
    parents = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue  # gone meanwhile
        if stat:
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


@contextlib.contextmanager
def reaping() -> Iterator[set[int]]:
    """This process as its descendants' subreaper (`subreaper`) for the block, and as it was after; gives
    its children as the block begins: what `end_leftovers` spares."""
    was = subreaper()
    if was is False:
        subreaper(True)
    try:
        yield children()
    finally:
        if was is False:
            subreaper(False)


def children() -> set[int]:
    return {pid for pid, parent in _parents().items() if parent == os.getpid()}


def end_leftovers(known: set[int]) -> None:
    """Kill the processes reparented here (the subreaper) that are none of `known`, with theirs, and
    reap them; again until none is left (one killed while it forked leaves its child here)."""
    import signal

    for _ in range(100):
        parents = _parents()
        doomed = {pid for pid, parent in parents.items() if parent == os.getpid()} - known
        if not doomed:
            return
        tree = set(doomed)
        while grown := {pid for pid, parent in parents.items() if parent in tree} - tree:
            tree |= grown
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # gone meanwhile
        for pid in doomed:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def data_paths(data_dir: Path) -> list[Path]:
    """The data dir, its training view (`training_view_dir`, made or not) and the files its shards
    and tokenizer are where they lie outside it (a local source's, linked: the view's hard links are
    those files too)."""
    inside = data_dir.resolve()
    outside = {Path(os.path.realpath(entry)) for entry in [*data_dir.glob(SHARD_PATTERN), data_dir / TOKENIZER_FILE]}
    return [data_dir, training_view_dir(data_dir), *sorted(p for p in outside if not p.is_relative_to(inside))]


def read_only_to(command: str, environ: Mapping[str, str], paths: Sequence[Path]) -> str:
    """`command` in a sandbox nested in the run's, where `paths` are read-only: a training command
    cannot write the data, the scored rows' cache, the code that scores nor the scorer's Python,
    rather than be caught after (`tampered_data`, `environment_changes`, which stay for where there
    is no such sandbox: the run's refused by the kernel, NIGHTLAB_SANDBOX=0, Slurm, not Linux).
    Unchanged where the run has none to offer."""
    launcher = environ.get(ENV_SANDBOX_LAUNCHER, "").strip()
    if not launcher:
        return command
    paths_args = [arg for path in dict.fromkeys(paths) for arg in ("--read-only", str(path))]
    return shlex.join([*shlex.split(launcher), *paths_args, "--", "/bin/sh", "-c", command])


def _stream(command: str, env: dict[str, str], on_line: Callable[[str], str]) -> int:
    """Run a shell command (in our process group, so a kill of the run reaches it), copy its
    output line by line through on_line to our stdout; its exit code. What it leaves running when it
    ends (a process detached by a double fork or a new session, reparented here) is killed before
    this returns: one left by a training command wrote the scored rows' cache after the checks that
    follow, as the scorer started, and could stay to write into the runs after (Linux; elsewhere
    such a process lives on)."""
    import subprocess

    with reaping() as before:
        proc = subprocess.Popen(command, shell=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # once the command ends, what it left: a leftover holding the output open would keep the loop below reading
        def when_ended() -> None:
            proc.wait()
            end_leftovers(before | {proc.pid})

        ender = threading.Thread(target=when_ended, daemon=True)
        ender.start()
        try:
            return _passed_on(proc, on_line)
        finally:
            if proc.poll() is not None:  # not when our own failure ends the reading: the command may run on
                ender.join()


def _passed_on(proc: Any, on_line: Callable[[str], str]) -> int:
    assert proc.stdout is not None
    output, out = proc.stdout, sys.stdout.buffer
    # at most LINE_PIECE bytes at a time: output that never ends its line (progress redrawn with `\r`,
    # or without end) was held here whole, the memory growing while the log did not (a stalled run to
    # the heartbeat). A line passed on in pieces is not read from a piece's start: the prefix still
    # lands before anything that could pose as a line of the harness's.
    for raw in iter(lambda: output.readline(LINE_PIECE), b""):
        out.write(on_line(raw.decode("utf-8", errors="replace")).encode("utf-8"))
        out.flush()
    return proc.wait()


def run(train_command: str, score_command: str | None = None, environ: Mapping[str, str] | None = None,
        protected: Sequence[str] = ()) -> int:
    """Train, then score: the run command of the built-in trainer (and of a project that names
    its own score command).

    The training command runs with a data dir that has no validation shard and must save its
    model to $NIGHTLAB_ARTIFACT_DIR; its output is passed on, with any line that could pose as
    the result (`---`, METRIC, REJECTED) or as a failure's cause (FAIL) prefixed. One that failed
    saying its data did (`FAIL: data: …`) has the data it read checked (`data_problem`): only bad data
    found there is said as the run's data failure. Then the score command runs in its own process
    with the full data dir. score_command None: the built-in scorer (harness.py next to this
    file), whose output is filtered the same way (it imports train.py's model code) and whose
    result comes back in a file this process prints; a project's own score command prints its
    result itself. A val_bpb the training command printed is shown beside, never used. The code that
    scores (the built-in scorer's files, or `protected`: a project's score script) must be as it was
    after the training command, or the run is refused. In a local run's sandbox the training command
    cannot write these, nor the data (`read_only_to`); the checks after it stay for where it can."""
    started = time.time()
    env = dict(os.environ if environ is None else environ)
    env[ENV_RUN_STARTED] = f"{started:.3f}"
    env["PYTHONUNBUFFERED"] = "1"  # progress lines reach the log as they happen (stall detection)
    # The run shares the CPU with the daemon, the engine and the bot: OpenMP workers spinning while they
    # wait take the cores the others need (a tiny CPU run trained 1.5-4x slower on a busy 2-core box).
    # They sleep instead; a policy set in the environment wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    artifact = Path(env.get(ENV_ARTIFACT_DIR, "").strip() or DEFAULT_ARTIFACT_DIR).resolve()
    shutil.rmtree(artifact, ignore_errors=True)  # never score a model an earlier run left
    artifact.mkdir(parents=True, exist_ok=True)  # emptied, not removed, where the run's sandbox bound it
    env[ENV_ARTIFACT_DIR] = str(artifact)
    if score_command is None and Path("train.py").is_file():  # the scorer builds the model with the code that trained it
        shutil.copyfile("train.py", artifact / "train.py")
    harness = Path(__file__).resolve().with_name("harness.py")
    # the code that scores, in the training command's reach: the built-in scorer's (a single slot runs in
    # the workspace), or a project's protected files (its score script); hash-checked before the run by
    # the engine, and here after the training command, which the score command runs after
    watched = [Path(__file__).resolve(), harness] if score_command is None else [Path(p).resolve() for p in protected]
    scorer_files = {path: path.read_bytes() for path in watched if path.is_file()}
    # ... and the train.py it builds the model with: the commit's, which the training command could replace
    scored_code = (artifact / "train.py").read_bytes() if (artifact / "train.py").is_file() else None
    train_env = dict(env)
    view, data_dir, data_before = None, None, {}
    keyed: list[str] = []  # the scorer's --rows-key, where this process hashed the data dir
    if env.get(ENV_DATA_DIR, "").strip():
        try:
            view = training_view(Path(env[ENV_DATA_DIR]))
        except PrepareError as e:
            print(f"FAIL: {fail_text(e)}", flush=True)
            return 1
        train_env[ENV_DATA_DIR] = str(view)
        data_dir = Path(env[ENV_DATA_DIR])
        data_before = data_files(data_dir)
        if score_command is None:
            # The scorer gets the rows' key hashed here, not hashing the shard again after training: the
            # shards and tokenizer are held to how stat saw them before this hash (`tampered_data`), so
            # a run whose training (or anyone) wrote them since is refused, never scored on stale rows.
            try:
                rows_key = scored_rows_key(data_dir)
                cache_scored_rows(data_dir, env, rows_key)
                keyed = ["--rows-key", rows_key]
            except PrepareError as e:  # the scorer would fail the same way, after the training
                print(f"FAIL: {fail_text(e)}", flush=True)
                return 1
            # the cache files as made now, not as before: one made here is no file that appeared in training
            data_before.update((name, state) for name, state in data_files(data_dir).items() if _cached(name))
    claimed: list[str] = []
    blamed: list[str] = []  # train.py's word that its data failed (the harness's hook in its process says it)

    def untrusted(line: str) -> str:
        # by the lines the log's parser reads (str.splitlines: a `\r` starts one too), so that
        # `progress\rMETRIC val_bpb=0.5` gets its prefix where the parser would read it
        parts = line.splitlines(keepends=True)
        claimed.extend(match.group(1) for part in parts if (match := _CLAIMED.match(part)))
        blamed.extend(part for part in parts if part.lstrip().startswith(DATA_FAIL))
        return "".join(TRAIN_PREFIX + part if _POSING.match(part) else part for part in parts)

    read_only = [*scorer_files, *([artifact / "train.py"] if scored_code is not None else [])]
    if data_dir is not None:
        read_only += data_paths(data_dir)
    if score_command is None:  # the built-in scorer's Python: a .pth file planted there runs in it
        read_only += installed_python(env, [Path.cwd(), artifact])
    began = time.monotonic()
    code = _stream(read_only_to(train_command, env, read_only), train_env, untrusted)
    # a failed run is compared with nothing; a step budget is counted in steps, which a larger model
    # takes longer to make (the tiny profile's): the wall clock says nothing of it there
    if code == 0 and not env.get(ENV_BUDGET_STEPS, "").strip():
        print(f"METRIC {TRAINING_WALL}={time.monotonic() - began:.1f}", flush=True)
    # whatever its exit code: a cache file it wrote must not score a later run
    tampered = [tampered_data(data_dir, data_before) if data_dir is not None else None]
    if score_command is None:  # the built-in scorer runs in this Python; a project's own score command, its own
        try:
            since = min(started, float(env.get(ENV_PYTHON_SINCE, "")))
        except ValueError:
            since = started
        spared = [Path.cwd().resolve(), artifact, *(p.resolve() for p in (data_dir, view) if p is not None)]
        changes = environment_changes(since, env, spared)
        if changes is None:
            print("note: the Python environment could not be checked for changes (`find` is missing here, or failed)", flush=True)
        elif changes:  # said first: the engine pauses the night on it, whatever else the run did
            shown = ", ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")
            tampered.insert(0, f"{PYTHON_CHANGED} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
                               f" ({shown}): what is there runs in the scorer's process (a .pth file in a site dir,"
                               " as it starts), so nothing is scored until it is checked: remove what you did not"
                               " install (`pip install --force-reinstall <package>` puts a package back)")
    if scored_code is not None and (artifact / "train.py").is_file() and (artifact / "train.py").read_bytes() != scored_code:
        tampered.append(f"the training command replaced {artifact / 'train.py'}, the code the harness builds the model"
                        " with: a run is scored with the train.py it committed")
    changed = [path.name for path, text in scorer_files.items() if not path.is_file() or path.read_bytes() != text]
    if changed:  # said last: the refusal starts with HARNESS_CHANGED only when nothing else was tampered with
        tampered.append(f"{HARNESS_CHANGED} ({', '.join(changed)}): the run wrote it, or a person edited it meanwhile;"
                        " a run must not write the protected files, nor anyone while a run is in flight: `git checkout`"
                        " them, or `nightlab doctor` says how")
    if any(tampered):  # each said: a shard written stays damaged for the runs after this one
        print(f"REJECTED: {'. Also, '.join(why for why in tampered if why)}", flush=True)
        return REJECTED_EXIT
    if code != 0:
        lost = _view_lost(view, data_dir) if view is not None and data_dir is not None else None
        if lost is not None:  # whatever train.py said: its data went from under it, through no change's fault
            print(f"FAIL: {fail_text(lost)}", flush=True)
            return code
        if blamed and view is not None:
            found = data_problem(view, "\n".join(blamed))
            if found is not None:  # the harness's own word, the line the engine pauses the night on
                print(f"FAIL: {fail_text(found)}", flush=True)
                return code
            print("note: train.py said its data failed, but the tokenizer and the training shards it named read"
                  " well: the failure is its own", flush=True)
        print(f"FAIL: the training command exited with code {code}", flush=True)
        return code
    if score_command is not None:
        # a score command that copes with nothing would score no training (the folder may be gone:
        # a training command's own clean)
        if not artifact.is_dir() or not any(artifact.iterdir()):
            print(f"REJECTED: the training command saved nothing in ${ENV_ARTIFACT_DIR} ({artifact}) for the score"
                  " command to score", flush=True)
            return 1
        code = _stream(score_command, env, lambda line: line)
        if code != 0:  # the log's last line says which step failed, as for the training command
            print(f"FAIL: the score command exited with code {code}", flush=True)
        scored = None
    else:
        result_path = Path(tempfile.mkdtemp(prefix="nightlab-score-")) / "result.json"
        command = scorer_command(harness, "--artifact", str(artifact), "--result", str(result_path), *keyed)
        code = _stream(shlex.join(command), env, untrusted)
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            print(f"FAIL: the scorer exited with code {code} and left no result", flush=True)
            return code or 1
        finally:
            shutil.rmtree(result_path.parent, ignore_errors=True)
        print_result(result, started)
        scored = result.get("bpb")
    if claimed:
        differs = scored is None or _number_or_none(claimed[-1]) != round(scored, 6)
        print(f"note: train.py printed val_bpb {claimed[-1]}; ignored"
              + (f" (DIFFERS from the harness's {scored:.6f})" if differs and scored is not None else ""), flush=True)
        if _number_or_none(claimed[-1]) is not None:  # recorded beside the harness's figure
            print(f"METRIC claimed_val_bpb={claimed[-1]}", flush=True)
    return code


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _tokens_spec(millions: float | None) -> str:
    """Upstream's one decimal; under a million tokens (the tiny profile's) every token, which one
    decimal showed as 0.0. Still a plain number, as every reader of the block parses it."""
    return ".1f" if millions is None or millions >= 1 else ".6f"


def print_result(result: dict[str, Any], run_started: float | None) -> None:
    """The scorer's result as the daemon reads it: upstream's summary block (names, order,
    formats) then METRIC lines; `heldout_bpb` for a held-out slice; a REJECTED or FAIL line."""
    if "rejected" in result:
        print(f"REJECTED: {result['rejected']}", flush=True)
        return
    if "error" in result:
        print(f"FAIL: {result['error']}", flush=True)
        return
    if result.get("split") == "heldout":
        print(f"---\nheldout_bpb:      {result['bpb']:.6f}\nMETRIC heldout_bpb={result['bpb']:.6f}\n"
              f"METRIC heldout_slice={result['slice']}", flush=True)
        return
    train = result["train"]
    total = time.time() - run_started if run_started else None

    def figure(key: str, spec: str) -> float | int | None:
        return _figure(train.get(key), spec)

    tokens, trained = figure("total_tokens_M", ".6f"), figure("training_seconds", ".1f")
    block = [
        ("val_bpb", result["bpb"], ".6f"),
        ("training_seconds", trained, ".1f"),
        ("total_seconds", total, ".1f"),
        ("peak_vram_mb", figure("peak_vram_mb", ".1f"), ".1f"),
        ("mfu_percent", figure("mfu_percent", ".2f"), ".2f"),
        ("total_tokens_M", tokens, _tokens_spec(tokens)),
        ("num_steps", figure("num_steps", "d"), "d"),
        ("num_params_M", figure("num_params_M", ".1f"), ".1f"),
        ("depth", figure("depth", "d"), "d"),
    ]
    extra = [
        ("tokens_per_sec", figure("tokens_per_sec", ".0f"), ".0f"),
        ("startup_seconds", figure("startup_seconds", ".1f"), ".1f"),
        ("score_seconds", result["score_seconds"], ".1f"),
        ("eval_seconds", result["eval_seconds"], ".1f"),
        ("overhead_seconds", None if total is None else total - (trained or 0.0), ".1f"),
        # the budget in force: a step budget (tiny's) is the budget, its time budget would only mislead
        ("time_budget", None if train.get("budget_steps") else TIME_BUDGET, "d"),
        ("budget_steps", figure("budget_steps", "d"), "d"),
        ("max_seq_len", MAX_SEQ_LEN, "d"),
        ("eval_tokens", EVAL_TOKENS, "d"),
        ("total_batch_size", figure("total_batch_size", "d"), "d"),
        ("device_batch_size", figure("device_batch_size", "d"), "d"),
        ("grad_accum_steps", figure("grad_accum_steps", "d"), "d"),
        ("flops_per_token", figure("flops_per_token", ".6e"), ".6e"),
        ("peak_flops", figure("peak_flops", ".4e"), ".4e"),
    ]
    # train.py's words, on one line each: a line break in one made a line the log's reader reads
    lines = [f"{key}: {' '.join(str(train[key]).split())}" for key in ("attention_backend", "device", "dtype", "profile")
             if train.get(key) is not None]
    lines.append("---")
    lines += [f"{name + ':':<18}{_fmt(value, spec)}" for name, value, spec in block]
    lines += [f"METRIC {name}={format(value, spec)}" for name, value, spec in block + extra if value is not None]
    if re.fullmatch(r"\d+\.\d+", str(train.get("cuda_capability"))):  # printed after val_bpb: a number only
        lines.append(f"METRIC cuda_capability={train['cuda_capability']}")
    print("\n".join(lines), flush=True)


def _figure(value: Any, spec: str) -> float | int | None:
    """A training figure from meta.json (train.py's to write) as `spec` formats it, or None (said as
    n/a): a whole float where a count goes is the count; a word, NaN or a fraction of a count is none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if spec == "d":
        return int(value) if float(value).is_integer() else None
    return value


def _number_or_none(text: str) -> float | None:
    try:
        return round(float(text), 6)
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def run_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="prepare.py run", description="Train, then score in the harness (see `run`).")
    parser.add_argument("--command", default=f"{shlex.quote(sys.executable)} train.py", help="the training command")
    parser.add_argument("--score", default=None,
                        help="a project's own score command (default: the built-in scorer, harness.py next to this file)")
    parser.add_argument("--protect", action="append", default=[], metavar="FILE",
                        help="a file the training command must leave as it is (a project's score script); repeatable")
    args = parser.parse_args(argv)
    return run(args.command, args.score, protected=args.protect)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return run_main(argv[1:])
    parser = argparse.ArgumentParser(description="Prepare data shards and the tokenizer for nightlab's trainer.")
    parser.add_argument(
        "--source",
        default="climbmix",
        help="climbmix (default), stdlib (offline), an http(s) mirror URL, or a folder of parquet shards",
    )
    parser.add_argument(
        "--shards", type=int, default=10, help="training shards besides the validation shard (-1 = all)"
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: ${ENV_CACHE} or ~/.cache/nightlab")
    parser.add_argument("--workers", type=int, default=DOWNLOAD_WORKERS, help="parallel downloads")
    args = parser.parse_args(argv)
    try:
        data_dir = prepare(args.source, args.shards, args.cache_dir, workers=args.workers)
    except PrepareError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    print(f"Ready. Point the trainer at it with: export {ENV_DATA_DIR}={data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
