"""What the built-in trainer's runs are scored on: the validation shard's and the tokenizer's content.

Part of the setting (loop/hardware.py). A data dir keeps its name when its files change: a local
folder's is named after the folder's path and its last file validates, so a file added to the
folder and `nightlab prepare` again make another shard the validation shard under the same name; a
tokenizer moved aside is trained again, on other shards or text (same vocabulary, other merges).
Without this, results on the new text were judged against the best measured on the old. A tokenizer
trained again to the same merges (on the same shards) is the same: its timing note is left out.

Hashed only when a file's (path, size, mtime_ns, inode) differ from what this workspace's store
remembers (kv FILES_KEY): an engine start over the same files costs two stat calls.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightlab.loop.state.store import Store

FILES_KEY = "data.files"  # kv: {"validation": {path, size, mtime_ns, inode, sha256}, "tokenizer": {...}}


@dataclass(frozen=True)
class DataIdentity:
    """Digests of the validation shard's content and of the tokenizer (what tokenizes)."""

    validation: str
    tokenizer: str

    def to_json(self) -> dict[str, str]:
        return {"validation": self.validation, "tokenizer": self.tokenizer}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> DataIdentity | None:
        return None if not data else cls(str(data["validation"]), str(data["tokenizer"]))

    def changed(self, other: DataIdentity) -> list[str]:
        """What differs from `other`, as words for a person."""
        return [what for what, mine, theirs in (("the validation shard", self.validation, other.validation),
                                                ("the tokenizer", self.tokenizer, other.tokenizer))
                if mine != theirs]


def identify(store: Store, data_dir: Path) -> DataIdentity | None:
    """The identity of the data dir's validation shard and tokenizer, each hashed only if it is not
    the file the store remembers hashing. A file that cannot be read keeps what is remembered of it
    (None when nothing is): the runs fail on it and name it (a data problem pauses the loop), so a
    start on broken data changes no setting."""
    from nightlab.trainer import prepare  # the data dir's layout is the harness's

    try:
        _, validation = prepare.split_shards(data_dir)
    except prepare.DataError:
        validation = None
    known = store.get(FILES_KEY) or {}
    files = {}
    for role, path, digest in (("validation", validation, lambda p: prepare.file_digest(p)[:16]),
                               ("tokenizer", data_dir / prepare.TOKENIZER_FILE, _tokenizer_digest)):
        entry = (_file(path, known.get(role), digest) if path is not None else None) or known.get(role)
        if entry is None:
            return None
        files[role] = entry
    if files != known:
        store.set(FILES_KEY, files)
    return DataIdentity(files["validation"]["sha256"], files["tokenizer"]["sha256"])


def _file(path: Path, known: dict[str, Any] | None, digest: Callable[[Path], str]) -> dict[str, Any] | None:
    """The file's stat and digest (`known` when its stat is the same); None when it cannot be read."""
    try:
        st = path.stat()  # before reading: a file written meanwhile is hashed again at the next start
        seen = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        if known is not None and all(known.get(k) == v for k, v in seen.items()):
            return known
        return {**seen, "sha256": digest(path)}
    except OSError:
        return None


def _tokenizer_digest(path: Path) -> str:
    """What tokenizes: the file without its note of what it was trained on and how long that took
    (`trained_on`), which differs at every training, also one on the same shards that gives the same
    merges (the repair a tokenizer's data problem asks for)."""
    raw = path.read_bytes()
    try:
        spec = json.loads(raw)
    except ValueError:  # not one nightlab can read: its runs fail and say so
        spec = None
    if isinstance(spec, dict):
        spec.pop("trained_on", None)
        raw = json.dumps(spec, sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]
