#!/usr/bin/env bash
# On the lent GPU machine (one call of at most 10 minutes; at most 8 files of 16 MiB, 64 MiB in all,
# come back from $OUT): install what the machine lacks from .gpu/ (dev/gpu/make_carry.sh), then run
# results page runs at once, each kept in /tmp/engram-gpu/keep/NAME, which the next call on the same
# warm machine resumes. $OUT gets rows.tgz (the rows' JSON the runs wrote, every log), kept.tgz.NN
# (each page run's folder without its cache and checkpoints) and ckpt-STAMP.tgz.NN (the checkpoints of
# the unfinished runs, the furthest first, as many as fit), for dev/gpu/unpack.sh here.
#
#   RUNS="NAME|PAGE|JOBS|DEVICE|ROWS[|OPTIONS[|COMMIT]] ..." DEADLINE=520 CKPT=1000 bash dev/gpu/page_runs.sh
#
# ROWS: row ids or globs, comma-separated. OPTIONS: more `engram results run` flags, comma-separated
# (e.g. --complete). COMMIT: run at that commit, in a git worktree with its own packages (a kept page
# run resumes only at the commit it began). DEADLINE: seconds from this script's start at which page
# runs are stopped (each stop takes up to 40 s more; archiving about 30 s). CKPT: --checkpoint-every.
set -uo pipefail  # not -e: one page run that fails must not lose the others' results
START=$(date +%s)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-python3}
OUT=${OUT:?set OUT to the folder whose files come back}
STATE=${ENGRAM_GPU_STATE:-/tmp/engram-gpu}
DEADLINE=${DEADLINE:-520}
CKPT=${CKPT:-1000}
RUNS=${RUNS:?set RUNS (see the head of this script)}
BUNDLE=$STATE/bundle-$START  # what becomes $OUT/rows.tgz and kept.tgz.NN
mkdir -p "$STATE/keep" "$BUNDLE/data" "$BUNDLE/kept" "$BUNDLE/logs"
SETUP_LOG=$BUNDLE/logs/setup.log
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$SETUP_LOG"; }

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
    $PY -m pip install --quiet --upgrade --no-index --no-deps --target "$site" "$ROOT"/.gpu/whl/*.whl >> "$SETUP_LOG" 2>&1 || return 1
    local pkgs=("$src" "$src"/plugins/*/ "$src"/examples/engram-example-slots)
    PYTHONPATH=$site $PY -m pip install --quiet --upgrade --no-deps --no-build-isolation --target "$site" "${pkgs[@]}" >> "$SETUP_LOG" 2>&1 || return 1
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
    ) >> "$SETUP_LOG" 2>&1
}

log "checkout $(git -C "$ROOT" rev-parse --short HEAD 2>&1); changes: $(git -C "$ROOT" status --porcelain | grep -v ' docs/results/' | head -5 | tr '\n' ' ')"
install_site "$ROOT" "$STATE/site" || log "install failed: see setup.log"
check_site "$ROOT" "$STATE/site"

