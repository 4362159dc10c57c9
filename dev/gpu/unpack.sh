#!/usr/bin/env bash
# Here, after a device call of dev/gpu/page_runs.sh: FILES_AT is the folder its $OUT came back to.
# The rows' JSON go to docs/results/data/ (then: engram results render PAGE, check, stale), the
# kept page runs to .gpu/kept/ (carried to a later machine, which resumes them), the logs' ends
# are shown.
set -euo pipefail
FROM=${1:?usage: bash dev/gpu/unpack.sh FILES_AT}
cd "$(dirname "$0")/../.."
if [[ -d $FROM/data ]]; then
    (cd "$FROM/data" && find . -name '*.json' -print0 | xargs -0 -r cp -v --parents -t "$OLDPWD/docs/results/data")
fi
if compgen -G "$FROM/kept/*.tgz" > /dev/null; then
    mkdir -p .gpu/kept && cp -v "$FROM"/kept/*.tgz .gpu/kept/
fi
for log in "$FROM"/*.log; do
    [[ -f $log ]] && { echo "== $log"; tail -n 8 "$log"; }
done
