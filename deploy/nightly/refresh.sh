#!/usr/bin/env bash
# Nightly refresh: one `rso generate` run into OUTPUT_ROOT/dt=YYYY-MM-DD/, then OUTPUT_ROOT/LATEST
# is pointed at it, only if the run wrote _SUCCESS (deploy/nightly/publish.py; atomic).
# The run is incremental: it gets --reuse-candidates OUTPUT_ROOT, so it decodes only the prompts
# no earlier complete night stored for the same policy and sampling parameters
# (docs/CANDIDATES.md, Incremental runs).
#
# Required: OUTPUT_ROOT (local path or gs://bucket/prefix).
# Optional:
#   RUN_DATE        the run's date (default: today in UTC); set it to backfill a night
#   RUNNER_SCRIPT   what runs the pipeline (default: deploy/dataflow/run.sh; or
#                   deploy/flink/run.sh, or any script that honours $OUTPUT); it gets OUTPUT and
#                   JOB_NAME in its environment, plus this script's arguments, and must block
#                   until the pipeline ends
#   REUSE           1 (default): pass --reuse-candidates OUTPUT_ROOT; 0: decode every prompt
#   KEEP            keep only the KEEP newest complete runs (default: keep all); refused
#                   (exit 2, before the run) with REUSE=1, and while any night under
#                   OUTPUT_ROOT holds a candidate store (publish.py check-keep, asked before
#                   the run; its message says how to get out): later nights may still reuse
#                   its candidates
#   LOCK_FILE       a local lock so that two refreshes never overlap
#                   (default: ${TMPDIR:-/tmp}/rso-refresh.lock; empty to skip)
#   PYTHON          interpreter with this package installed (default: python)
# Plus whatever RUNNER_SCRIPT needs (PROJECT, REGION, BUCKET, IMAGE, CONFIG, ...).
# Exit status: 0 when LATEST names a complete run of RUN_DATE (or a newer one); non-zero when the
# run failed or left no _SUCCESS (LATEST untouched); 75 when another refresh holds the lock (or
# the pipeline found another run owning OUTPUT: `rso generate` exits 75 then).
# A rerun on the same date skips the pipeline if that run is already complete.
set -euo pipefail

: "${OUTPUT_ROOT:?set OUTPUT_ROOT (local path or gs://bucket/prefix)}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-python}"
RUN_DATE="${RUN_DATE:-$(date -u +%F)}"
REUSE="${REUSE:-1}"
RUNNER_SCRIPT="${RUNNER_SCRIPT:-$REPO/deploy/dataflow/run.sh}"
LOCK_FILE="${LOCK_FILE-${TMPDIR:-/tmp}/rso-refresh.lock}"
OUTPUT_ROOT="${OUTPUT_ROOT%/}"
if [[ "$OUTPUT_ROOT" != *://* ]]; then
  # A local root is made absolute: the runner may change directory, and LATEST must name a
  # path that reads the same from anywhere.
  OUTPUT_ROOT="$(realpath -m -- "$OUTPUT_ROOT")"
fi

publish() {
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m deploy.nightly.publish "$@"
}

if [[ -n "$LOCK_FILE" ]] && command -v flock > /dev/null; then
  exec 9> "$LOCK_FILE"
  if ! flock -n 9; then
    echo "refresh: another refresh holds $LOCK_FILE; not starting" >&2
    exit 75
  fi
fi

case "$REUSE" in
  0) ;;
  1) if [[ -n "${KEEP:-}" ]]; then
       echo "refresh: KEEP=$KEEP with REUSE=1 is refused: later nights reuse the candidates of" \
            "earlier ones, so no night can be deleted by age. To prune, set REUSE=0, run with" \
            "a config without write_candidates, and remove the candidate stores already under" \
            "$OUTPUT_ROOT (python -m deploy.nightly.publish check-keep $OUTPUT_ROOT says how);" \
            "or unset KEEP" >&2
       exit 2
     fi
     set -- "$@" --reuse-candidates "$OUTPUT_ROOT" ;;
  *) echo "refresh: REUSE must be 0 or 1, got '$REUSE'" >&2; exit 2 ;;
esac

publish check-name "$RUN_DATE"
if [[ -n "${KEEP:-}" ]]; then
  # publish --keep refuses while a night holds a candidate store: ask before running, so that
  # a good run is not left unpublished after hours of work.
  publish check-keep "$OUTPUT_ROOT"
fi
RUN_NAME="dt=$RUN_DATE"
export OUTPUT="$OUTPUT_ROOT/$RUN_NAME"
export JOB_NAME="${JOB_NAME:-rso-nightly-$RUN_DATE-$(date -u +%H%M%S)}"

if publish complete "$OUTPUT"; then
  echo "refresh: $OUTPUT is already complete; not running the pipeline again"
else
  echo "refresh: running $RUNNER_SCRIPT -> $OUTPUT"
  "$RUNNER_SCRIPT" "$@"
fi

args=(publish "$OUTPUT_ROOT" "$RUN_NAME")
[[ -n "${KEEP:-}" ]] && args+=(--keep "$KEEP")
publish "${args[@]}"
