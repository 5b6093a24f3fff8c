"""Check on a GPU that each buffer the scorer shares with a model process has its CUDA segment to
itself (issue 18). CUDA IPC maps the whole segment a tensor lies in into the other process, so
anything else of the scorer's in that segment (its running sums, the rows, another process's
buffer) would be the model's to read or write.

    python bench/ipc_segments.py            # default profile's shapes; exits 1 if a segment is shared

Allocates as `harness.score` does (both model processes' buffers, then the rows, the byte counts,
the sums and a loss's temporaries), then reads the caching allocator's snapshot and prints, for
each shared buffer, its segment's size and what else is allocated in it. Needs CUDA.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

TRAINER = Path(__file__).resolve().parent.parent / "trainer"
sys.path.insert(0, str(TRAINER))

import harness  # noqa: E402 - the trainer's fixed harness, as the scorer runs it
import prepare  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("bench: needs CUDA (the buffers are files in /dev/shm elsewhere)")
        return 0
    device = torch.device("cuda")
    vocab, (T, n) = 8192, prepare.scored_shape(prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS)
    B = harness._eval_batch(n, T, vocab, device)
    with tempfile.TemporaryDirectory() as folder:
        shared = {f"{who} {what}": harness.shared_buffer(shape, dtype, device, Path(folder))[0]
                  for who in ("scored", "probe")
                  for what, shape, dtype in (("inputs", (B, T), torch.int64), ("logits", (B, T, vocab), torch.float32))}
        # what the scorer allocates after them
        rows = torch.zeros(n, T + 1, dtype=torch.int32, device=device)
        token_bytes = torch.zeros(vocab, dtype=torch.int64, device=device)
        sums = [torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device)]
        nats = torch.nn.functional.cross_entropy(shared["scored logits"].reshape(-1, vocab),
                                                 rows[:B, 1:].long().reshape(-1), reduction="none")
        segments = torch.cuda.memory_snapshot()
        shared_ptrs = {t.data_ptr(): name for name, t in shared.items()}
        bad = 0
        print(f"bench: B={B}, T={T}, vocab={vocab}; {len(segments)} segments")
        print(f"{'buffer':<14} {'bytes':>12} {'segment bytes':>14}  other blocks allocated in its segment")
        for name, t in shared.items():
            ptr = t.data_ptr()
            seg = next(s for s in segments if s["address"] <= ptr < s["address"] + s["total_size"])
            others = [b for b in seg["blocks"] if b["state"] == "active_allocated"
                      and not (b["address"] <= ptr < b["address"] + b["size"])]
            named = [shared_ptrs.get(b["address"], f"{b['size']} bytes") for b in others]
            bad += bool(others)
            print(f"{name:<14} {t.numel() * t.element_size():>12} {seg['total_size']:>14}  {', '.join(named) or 'none'}")
        del rows, token_bytes, sums, nats
    print("bench: every shared buffer has its segment to itself" if not bad else
          f"bench: {bad} shared buffer(s) share a segment: a model process could reach what else lies there")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
