"""`rso sweep --candidates DIR --beta 0,0.1,0.25,0.5,1,2,inf`: choose beta without decoding.

For each beta, from the stored candidates alone (``candidates-*.parquet`` of a complete
``rso generate --write-candidates`` run), the expected mean reward of the kept responses and of
the chosen responses, the KL divergence of the kept set from the SFT proposal, the acceptance
rate and the under-filled fraction (definitions: :mod:`beam_pipelines.sweep`). Prints a table
and writes ``sweep.json`` and ``sweep.png`` (reward gain against KL; top-k, beta 0, and random,
beta inf, are the curve's ends; the run's own beta is marked) into ``--output``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence

from rso import console, layout
from rso.config import ArgumentParser
from rso.storage import join, makedirs, open_file

DEFAULT_BETAS = "0,0.1,0.25,0.5,1,2,inf"


def parse_betas(text: str) -> list[float]:
    """``"0,0.5,inf"`` -> [0.0, 0.5, inf]; ValueError for a negative or unreadable value."""
    betas = []
    for part in text.split(","):
        value = float(part.strip())
        if math.isnan(value) or value < 0:
            raise ValueError(f"beta must be >= 0 or inf, got {part.strip()!r}")
        betas.append(value)
    return betas


def read_candidate_rewards(directory: str, dedup: bool = True) -> dict[str, list[float]]:
    """prompt_id -> rewards of its candidates in engine order (identical token ids collapsed to
    their first occurrence when ``dedup``, as the select stage does)."""
    import pyarrow.parquet as pq

    from beam_pipelines.candidates import verified_store_files

    files = verified_store_files(directory)  # ConfigError (a ValueError) names the problem
    rows: dict[str, list[tuple[int, tuple[int, ...], float]]] = defaultdict(list)
    for path in files:
        with open_file(path, "rb") as f:
            table = pq.read_table(f, columns=["prompt_id", "candidate_index",
                                              "response_token_ids", "reward"])
        columns = (table.column(c).to_pylist() for c in table.column_names)
        for pid, idx, ids, reward in zip(*columns):
            rows[pid].append((idx, tuple(ids), reward))
    out = {}
    for pid, cands in sorted(rows.items()):
        seen, rewards = set(), []
        for _, ids, reward in sorted(cands):
            if dedup and ids in seen:
                continue
            seen.add(ids)
            rewards.append(reward)
        out[pid] = rewards
    return out


def format_table(points) -> str:
    head = (f"{'beta':>6} {'kept r':>8} {'chosen r':>9} {'gain':>7} {'KL nats':>8} "
            f"{'accept':>7} {'under':>6}")
    lines = [head]
    for p in points:
        lines.append(f"{p.beta:>6g} {p.kept_reward:>8.3f} {p.chosen_reward:>9.3f} "
                     f"{p.reward_gain:>7.3f} {p.kl:>8.3f} {p.acceptance_rate:>7.3f} "
                     f"{p.underfilled:>6.3f}")
    return "\n".join(lines)


def plot(points, run_beta: float | None) -> bytes:
    """The reward-gain-vs-KL curve as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.kl for p in points], [p.reward_gain for p in points], "o-", color="C0")
    for p in points:
        label = {0.0: "top-k (beta 0)", math.inf: "random (beta inf)"}.get(
            p.beta, f"beta {p.beta:g}")
        ax.annotate(label, (p.kl, p.reward_gain), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    mark = [p for p in points if run_beta is not None and p.beta == run_beta]
    if mark:
        ax.plot([mark[0].kl], [mark[0].reward_gain], "*", color="C3", markersize=14,
                label=f"this run's beta ({run_beta:g})")
        ax.legend(loc="lower right")
    ax.set_xlabel("KL(kept || SFT proposal), nats")
    ax.set_ylabel("mean reward gain of kept responses")
    ax.set_title("reward gain vs KL, from stored candidates")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run_beta_of(directory: str) -> tuple[float | None, int | None, str | None]:
    """(beta, k, pairing) of the run that wrote ``directory`` (its manifest), where known."""
    try:
        with open_file(join(directory, layout.MANIFEST), "r") as f:
            config = json.load(f).get("config", {})
    except (OSError, ValueError):
        return None, None, None
    beta = config.get("beta")
    return (float(beta) if beta is not None else None, config.get("num_samples"),
            config.get("pairing"))


def _json_float(value):
    """JSON has no inf or nan: they are written as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="rso sweep", description=console.help_text(__doc__),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", required=True, help="a complete run with a candidate store")
    parser.add_argument("--beta", default=DEFAULT_BETAS, help="comma-separated betas (inf allowed)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="k kept per prompt (default: the run's)")
    parser.add_argument("--pairing", default=None, help="pairing (default: the run's)")
    parser.add_argument("--replicates", type=int, default=200,
                        help="Monte-Carlo runs of the selection per prompt and beta "
                             "(default: 200)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the Monte-Carlo selections (default: 0)")
    parser.add_argument("--output", default=None,
                        help="folder for sweep.json and sweep.png (default: --candidates)")
    args = parser.parse_args(argv)
    from beam_pipelines.sweep import sweep

    try:
        betas = parse_betas(args.beta)
        run_beta, run_k, run_pairing = run_beta_of(args.candidates)
        k = args.num_samples or run_k or 8
        if k < 1 or args.replicates < 1:
            raise ValueError("--num-samples and --replicates must be >= 1")
        prompts = read_candidate_rewards(args.candidates)
    except ValueError as e:
        print(f"rso sweep: error: {e}", file=sys.stderr)
        return 2
    points = sweep(prompts.items(), betas, k, args.pairing or run_pairing or "first-round",
                   args.seed, args.replicates)
    print(f"{len(prompts)} prompts, k = {k}, {args.replicates} replicates per prompt and beta")
    print(format_table(points))
    out = args.output or args.candidates
    makedirs(out)
    with open_file(join(out, "sweep.json"), "w") as f:
        json.dump({"num_samples": k, "run_beta": _json_float(run_beta),
                   "replicates": args.replicates,
                   "points": [{k_: _json_float(v) for k_, v in
                               {**p.__dict__, "reward_gain": p.reward_gain}.items()}
                              for p in points]}, f, indent=2)
    with open_file(join(out, "sweep.png"), "wb") as f:
        f.write(plot(points, run_beta))
    print(f"wrote {join(out, 'sweep.json')} and sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
