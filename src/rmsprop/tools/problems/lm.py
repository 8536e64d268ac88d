"""A small causal character-level language model on Python's own standard-library sources.

Corpus: a fixed list of ``.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), present on every CPython install without a download, split
by file into train / validation / test (:data:`SPLIT_FILES`): the model is scored on modules it
never trained on. The text is the same on every machine with the same CPython version (a patch
release may touch a few lines; :func:`corpus_digest` tells). A missing file raises
:class:`FileNotFoundError` naming it.

Vocabulary: fixed, not learnt from the corpus: newline, the 95 printable ASCII characters, and one
index for anything else (tabs, non-ASCII; a few characters in the whole corpus).

Model: a pre-norm GPT-style decoder (Radford et al. 2019): token + learned position embeddings,
``layers`` blocks of causal multi-head self-attention and a 4x GELU MLP, a final LayerNorm and a
linear read-out. Loss: cross-entropy of the next character in nats per character (natural log);
a uniform guess over the vocabulary scores ``ln 97 = 4.57``, the training text's character
frequencies 3.13 on the validation text (CPython 3.11).

Training batches are ``batch_size`` windows of ``context + 1`` characters at offsets drawn from the
run seed's ``order`` stream; the weights come from its ``init`` stream (common random numbers).
Evaluation uses ``n_eval`` windows at evenly spaced offsets of the split's text (no randomness),
scoring every position of each window.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from typing import Any

from .base import Problem, Task, stream_seed

__all__ = ["CharLM", "SPLIT_FILES", "VOCAB_SIZE", "corpus", "corpus_digest", "encode",
           "lm_problems"]

#: standard-library modules per split; all present in CPython 3.10 to 3.14
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("argparse.py", "difflib.py", "calendar.py", "fractions.py", "statistics.py",
              "textwrap.py", "heapq.py", "queue.py", "sched.py", "glob.py", "fnmatch.py",
              "colorsys.py", "bisect.py", "string.py", "copy.py", "base64.py", "csv.py",
              "gettext.py", "numbers.py"),
    "valid": ("dataclasses.py", "pprint.py"),
    "test": ("ipaddress.py", "contextlib.py"),
}
#: index 0: any other character; 1: newline; 2..96: chr(32)..chr(126)
VOCAB_SIZE = 97


def encode(text: str) -> Any:
    """``text`` as int64 token indices of the fixed vocabulary (see the module doc)."""
    import numpy as np

    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    out = np.where((codes >= 32) & (codes <= 126), codes - 30, 0)
    out[codes == 10] = 1
    return out


def stdlib_dir() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


@functools.cache
def corpus(split: str) -> str:
    """The text of ``split``: its files read as UTF-8, concatenated in :data:`SPLIT_FILES`
    order. ``FileNotFoundError`` names every missing file."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_FILES)}, got {split!r}")
    root = stdlib_dir()
    paths = [os.path.join(root, f) for f in SPLIT_FILES[split]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"the character-level language model reads Python's standard-library sources, but "
            f"{len(missing)} of them are missing: {', '.join(missing)} (an interpreter installed "
            "without its .py sources?)")
    parts = []
    for p in paths:
        with open(p, encoding="utf-8", newline="\n") as fh:
            parts.append(fh.read())
    return "\n".join(parts)


def corpus_digest() -> str:
    """SHA-256 (first 16 hex digits) of the three splits' texts, to tell whether two machines
    trained on the same characters."""
    h = hashlib.sha256()
    for split in SPLIT_FILES:
        h.update(corpus(split).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _gpt(vocab: int, context: int, width: int, layers: int, heads: int) -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                     nn.Linear(4 * width, width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, heads, width // heads).unbind(2)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True)
            x = x + self.proj(att.transpose(1, 2).reshape(b, t, width))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, width)
            self.pos = nn.Parameter(torch.zeros(context, width))
            nn.init.normal_(self.pos, std=0.02)
            nn.init.normal_(self.tok.weight, std=0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.ln = nn.LayerNorm(width)
            self.head = nn.Linear(width, vocab)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.tok(idx) + self.pos[: idx.shape[1]]
            return self.head(self.ln(self.blocks(x)))

    return GPT()


@dataclass
class CharLM(Problem):
    """Causal character-level transformer on standard-library sources (see the module doc)."""

    context: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    n_eval: int = 64

    def __post_init__(self) -> None:
        self.kind = "data"
        self.metric_name = None

    def build(self, seed: int) -> Task:
        import torch
        import torch.nn.functional as F

        data = {s: torch.from_numpy(encode(corpus(s))) for s in SPLIT_FILES}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, "init"))
            net = _gpt(VOCAB_SIZE, self.context, self.width, self.layers, self.heads)
        g_order = torch.Generator().manual_seed(stream_seed(seed, "order"))
        span = self.context + 1
        batch = self.batch_size or 16
        offsets = torch.arange(span)

        def windows(text: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
            return text[starts[:, None] + offsets]

        evalsets = {s: windows(data[s], torch.linspace(0, len(data[s]) - span, self.n_eval
                                                       ).long()) for s in ("valid", "test")}

        def nll(w: torch.Tensor) -> torch.Tensor:
            logits = net(w[:, :-1])
            return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), w[:, 1:].reshape(-1))

        def train_loss() -> torch.Tensor:
            starts = torch.randint(0, len(data["train"]) - span + 1, (batch,), generator=g_order)
            return nll(windows(data["train"], starts))

        def evaluate(split: str) -> tuple[float, None]:
            with torch.no_grad():
                return float(nll(evalsets[split])), None

        return Task(list(net.parameters()), train_loss, evaluate, None)


def lm_problems() -> list[Problem]:
    """Every language-model problem, in a stable order."""
    return [
        CharLM("charlm-stdlib", "causal char-level transformer (2 layers, width 64, context 64) "
               "on Python standard-library sources, nats/char", steps=300, eval_every=20,
               batch_size=8, target_tau=0.1, context=64, width=64, layers=2, heads=4),
        CharLM("charlm-stdlib-small", "causal char-level transformer (1 layer, width 32, "
               "context 32) on Python standard-library sources, nats/char", steps=150,
               eval_every=25, batch_size=16, target_tau=0.1, context=32, width=32, layers=1,
               heads=2),
    ]
