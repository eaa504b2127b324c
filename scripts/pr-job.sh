#!/usr/bin/env bash
# The llama.cpp PR job's steps (.github/workflows/llama-cpp-pr.example.yml runs this): the bundled
# library on the merge base's llama-server and on the PR's, then what the PR changed. It fails only
# on a regression (a case worse than on the base), so a base that already loses reuse does not
# fail every PR. Writes OUT/base, OUT/pr (reports), OUT/diff.html, OUT/summary.md (also appended to
# $GITHUB_STEP_SUMMARY when set).
#
#   scripts/pr-job.sh PR_LLAMA_SERVER BASE_LLAMA_SERVER OUT_DIR [cachecheck run options, e.g. -k seed]
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 PR_LLAMA_SERVER BASE_LLAMA_SERVER OUT_DIR [cachecheck run options]" >&2
  exit 2
fi
pr=$1 base=$2 out=$3
shift 3
mkdir -p "$out"
for side in base pr; do
  bin=$base; [ "$side" = pr ] && bin=$pr
  cachecheck run --engine server --server-bin "$bin" --json "$out/$side.json" --report-dir "$out/$side" "$@" \
    > "$out/$side.log" 2>&1
  rc=$?
  if [ "$rc" -gt 1 ]; then  # 0 and 1 are verdicts; anything else means the run itself failed
    echo "cachecheck run on the $side build failed (exit $rc):" >&2
    tail -n 5 "$out/$side.log" >&2
    exit "$rc"
  fi
done
cachecheck diff "$out/base.json" "$out/pr.json" --html "$out/diff.html" --json "$out/diff.json" \
  --markdown "$out/summary.md"
rc=$?
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  cat "$out/summary.md" >> "$GITHUB_STEP_SUMMARY"
fi
exit "$rc"
