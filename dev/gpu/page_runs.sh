#!/usr/bin/env bash
# On the lent GPU machine (one call of at most 10 minutes; what is written under $OUT comes back):
# install what the machine lacks from .gpu/ (dev/gpu/make_carry.sh), then run results page runs
# at once, each kept in /tmp/engram-gpu/keep/NAME, which the next call on the same warm machine
# resumes and which is archived into $OUT/kept/ for a later machine (dev/gpu/unpack.sh).
#
#   RUNS="NAME|PAGE|JOBS|DEVICE|ROWS[|OPTIONS[|COMMIT]] ..." DEADLINE=520 CKPT=1000 bash dev/gpu/page_runs.sh
#
# ROWS: row ids or globs, comma-separated. OPTIONS: more `engram results run` flags, comma-separated
# (e.g. --complete). COMMIT: run at that commit, in a git worktree with its own packages (a kept page
# run resumes only at the commit it began). DEADLINE: seconds from this script's start at which page
# runs are stopped (each stop takes up to 40 s more; archiving about 30 s). CKPT: --checkpoint-every.
set -uo pipefail  # not -e: one page run that fails must not lose the others' results
set -f            # ROWS are globs for the pipeline, not for this shell
START=$(date +%s)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-python3}
OUT=${OUT:?set OUT to the folder whose files come back}
STATE=${ENGRAM_GPU_STATE:-/tmp/engram-gpu}
DEADLINE=${DEADLINE:-520}
CKPT=${CKPT:-1000}
RUNS=${RUNS:?set RUNS (see the head of this script)}
mkdir -p "$STATE/keep" "$OUT/kept" "$OUT/data"
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/setup.log"; }

tilelang() {  # tilelang and its requirements, added after the machine's own packages (its versions win)
    local site=$1
    [[ -f $ROOT/.gpu/tl-py312.tar.xz ]] || return 0
    if [[ ! -f $STATE/tl/.ready ]]; then
        mkdir -p "$STATE/tl" && tar -xJf "$ROOT/.gpu/tl-py312.tar.xz" -C "$STATE/tl" && touch "$STATE/tl/.ready"
    fi
    # sitecustomize runs at every start of Python; the machine's own one (if any) still runs after it
    cat > "$site/sitecustomize.py" <<PYEOF
import importlib.machinery, importlib.util, os, site, sys
site.addsitedir("$STATE/tl")
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
PYEOF
}

install_site() {  # the carried wheels and the checkout's packages (engram-core, every plugin) into a --target folder
    local src=$1 site=$2
    [[ -f $site/.ready ]] && return 0
    mkdir -p "$site"
    log "installing into $site from $src"
    $PY -m pip install --quiet --upgrade --no-index --no-deps --target "$site" "$ROOT"/.gpu/whl/*.whl >> "$OUT/setup.log" 2>&1 || return 1
    local pkgs=("$src" "$src"/plugins/*/ "$src"/examples/engram-example-slots)
    PYTHONPATH=$site $PY -m pip install --quiet --upgrade --no-deps --no-build-isolation --target "$site" "${pkgs[@]}" >> "$OUT/setup.log" 2>&1 || return 1
    tilelang "$site"
    touch "$site/.ready"
}

check_site() {
    (cd "$1" && PYTHONPATH=$2 $PY - <<'PYEOF'
import importlib, importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for dist in ("engram-core", "engram-fla", "engram-example-slots", "attrs", "cattrs", "zarr", "fla-core", "flash-linear-attention", "transformers", "tilelang"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist}: not installed")
for module in ("engram_core.run", "fla.layers", "tilelang"):
    try:
        importlib.import_module(module)
    except Exception as exc:  # report, do not stop: rows that need it will say so themselves
        print(f"  import {module}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
print("entry points:", sorted(ep.name for ep in md.entry_points(group="engram")))
PYEOF
    ) >> "$OUT/setup.log" 2>&1
}

log "checkout $(git -C "$ROOT" rev-parse --short HEAD 2>&1); changes: $(git -C "$ROOT" status --porcelain | grep -v ' docs/results/' | head -5 | tr '\n' ' ')"
install_site "$ROOT" "$STATE/site" || log "install failed: see setup.log"
check_site "$ROOT" "$STATE/site"

names=(); srcs=(); pids=()
for spec in $RUNS; do
    IFS='|' read -r name page jobs device rows options commit <<< "$spec"
    src=$ROOT; site=$STATE/site
    if [[ -n ${commit:-} ]]; then
        src=$STATE/wt-$commit; site=$STATE/site-$commit
        [[ -d $src ]] || git -C "$ROOT" worktree add --detach "$src" "$commit" >> "$OUT/setup.log" 2>&1
        install_site "$src" "$site" || { log "$name: install at $commit failed"; continue; }
    fi
    keep=$STATE/keep/$name
    if [[ ! -f $keep/page_run.json && -f $ROOT/.gpu/kept/$name.tgz ]]; then  # a page run an earlier machine kept
        tar -xzf "$ROOT/.gpu/kept/$name.tgz" -C "$STATE/keep"
        [[ -f $ROOT/.gpu/kept/ckpt-$name.tgz ]] && tar -xzf "$ROOT/.gpu/kept/ckpt-$name.tgz" -C "$STATE/keep"
        log "$name: unpacked the kept page run"
    fi
    resume=""; [[ -f $keep/page_run.json ]] && resume="--resume"
    left=$(( START + DEADLINE - $(date +%s) ))
    cmd="$PY -m engram_core.tools.results run $page --rows ${rows//,/ } --device $device --jobs $jobs --keep $keep $resume --deadline $left --checkpoint-every $CKPT --no-render ${options//,/ }"
    log "$name: $cmd (in $src)"
    touch "$STATE/launch-$name-$START"  # the rows' JSON written after it come back
    (cd "$src" && PYTHONPATH=$site exec $cmd) > "$OUT/$name.log" 2>&1 &
    names+=("$name"); srcs+=("$src"); pids+=($!)
done

for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; log "${names[$i]}: exit $?"
done

# what comes back: the rows' JSON the page runs wrote, each page run's folder without its cache, and
# the checkpoints of runs not finished (a later machine resumes them; finished runs need none)
for i in "${!names[@]}"; do
    name=${names[$i]}; src=${srcs[$i]}
    (cd "$src/docs/results/data" && find . -name '*.json' -newer "$STATE/launch-$name-$START" -print0 | xargs -0 -r cp --parents -t "$OUT/data")
    [[ -d $STATE/keep/$name ]] || continue
    tar -czf "$OUT/kept/$name.tgz" -C "$STATE/keep" --exclude=cache --exclude=checkpoints "$name"
    $PY - "$STATE/keep" "$name" > "$STATE/ckpt-$name.list" <<'PYEOF'
import json, sys
from pathlib import Path
keep, name = Path(sys.argv[1]), sys.argv[2]
for ckpt in sorted((keep / name).rglob("checkpoints")):
    summary = ckpt.parent / "summary.json"
    try:
        done = json.loads(summary.read_text()).get("status") == "completed"
    except (OSError, ValueError):
        done = False
    if not done:
        print(ckpt.relative_to(keep))
PYEOF
    if [[ -s $STATE/ckpt-$name.list ]]; then
        tar -czf "$OUT/kept/ckpt-$name.tgz" -C "$STATE/keep" -T "$STATE/ckpt-$name.list"
    fi
done
log "done; rows written: $(cd "$OUT/data" && find . -name '*.json' | tr '\n' ' ')"
ls -la "$OUT/kept" >> "$OUT/setup.log"
for name in "${names[@]}"; do echo "== $name"; tail -n 6 "$OUT/$name.log"; done