names=(); srcs=(); pids=(); unpacked=0
read -r -a specs <<< "$RUNS"  # not `for spec in $RUNS`: its row globs are for the pipeline, not this shell
for spec in "${specs[@]}"; do
    IFS='|' read -r name page jobs device rows options commit <<< "$spec"
    src=$ROOT; site=$STATE/site
    if [[ -n ${commit:-} ]]; then
        src=$STATE/wt-$commit; site=$STATE/site-$commit
        [[ -d $src ]] || git -C "$ROOT" worktree add --detach "$src" "$commit" >> "$SETUP_LOG" 2>&1
        install_site "$src" "$site" || { log "$name: install at $commit failed"; continue; }
    fi
    keep=$STATE/keep/$name
    if [[ ! -f $keep/page_run.json && -f $ROOT/.gpu/kept/$name.tgz ]]; then  # a page run an earlier machine kept
        tar -xzf "$ROOT/.gpu/kept/$name.tgz" -C "$STATE/keep"
        log "$name: unpacked the kept page run"
        unpacked=1
    fi
    resume=""; [[ -f $keep/page_run.json ]] && resume="--resume"
    left=$(( START + DEADLINE - $(date +%s) ))
    cmd="$PY -m engram_core.tools.results run $page --rows ${rows//,/ } --device $device --jobs $jobs --keep $keep $resume --deadline $left --checkpoint-every $CKPT --no-render ${options//,/ }"
    log "$name: $cmd (in $src)"
    touch "$STATE/launch-$name-$START"  # the rows' JSON written after it come back
    if [[ $unpacked == 1 && ! -f $STATE/keep/.ckpt-unpacked ]]; then  # their checkpoints, oldest archive first
        for ckpt in $(ls "$ROOT"/.gpu/kept/ckpt-*.tgz 2>/dev/null | sort); do tar -xzf "$ckpt" -C "$STATE/keep"; done
        touch "$STATE/keep/.ckpt-unpacked"
    fi
    (set -f; cd "$src" && PYTHONPATH=$site exec $cmd) > "$BUNDLE/logs/$name.log" 2>&1 &
    names+=("$name"); srcs+=("$src"); pids+=($!)
done

for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; log "${names[$i]}: exit $?"
done

# what comes back (8 files, 16 MiB each, 64 MiB in all): the rows' JSON and the logs, each page run's
# folder without its cache and checkpoints, and the checkpoints of unfinished runs (a later machine
# resumes them; finished runs need none), the furthest runs first, in 15 MiB pieces, as many as fit
for i in "${!names[@]}"; do
    name=${names[$i]}; src=${srcs[$i]}
    (cd "$src/docs/results/data" && find . -name '*.json' -newer "$STATE/launch-$name-$START" -print0 | xargs -0 -r cp --parents -t "$BUNDLE/data")
    [[ -d $STATE/keep/$name ]] && tar -czf "$BUNDLE/kept/$name.tgz" -C "$STATE/keep" --exclude=cache --exclude=checkpoints "$name"
done
log "rows written: $(cd "$BUNDLE/data" && find . -name '*.json' | tr '\n' ' ')"
tar -czf "$OUT/rows.tgz" -C "$BUNDLE" data logs  # small, and first: the rows never wait on the rest
tar -czf - -C "$BUNDLE" kept | split -b 15m -d - "$OUT/kept.tgz."
room=$(( 62 * 1024 * 1024 - $(du -cb "$OUT"/* | tail -1 | cut -f1) ))
pieces=$(( 8 - $(ls "$OUT" | wc -l) ))
room=$(( room < pieces * 15 * 1024 * 1024 ? room : pieces * 15 * 1024 * 1024 ))
$PY - "$STATE/keep" "$room" "${names[@]}" > "$STATE/ckpt-$START.list" <<'PYEOF'
import json, sys
from pathlib import Path
keep, room, names = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
unfinished = []
for name in names:
    for ckpt in (keep / name).rglob("checkpoints"):
        try:
            done = json.loads((ckpt.parent / "summary.json").read_text()).get("status") == "completed"
        except (OSError, ValueError):
            done = False
        if done:
            continue
        step = 0  # how far the run got: the last whole line of its metrics
        for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines() if (ckpt.parent / "metrics.jsonl").exists() else ():
            try:
                step = json.loads(line).get("step", step)
            except ValueError:
                pass
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        unfinished.append((step, size, ckpt))
for step, size, ckpt in sorted(unfinished, key=lambda t: -t[0]):  # float weights do not compress: raw size is the bound
    if size <= room:
        room -= size
        print(ckpt.relative_to(keep))
    else:
        print(f"left out (no room): {ckpt.relative_to(keep)} at step {step}", file=sys.stderr)
PYEOF
if [[ -s $STATE/ckpt-$START.list ]]; then
    tar -czf - -C "$STATE/keep" -T "$STATE/ckpt-$START.list" | split -b 15m -d - "$OUT/ckpt-$START.tgz."
fi
ls -la "$OUT"
for name in "${names[@]}"; do echo "== $name"; tail -n 6 "$BUNDLE/logs/$name.log"; done
