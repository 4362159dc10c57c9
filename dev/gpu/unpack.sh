#!/usr/bin/env bash
# Here, after a device call of dev/gpu/page_runs.sh: FILES_AT is the folder its $OUT came back to.
# The rows' JSON go to docs/results/data/ (then: engram results render PAGE, check, stale), the
# kept page runs and the checkpoints of their unfinished runs to .gpu/kept/ (carried to a later
# machine, which unpacks and resumes them; delete what a finished row no longer needs), and the
# logs' ends are shown.
set -euo pipefail
FROM=$(cd "${1:?usage: bash dev/gpu/unpack.sh FILES_AT}" && pwd)
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$FROM/rows.tgz" -C "$tmp"
(cd "$tmp/data" && find . -name '*.json' -print0 | xargs -0 -r cp -v --parents -t "$OLDPWD/docs/results/data")
mkdir -p .gpu/kept
if compgen -G "$FROM/kept.tgz.*" > /dev/null; then
    cat "$FROM"/kept.tgz.* | tar -xzf - -C "$tmp"
    cp -v "$tmp"/kept/*.tgz .gpu/kept/ 2>/dev/null || true
fi
for first in "$FROM"/ckpt-*.tgz.00; do  # one archive per call, in pieces
    [[ -f $first ]] || continue
    stem=$(basename "${first%.00}")
    cat "$FROM/$stem".* > ".gpu/kept/$stem"
    echo "checkpoints: .gpu/kept/$stem ($(du -h ".gpu/kept/$stem" | cut -f1))"
done
for log in "$tmp"/logs/*.log; do
    echo "== $(basename "$log")"; tail -n 8 "$log"
done
