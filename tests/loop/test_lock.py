"""The pid locks (loop/state/lock.py) when their folder is cleaned away under their holder."""

from __future__ import annotations

import shutil
from pathlib import Path

from nightlab.loop.state.lock import EngineLock


def test_a_lock_that_cannot_be_put_back_yet_is_tried_again_not_raised(tmp_path: Path) -> None:
    """Its folder gone and something else in its place: the daemon's main loop died on the OSError."""
    lock = EngineLock(tmp_path)
    lock.acquire()
    shutil.rmtree(tmp_path / ".nightlab")
    (tmp_path / ".nightlab").write_text("not a folder")
    assert lock.keep() is None
    (tmp_path / ".nightlab").unlink()
    assert lock.keep() is None and (tmp_path / ".nightlab" / "engine.lock").is_file()
    lock.release()
