"""train.py files an agent could write to fool the built-in scorer (issue 18): each a small model
the harness builds through `build_model` and scores, and the artifact `finish` would save for it.

Every variant is a bigram model through a narrow embedding (causal, fast to score) whose forward
does one thing: `honest` nothing else; the others are the tricks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

_MODEL = '''
import torch


class Model(torch.nn.Module):
    def __init__(self, vocab, masked):
        super().__init__()
        self.vocab, self.masked = vocab, masked
        self.embed = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)
        self.calls = 0

    def honest(self, x):
        return self.head(self.embed(x))

    def peek(self, x):  # position t also sees token t + 1, the one it predicts
        ahead = torch.roll(x, -1, dims=1)[..., None]
        return self.honest(x).scatter_add(-1, ahead, torch.full(ahead.shape, 20.0))

    def forward(self, x):
        self.calls += 1
{forward}


def build_model(config, device, dtype=torch.float32):
{build}
'''

_BUILD = "    return Model(config['vocab_size'], config.get('masked', [])).to(device)"
# the build of "random_features": its features a buffer that is not in the state dict
RANDOM_FEATURES = ("    model = Model(config['vocab_size'], config.get('masked', []))\n"
                   "    model.register_buffer('features', torch.randn(16, 16), persistent=False)\n"
                   "    return model.to(device)")
# the same drawn with numpy's global generator (an agent's train.py may well draw so)
NUMPY_FEATURES = "    import numpy as np\n" + RANDOM_FEATURES.replace(
    "torch.randn(16, 16)", "torch.from_numpy(np.random.randn(16, 16)).float()")

FORWARDS = {
    "honest": "return self.honest(x)",
    # the old probe checked the first scored batch (the probe's own forward, the call after it, now
    # goes through a model built anew): honest for that batch
    "causal_at_first": "return self.honest(x) if self.calls <= 1 else self.peek(x)",
    # the old probe cut row r of a batch of R rows at (r + 1) * (T - 1) // (R + 1): honest only there
    "avoids_the_cuts": ("logits, honest = self.peek(x), self.honest(x)\n"
                        "R, T = x.shape\n"
                        "for r in range(R):\n"
                        "    t = (r + 1) * (T - 1) // (R + 1)\n"
                        "    logits[r, t] = honest[r, t]\n"
                        "return logits"),
    # a legitimate design: tokens that never come (reserved specials) get -inf
    "masks_unused_tokens": ("logits = self.honest(x)\n"
                            "logits[..., self.masked] = float('-inf')\n"
                            "return logits"),
    # looks ahead everywhere, and gives a call that starts as the one before (the probe's changed
    # batch: each row the scored row up to its cut) that call's logits up to where the two part
    "replays_its_last_call": ("logits = self.peek(x)\n"
                              "last = getattr(self, 'last', None)\n"
                              "if last is not None and last[0].shape == x.shape:\n"
                              "    same = (x == last[0]).long().cumprod(dim=1).bool()[..., None]\n"
                              "    logits = torch.where(same, last[1], logits)\n"
                              "self.last = (x.clone(), logits.detach().clone())\n"
                              "return logits"),
    # the same, its last call kept outside the model (a module of sys.modules): a model built anew
    # in the same process finds it
    "replays_through_the_process": ("import sys\n"
                                    "store = sys.modules.setdefault('nightlab_last_call', type(sys)('nightlab_last_call'))\n"
                                    "logits = self.peek(x)\n"
                                    "last = getattr(store, 'last', None)\n"
                                    "if last is not None and last[0].shape == x.shape:\n"
                                    "    same = (x == last[0]).long().cumprod(dim=1).bool()[..., None]\n"
                                    "    logits = torch.where(same, last[1], logits)\n"
                                    "store.last = (x.clone(), logits.detach().clone())\n"
                                    "return logits"),
    # looks ahead by just under the probe's tolerance: the next token's logit raised by 0.0099
    "nudges_ahead": ("ahead = torch.roll(x, -1, dims=1)[..., None]\n"
                     "return self.honest(x).float().scatter_add(-1, ahead, torch.full(ahead.shape, 0.0099))"),
    # a legitimate design: random features drawn when the model is built, never saved (`RANDOM_FEATURES`)
    "random_features": "h = self.embed(x)\nreturn self.head(h + torch.sin(h @ self.features))",
    "nan_logits": "return self.honest(x) * float('nan')",
    "all_minus_inf": "return torch.full_like(self.honest(x), float('-inf'))",
    "raises": "return self.honest(x) / {}['no such key']",
    "wrong_vocab": "return self.honest(x)[..., :-1]",
}


def source(variant: str, build: str = _BUILD) -> str:
    body = "\n".join("        " + line for line in FORWARDS[variant].splitlines())
    return _MODEL.format(forward=body, build=build)


def save_artifact(directory: Path, variant: str, vocab: int, *, masked: list[int] | None = None,
                  build: str = _BUILD) -> Path:
    """The folder `Runtime.finish` would leave for a run of this train.py: weights, meta.json, train.py."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.py").write_text(source(variant, build))
    config = {"vocab_size": vocab, "masked": masked or []}
    spec = importlib.util.spec_from_file_location(f"scored_model_{variant}", directory / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.Model(vocab, config["masked"])
    torch.save(model.state_dict(), directory / "model.pt")
    meta = {"format": "nightlab-artifact/1", "config": config, "train": {"num_steps": 1, "depth": 1}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory
