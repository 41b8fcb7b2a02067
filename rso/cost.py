"""Per-stage cost accounting: what each stage of a run spent, and what the run cost per 1,000
pairs (issue 10). Pure Python: no Beam, no torch; the Beam plumbing that carries :class:`Usage`
records out of the stages is in ``beam_pipelines/stage.py`` (``MeteredDoFn``, the ``usage``
output of every stage) and ``beam_pipelines/handlers.py`` (``MeteredKeyedHandler``).

Measuring (inside the workers, so it works on every runner):

- a DoFn of a stage is timed around each call into it (the ``process`` call and each ``next``
  of its output iterator), never while downstream DoFns consume its outputs; one
  :class:`Usage` per bundle;
- a model handler is timed around each RunInference batch (``run_inference``), and the model
  code counts its own calls (:func:`record`: one per ``generate`` call or forward pass, with the
  sequences and tokens it processed); one :class:`Usage` per batch.

Clocks: wall seconds are ``time.perf_counter`` differences ("busy seconds": summed over every
bundle and batch of every worker, so several workers' seconds add up). CPU seconds are
differences of the process's CPU time (``time.process_time``: every thread of the process,
so torch's and vLLM's intra-op threads count), plus, for the vLLM engine, the CPU time of the
process's live child processes (``psutil``; vLLM's engine core runs in a child process on GPU).
Process CPU time is shared by everything the process runs: when one process runs several
bundles at once (DirectRunner ``multi_threading``, Dataflow's multi-threaded SDK harness), a
batch's delta includes the other bundles' CPU, so the sum is an upper bound there; with one
bundle per process at a time (the FnApiRunner in-process, DirectRunner ``multi_processing``)
it is exact up to the runner's own threads. Not counted anywhere: model loading and engine
start-up, Beam's encoding, shuffles and file sinks, and idle time; the launcher's wall time
(:func:`launcher_section`) includes them.

Prices (``--price-per-hour``, per machine-hour)::

    busy_cost_usd        = busy_seconds / 3600 * price_per_hour
    cost_per_1000_pairs  = busy_cost_usd / pairs * 1000          (lower bound: no idle, no start-up)
    launcher.wall_cost_usd        = wall_seconds * machines / 3600 * price_per_hour
    launcher.cost_per_1000_pairs  = launcher.wall_cost_usd / pairs * 1000   (upper bound)

``busy_seconds`` treats every bundle as one machine busy for its time: exact when each machine
runs one bundle at a time, an overstatement when a machine runs several at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# The stages in pipeline order (beam_pipelines' STAGE constants); others sort after them.
STAGES = ("read", "render", "reuse", "generate", "reward", "select", "rescore", "records", "write")
CPU_CLOCK = "process"  # manifest: which CPU clock (see the module docstring)
_SUM_FIELDS = ("wall_seconds", "cpu_seconds", "items", "batches", "calls", "sequences",
               "tokens_in", "tokens_out")


@dataclasses.dataclass
class Usage:
    """What one stage (``part``: one of its models, e.g. reward model ``"0"``) spent.

    ``wall_seconds``, ``cpu_seconds``: busy time (module docstring); ``items``: elements its
    model handler received (prompts; 0 for stages without a model); ``batches``: RunInference
    batches; ``calls``: model calls (``generate`` calls or forward passes, a retried batch's
    included); ``sequences``: rows those calls processed (candidates generated, sequences
    scored); ``tokens_in``: tokens read (prompt tokens for decoding, unpadded input tokens for
    scoring); ``tokens_out``: tokens generated."""
    stage: str
    part: str = ""
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    items: int = 0
    batches: int = 0
    calls: int = 0
    sequences: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.stage, self.part

    def add(self, other: Usage) -> Usage:
        """Adds ``other``'s sums into this one (in place); returns self."""
        for f in _SUM_FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self


def merge_usage(usages: Iterable[Usage]) -> dict[tuple[str, str], Usage]:
    """``{(stage, part): sum}`` of the usages (new objects; the inputs are not changed)."""
    out: dict[tuple[str, str], Usage] = {}
    for u in usages:
        out.setdefault(u.key, Usage(*u.key)).add(u)
    return out


# ---------------------------------------------------------------- measuring
_CURRENT: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("rso_usage",
                                                                         default=None)


def record(calls: int = 0, sequences: int = 0, tokens_in: int = 0, tokens_out: int = 0) -> None:
    """Counts model work into the :func:`metered` block running in this thread; nothing
    outside one (a handler called directly, e.g. by ``rso evaluate``)."""
    usage = _CURRENT.get()
    if usage is not None:
        usage.calls += calls
        usage.sequences += sequences
        usage.tokens_in += tokens_in
        usage.tokens_out += tokens_out


def _children_cpu() -> float:
    try:
        import psutil
    except ImportError:  # psutil comes with accelerate and vLLM; without it, the process only
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # gone meanwhile
            continue
        total += t.user + t.system
    return total


def cpu_seconds(children: bool = False) -> float:
    """This process's CPU time (all threads), plus its live children's with ``children``."""
    return time.process_time() + (_children_cpu() if children else 0.0)


@contextlib.contextmanager
def metered(usage: Usage, children: bool = False) -> Iterator[Usage]:
    """Adds the block's wall and CPU seconds to ``usage``, and routes :func:`record` calls made
    in the block (in this thread) to it."""
    token = _CURRENT.set(usage)
    wall, cpu = time.perf_counter(), cpu_seconds(children)
    try:
        yield usage
    finally:
        usage.wall_seconds += time.perf_counter() - wall
        # a child that exits during the block takes its CPU time with it: never below 0
        usage.cpu_seconds += max(cpu_seconds(children) - cpu, 0.0)
        _CURRENT.reset(token)


def metered_iter(call: Callable[[], Iterable[T] | None], usage: Usage) -> Iterator[T]:
    """The outputs of ``call()``, timed into ``usage`` only while ``call`` and each ``next`` of
    its iterator run: not while the consumer handles an output (downstream stages)."""
    with metered(usage):
        it = iter(call() or ())
    while True:
        with metered(usage):
            try:
                x = next(it)
            except StopIteration:
                return
        yield x


# ---------------------------------------------------------------- the manifest section
def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def reward_calls_expected(kind: str, num_candidates: int, num_samples: int,
                          debias: str) -> tuple[int, float]:
    """Sequences a reward model scores per prompt of N candidates: ``(this pipeline, the
    paper)``. Pointwise: N, N. Pairwise: N - 1 comparisons against the baseline, and the
    paper's N - 1 + k/2 (it also asks the model which of each of the k/2 pairs wins; here a
    pair is labelled by the rewards already computed); both times 2 with ``both-orders``."""
    if kind != "pairwise":
        return num_candidates, float(num_candidates)
    orders = 2 if debias == "both-orders" else 1
    return orders * (num_candidates - 1), orders * (num_candidates - 1 + num_samples / 2)


def _stage_row(u: Usage, busy: float) -> dict[str, Any]:
    tokens = u.tokens_out or u.tokens_in
    return {"wall_seconds": u.wall_seconds, "cpu_seconds": u.cpu_seconds,
            "share": _ratio(u.wall_seconds, busy), "items": u.items, "batches": u.batches,
            "calls": u.calls, "sequences": u.sequences, "tokens_in": u.tokens_in,
            "tokens_out": u.tokens_out,
            "tokens_per_second": _ratio(tokens, u.wall_seconds) if tokens else None}


def _order(stage: str) -> tuple[int, str]:
    return (STAGES.index(stage) if stage in STAGES else len(STAGES), stage)


def _per_1000(cost: float | None, pairs: int) -> float | None:
    return None if cost is None or not pairs else cost / pairs * 1000


def cost_section(config: Mapping[str, Any], usages: Iterable[Usage], pairs: int,
                 pairs_unit: str = "pairs") -> dict[str, Any]:
    """The manifest's ``cost`` section (docs/MANIFEST.md): per stage (summed over its parts)
    busy wall and CPU seconds, share of the busy total, items, batches, model calls,
    sequences, tokens and tokens per second (generated tokens for decoding, tokens read for
    the others); per reward model the sequences scored per prompt next to the formulas
    (:func:`reward_calls_expected`); and, with ``config["price_per_hour"]``, the costs of the
    module docstring. ``launcher`` is None here (:func:`launcher_section` fills it)."""
    parts = merge_usage(usages)
    stages = merge_usage(Usage(u.stage).add(u) for u in parts.values())
    busy = sum(u.wall_seconds for u in stages.values())
    cpu = sum(u.cpu_seconds for u in stages.values())
    specs = list(config.get("reward_model") or [])
    n, k = int(config.get("num_candidates") or 0), int(config.get("num_samples") or 0)
    if config.get("selection") == "best-of-n":
        k = 1
    debias = str(config.get("pairwise_debias") or "both-orders")
    reward_models = []
    for (stage, part), u in sorted(parts.items()):
        if stage != "reward" or not part.isdigit():
            continue
        i = int(part)
        spec = specs[i] if i < len(specs) else {}
        kind = spec.get("kind", "pointwise") if isinstance(spec, Mapping) else "pointwise"
        ours, paper = reward_calls_expected(kind, n, k, debias)
        reward_models.append({
            "model": i, "kind": kind, "pairwise_debias": debias if kind == "pairwise" else None,
            "prompts": u.items, "sequences": u.sequences, "forward_passes": u.calls,
            "sequences_per_prompt": _ratio(u.sequences, u.items),
            "expected_per_prompt": ours, "paper_per_prompt": paper})
    price = config.get("price_per_hour")
    busy_cost = None if price is None else busy / 3600 * float(price)
    return {
        "cpu_clock": CPU_CLOCK,
        "stages": {s: _stage_row(stages[(s, "")], busy)
                   for s in sorted((s for s, _ in stages), key=_order)},
        "busy_seconds": busy,
        "cpu_seconds": cpu,
        "reward_model_calls": reward_models,
        "pairs": pairs,
        "pairs_unit": pairs_unit,
        "price_per_hour": price,
        "busy_cost_usd": busy_cost,
        "cost_per_1000_pairs": _per_1000(busy_cost, pairs),
        "launcher": None,
    }


def launcher_section(cost: Mapping[str, Any], wall_seconds: float,
                     machines: int | None) -> dict[str, Any]:
    """``cost["launcher"]``: the job's wall time as the launcher saw it (submit to finish,
    start-up and idle included), the machines that ran it (None when unknown) and, with a
    price, the upper-bound costs of the module docstring."""
    price = cost.get("price_per_hour")
    wall_cost = (None if price is None or machines is None
                 else wall_seconds * machines / 3600 * float(price))
    return {"wall_seconds": wall_seconds, "machines": machines, "wall_cost_usd": wall_cost,
            "cost_per_1000_pairs": _per_1000(wall_cost, int(cost.get("pairs") or 0))}


# ---------------------------------------------------------------- console
def _num(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else \
        format(x, spec)


def _usd(x: float | None) -> str:
    return "-" if x is None else f"${x:.3g}"


def format_lines(cost: Mapping[str, Any]) -> list[str]:
    """The cost section as console lines: a header, one line per stage (busy wall s, CPU s,
    share of the busy total, model calls, tokens/s), the total, and one line with the pairs
    and the cost per 1,000 pairs (or "resources only" without a price)."""
    lines = [f"{'stage':<9} {'wall s':>9} {'CPU s':>9} {'share':>6} {'calls':>7} {'tok/s':>8}"]
    stages = cost.get("stages") or {}
    for name in sorted(stages, key=_order):  # pipeline order (the JSON's keys are sorted)
        s = stages[name]
        lines.append(f"{name:<9} {_num(s.get('wall_seconds'), '9.2f')} "
                     f"{_num(s.get('cpu_seconds'), '9.2f')} {_num(s.get('share'), '6.1%')} "
                     f"{s.get('calls') or '':>7} {_num(s.get('tokens_per_second'), '8.0f')}")
    lines.append(f"{'busy':<9} {_num(cost.get('busy_seconds'), '9.2f')} "
                 f"{_num(cost.get('cpu_seconds'), '9.2f')}")
    launcher = cost.get("launcher") or {}
    unit = str(cost.get("pairs_unit") or "pairs").replace("_", " ")
    tail = f"{cost.get('pairs')} {unit}"
    if launcher.get("wall_seconds") is not None:
        tail += f"; launcher wall {launcher['wall_seconds']:.1f} s x " + (
            f"{launcher['machines']} machine(s)" if launcher.get("machines") else "? machines")
    if cost.get("price_per_hour") is None:
        tail += "; no --price-per-hour: resources only"
    else:
        wall = launcher.get("cost_per_1000_pairs")
        tail += (f"; per 1,000: {_usd(cost.get('cost_per_1000_pairs'))} busy"
                 + (f" to {_usd(wall)} wall" if wall is not None else "")
                 + f" at ${cost['price_per_hour']:g}/h")
    lines.append(tail)
    return lines


def reward_call_lines(cost: Mapping[str, Any]) -> list[str]:
    """One line per reward model: sequences scored per prompt, measured and by formula."""
    out = []
    for m in cost.get("reward_model_calls") or ():
        out.append(f"reward model {m['model']} ({m['kind']}): "
                   f"{_num(m.get('sequences_per_prompt'), '.2f')} sequences per prompt "
                   f"(expected {m['expected_per_prompt']}, paper's N-1+k/2 "
                   f"{_num(m.get('paper_per_prompt'), 'g')})"
                   if m["kind"] == "pairwise" else
                   f"reward model {m['model']} ({m['kind']}): "
                   f"{_num(m.get('sequences_per_prompt'), '.2f')} sequences per prompt "
                   f"(expected {m['expected_per_prompt']})")
    return out


def machines_from_beam_args(beam_args: Sequence[str]) -> int | None:
    """How many machines a job runs on, from its Beam flags: 1 for the local runners
    (FnApiRunner, DirectRunner, PrismRunner, and the PortableRunner with a LOOPBACK
    environment); Dataflow's ``--max_num_workers`` (autoscaling's ceiling), else
    ``--num_workers``; None when unknown (Flink and other portable clusters)."""
    values: dict[str, str] = {}
    args = list(beam_args)
    for i, a in enumerate(args):
        if a.startswith("--"):
            name, sep, value = a[2:].partition("=")
            if not sep and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
            values[name] = value
    runner = values.get("runner", "FnApiRunner").rsplit(".", 1)[-1].lower()
    if runner in ("fnapirunner", "directrunner", "direct", "prismrunner", "prism",
                  "bundlebasedirectrunner", "swappingrunner"):
        return 1
    if runner in ("portablerunner", "portable") and values.get(
            "environment_type", "").upper() == "LOOPBACK":
        return 1
    if runner in ("dataflowrunner", "dataflow"):
        for name in ("max_num_workers", "num_workers"):
            if values.get(name, "").isdigit() and int(values[name]) > 0:
                return int(values[name])
    return None
