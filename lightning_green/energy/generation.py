"""Energy per generated token, Trainer-free: counting generated tokens, prefill and decode phases, and
the figures of every process.

* :class:`GenerationTally`: one process's generated tokens, energy and time over an inference loop
  (``trainer.predict``, or any loop), counted from each step's output by :func:`count_generated` or
  by a callable, and :func:`cluster_generation`, the figures of every process.
* :class:`GenerationPhases`: a generation loop marks its ``prefill`` and ``decode`` blocks
  (``with phases.phase("decode") as block:``); each phase's energy, time and tokens, on one process
  or summed over every process (:func:`cluster_phases`).

The counting rule (``generated_tokens="output"``). A step's output counts when it is a tensor of
token ids (an integer dtype) whose last dimension holds the prompt followed by the generated tokens,
as ``generate`` functions return it. The prompt is the batch's ``input_ids`` entry when the batch is a
mapping that has one, else the batch's first tensor (:func:`first_tensor`); its width is its last
dimension (one width per batch: pad prompts to it). Then::

    generated = rows x (output.shape[-1] - prompt.shape[-1]),  rows = output.numel() / output.shape[-1]

Every row counts the full width: tokens after a row's end-of-sequence that the loop padded count as
generated (the model computed them). Anything else (not a tensor, floating point or bool ids, an
output narrower than the prompt, no tensor in the batch) is not read: one warning, and that batch
counts its samples instead (:attr:`GenerationTally.fallback_samples` says how many).

Time. Processes generate side by side, so the cluster's seconds are the longest process's: cluster
seconds per token = that / the tokens of every process; energy and tokens are sums (a node's
host-level sensors are read by one process, so they are counted once).
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lightning_green.checks import check_choice, check_int, checked_count
from lightning_green.energy.metrics import epi_j, per_joule
from lightning_green.energy.session import EnergySession
from lightning_green.messages import WarnOnce

#: The phases a generation loop marks, and what their tokens are.
GENERATION_PHASES = ("prefill", "decode")
PHASE_TOKENS = {"prefill": "prompt tokens", "decode": "generated tokens"}
#: ``generated_tokens`` by name: the rule of this module's docstring.
COUNT_RULES = ("output",)
#: ``gather(values) -> rows``: ``values`` of every process in rank order (one process: ``[values]``).
Gather = Callable[[Sequence[float]], list[list[float]]]


def local_gather(values: Sequence[float]) -> list[list[float]]:
    """:data:`Gather` of a single process."""
    return [[float(v) for v in values]]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The batch's first tensor: the batch itself, or the first found depth first in a list, tuple or
    dict (in its order)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def prompt_of(batch: Any) -> torch.Tensor | None:
    """The prompt of a batch by the counting rule: its ``input_ids`` entry, else its first tensor."""
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"]
    return first_tensor(batch)


def count_generated(output: Any, batch: Any) -> int | str:
    """Generated tokens of one step by the counting rule (module docstring), or why it cannot read them."""
    if not isinstance(output, torch.Tensor):
        return f"the output is a {type(output).__name__}, not a tensor of token ids"
    if output.dtype.is_floating_point or output.dtype.is_complex or output.dtype == torch.bool:
        return f"the output's dtype is {output.dtype}, not an integer dtype of token ids"
    prompt = prompt_of(batch)
    if prompt is None or prompt.dim() == 0:
        return "the batch holds no prompt tensor (input_ids or a first tensor)"
    if output.dim() == 0 or output.shape[-1] < prompt.shape[-1]:
        return f"the output's shape {tuple(output.shape)} is narrower than the prompt's {tuple(prompt.shape)}"
    rows = math.prod(output.shape[:-1])
    return rows * (output.shape[-1] - prompt.shape[-1])


def check_generated_tokens(value: Any) -> str | Callable | None:
    """``generated_tokens`` as :class:`~lightning_green.callbacks.EfficiencyLogger` takes it: ``None``,
    ``"output"`` or a callable ``(output, batch) -> int``."""
    if value is None or callable(value) or value in COUNT_RULES:
        return value
    raise ValueError(f"`generated_tokens` must be None, 'output' or a callable (output, batch) -> int, got {value!r}")


class EnergyReader(Protocol):
    """What a tally reads of a measurement: an :class:`EnergySession`, or the PowerSampler that holds one
    (its public interface has the same three)."""

    def clock(self) -> float: ...

    def energy_at_j(self, t_s: float) -> float: ...

    def device_energy_j(self, t_s: float) -> float: ...


class GenerationTally:
    """One process's generated tokens, energy and time over an inference loop.

    Args:
        generated_tokens: ``"output"`` (the module's counting rule) or a callable ``(output, batch) ->
            int``, whose answer is checked on every use (a whole number >= 0, else ``TypeError`` naming
            ``generated_tokens``).
        samples_of: ``batch -> samples``, what a batch the rule cannot read counts instead.

    Example::

        tally = GenerationTally("output", samples_of=len)
        tally.start(session)
        for batch in prompts:
            tally.add(generate(batch), batch)
        row = tally.local_row(session)          # gather the rows of every process, then
        figures = cluster_generation([row])     # {"total": {...}, "per_rank": [...], "imbalance": {...}}
    """

    def __init__(self, generated_tokens: str | Callable[[Any, Any], int], samples_of: Callable[[Any], int]) -> None:
        self.generated_tokens = check_generated_tokens(generated_tokens)
        if self.generated_tokens is None:
            raise ValueError("`generated_tokens` must be 'output' or a callable (output, batch) -> int, got None")
        self.samples_of = samples_of
        self._warn = WarnOnce()
        self.reset()

    def reset(self) -> None:
        # generated tokens, fallback samples included
        self.tokens = 0
        # samples counted for batches the rule could not read
        self.fallback_samples = 0
        self._t0_s = self._start_j = self._start_device_j = 0.0

    def add(self, output: Any, batch: Any) -> None:
        """Count the tokens one step generated."""
        if callable(self.generated_tokens):
            self.tokens += checked_count("generated_tokens", self.generated_tokens(output, batch))
            return
        counted = count_generated(output, batch)
        if isinstance(counted, int):
            self.tokens += counted
            return
        samples = self.samples_of(batch)
        self.fallback_samples += samples
        self.tokens += samples
        self._warn(
            "rule",
            f"EfficiencyLogger: cannot count generated tokens from this step's output ({counted}); such batches "
            "count their samples instead, so the per-generated-token figures are partial. Return the token ids "
            "with the prompt, or pass `generated_tokens=lambda output, batch: ...`.",
        )

    def start(self, session: EnergyReader) -> None:
        """The loop starts now (the counts start from zero)."""
        self.reset()
        self._t0_s = session.clock()
        self._start_j = session.energy_at_j(self._t0_s)
        self._start_device_j = session.device_energy_j(self._t0_s)

    def local_row(self, session: EnergyReader, node_rank: int = 0) -> list[float]:
        """This process's part for :func:`cluster_generation`, the loop ending now: ``[node_rank,
        energy_j, device_energy_j, seconds, tokens, fallback_samples]`` (all at one clock reading)."""
        now = session.clock()
        return [
            float(node_rank),
            session.energy_at_j(now) - self._start_j,
            session.device_energy_j(now) - self._start_device_j,
            now - self._t0_s,
            float(self.tokens),
            float(self.fallback_samples),
        ]


def per_token(energy_j: float, seconds: float, tokens: float) -> dict[str, float]:
    """``j_per_token``, ``s_per_token`` and ``tokens_per_j`` (NaN where a denominator is 0)."""
    return {
        "j_per_token": epi_j(energy_j, tokens),
        "s_per_token": _ratio(seconds, tokens),
        "tokens_per_j": per_joule(tokens, energy_j),
    }


def predict_results(total: Mapping[str, float]) -> dict[str, float]:
    """The ``efficiency`` summary figures of a predict loop from :func:`cluster_generation`'s ``total``
    (``predict_generated_tokens_fallback_samples`` only where some batch fell back to samples)."""
    out = {
        "predict_generated_tokens": total["generated_tokens"],
        "predict_j_per_generated_token": total["j_per_token"],
        "predict_s_per_generated_token": total["s_per_token"],
        "predict_generated_tokens_per_j": total["tokens_per_j"],
    }
    if total["fallback_samples"]:
        out["predict_generated_tokens_fallback_samples"] = total["fallback_samples"]
    return out


def generation_metrics(total: Mapping[str, float]) -> dict[str, float]:
    """The logged metrics of a predict loop from :func:`cluster_generation`'s ``total``."""
    return {
        "efficiency/j_per_generated_token": total["j_per_token"],
        "efficiency/s_per_generated_token": total["s_per_token"],
        "efficiency/generated_tokens_per_j": total["tokens_per_j"],
    }


def _imbalance(values: Sequence[float]) -> float:
    """max / mean (NaN when the mean is not > 0), the rule of the cluster's device-energy imbalance."""
    mean = sum(values) / len(values)
    return _ratio(max(values), mean)


def cluster_generation(rows: Sequence[Sequence[float]]) -> dict:
    """The figures of every process from their :meth:`GenerationTally.local_row` rows, in rank order.

    ``total``: energy and tokens summed (host-level sensors are on one process per node, so a node's
    CPU counts once), seconds the longest process's; ``per_rank``: each process's own; ``imbalance``:
    max / mean over processes of device energy (as the summary's cluster imbalance), tokens and seconds.
    """
    per_rank = []
    for rank, (node_rank, energy_j, device_j, seconds, tokens, fallback) in enumerate(rows):
        per_rank.append(
            {
                "rank": rank,
                "node_rank": int(node_rank),
                "energy_j": energy_j,
                "device_energy_j": device_j,
                "seconds": seconds,
                "generated_tokens": int(tokens),
                "fallback_samples": int(fallback),
                **per_token(energy_j, seconds, tokens),
            }
        )
    energy_j = sum(r["energy_j"] for r in per_rank)
    tokens = sum(r["generated_tokens"] for r in per_rank)
    seconds = max(r["seconds"] for r in per_rank)
    total = {
        "world_size": len(per_rank),
        "energy_j": energy_j,
        "device_energy_j": sum(r["device_energy_j"] for r in per_rank),
        "seconds": seconds,
        "generated_tokens": tokens,
        "fallback_samples": sum(r["fallback_samples"] for r in per_rank),
        **per_token(energy_j, seconds, tokens),
    }
    imbalance = {
        key: _imbalance([r[key] for r in per_rank]) for key in ("device_energy_j", "generated_tokens", "seconds")
    }
    return {"total": total, "per_rank": per_rank, "imbalance": imbalance}


def generation_rows(figures: dict, source: str) -> list[dict]:
    """The summary's ``generation`` table: every process's figures, then each process's, then the
    imbalance (max / mean over processes)."""
    keys = ("generated_tokens", "energy_j", "seconds", "j_per_token", "s_per_token", "tokens_per_j")
    total = figures["total"]
    rows = [
        {"rank": "all", **{k: total[k] for k in keys}, "fallback_samples": total["fallback_samples"], "source": source}
    ]
    if total["world_size"] > 1:
        for r in figures["per_rank"]:
            rows.append(
                {
                    "rank": r["rank"],
                    **{k: r[k] for k in keys},
                    "fallback_samples": r["fallback_samples"],
                    "device_energy_j": r["device_energy_j"],
                    "source": source,
                }
            )
        imbalance = figures["imbalance"]
        rows.append(
            {
                "rank": "imbalance (max/mean)",
                "generated_tokens": imbalance["generated_tokens"],
                "seconds": imbalance["seconds"],
                "device_energy_j": imbalance["device_energy_j"],
            }
        )
    return rows


@dataclass
class PhaseBlock:
    """One ``prefill`` or ``decode`` block, as :meth:`GenerationPhases.phase` yields it: set
    :attr:`tokens` inside the block when it was not known at its start."""

    phase: str
    tokens: int | None = None


class GenerationPhases:
    """The ``prefill`` and ``decode`` blocks of a generation loop: their time and tokens, and their
    energy from the session's meter.

    A block costs two clock readings and an append; its energy is taken from the meter once the
    sensors have read past its end (so the meter's bounded history still holds it), and the rest at
    :meth:`loop_ended`, after one more reading. Blocks must not nest (their energy would count twice).

    Args:
        session: the measurement (running while blocks are marked).
        max_pending: blocks waiting for the sensors; past that the oldest takes the energy the meter
            gives it then (extrapolated at most one interval), so memory stays bounded.

    Example::

        phases = GenerationPhases(session)
        with phases.phase("prefill", tokens=prompt.numel()):
            logits = model(prompt)
        with phases.phase("decode") as block:
            new = decode(logits)
            block.tokens = new.numel()
        phases.loop_ended()
        phases.rows(session.sources())   # J, s per token of each phase, with the source label
    """

    def __init__(self, session: EnergySession, max_pending: int = 50_000) -> None:
        self.session = session
        self.max_pending = check_int("max_pending", max_pending, 1)
        self._pending: deque[tuple[str, float, float]] = deque()
        self._open = False
        # per phase, every process's figures at the last loop_ended
        self.cluster: dict[str, dict] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every block (a stage begins)."""
        self._pending.clear()
        self.cluster = {}
        # per phase: [tokens, seconds, energy_j, blocks]
        self.totals = {p: [0, 0.0, 0.0, 0] for p in GENERATION_PHASES}

    @contextlib.contextmanager
    def phase(self, name: str, tokens: int | None = None) -> Iterator[PhaseBlock]:
        """Mark a block of phase ``name`` (``"prefill"`` or ``"decode"``) that handles ``tokens``
        (prompt tokens for prefill, generated tokens for decode; or set ``block.tokens`` inside it).

        Raises:
            ValueError: an unknown ``name``, or ``tokens`` not a whole number >= 0.
            RuntimeError: the session is not running, or a block is already open.
        """
        check_choice("phase", name, GENERATION_PHASES)
        block = PhaseBlock(name, None if tokens is None else check_int("tokens", tokens, 0))
        if self.session.meter is None or not self.session.started:
            raise RuntimeError("a generation phase needs a running sampler: inside fit/validate/test/predict")
        if self._open:
            raise RuntimeError("generation phases do not nest: end the open one first")
        clock = self.session.clock
        self._open = True
        t0 = clock()
        try:
            yield block
        finally:
            t1 = clock()
            self._open = False
            self._add(name, t0, t1, block.tokens)

    def _add(self, name: str, t0: float, t1: float, tokens: int | None) -> None:
        totals = self.totals[name]
        totals[0] += 0 if tokens is None else check_int("tokens", tokens, 0)
        totals[1] += t1 - t0
        totals[3] += 1
        self._pending.append((name, t0, t1))
        meter = self.session.meter
        while len(self._pending) > self.max_pending:
            self._resolve_one(meter)
        last = meter.last_time()
        while self._pending and last is not None and self._pending[0][2] <= last:
            self._resolve_one(meter)

    def _resolve_one(self, meter: Any) -> None:
        name, t0, t1 = self._pending.popleft()
        self.totals[name][2] += meter.energy_between(t0, t1)

    def resolve(self) -> None:
        """Give every waiting block its energy now (the sensors read first, where the sampler runs)."""
        if not self._pending:
            return
        self.session.read_now()
        meter = self.session.meter
        while self._pending:
            self._resolve_one(meter)

    def local_row(self) -> list[float]:
        """This process's part for :func:`cluster_phases`: per phase tokens, seconds, joules, blocks."""
        self.resolve()
        return [float(v) for p in GENERATION_PHASES for v in self.totals[p]]

    def loop_ended(self, gather: Gather = local_gather) -> dict[str, float]:
        """The loop that marked the blocks ended: the figures of every process (``gather``: a
        collective; every process calls it) are kept in :attr:`cluster`. Returns the metrics to log:
        ``generation/<phase>_j_per_token`` and ``generation/<phase>_s_per_token`` of the phases used."""
        self.cluster = cluster_phases(gather(self.local_row()))
        out = {}
        for name, figures in self.cluster.items():
            out[f"generation/{name}_j_per_token"] = figures["j_per_token"]
            out[f"generation/{name}_s_per_token"] = figures["s_per_token"]
        return out

    def rows(self, source: str) -> list[dict]:
        """The summary's ``generation phases`` table from :attr:`cluster` (``[]`` when no block ran)."""
        return [
            {"phase": name, "tokens_are": PHASE_TOKENS[name], **figures, "source": source}
            for name, figures in self.cluster.items()
        ]


def cluster_phases(rows: Sequence[Sequence[float]]) -> dict[str, dict]:
    """Each phase used by some process, from every process's :meth:`GenerationPhases.local_row`:
    tokens, joules and blocks summed, seconds the longest process's, and the per-token figures."""
    out = {}
    for i, name in enumerate(GENERATION_PHASES):
        parts = [row[4 * i : 4 * i + 4] for row in rows]
        blocks = int(sum(p[3] for p in parts))
        if not blocks:
            continue
        tokens = int(sum(p[0] for p in parts))
        seconds = max(p[1] for p in parts)
        energy_j = sum(p[2] for p in parts)
        out[name] = {
            "tokens": tokens,
            "seconds": seconds,
            "energy_j": energy_j,
            "blocks": blocks,
            "processes": len(rows),
            **per_token(energy_j, seconds, tokens),
        }
    return out
