#!/usr/bin/env bash
# Build, on this machine, what the lent GPU machine lacks (Python 3.12, torch 2.11, transformers
# 5.17, triton 3.6, no network): .gpu/whl/ (the py3.12 wheels of the packages it does not have,
# about 5 MB) and, with --tilelang, .gpu/tl-py312.tar.xz (tilelang 0.1.15 and its requirements,
# about 41 MB: fla's Gated DeltaNet needs it on Hopper with triton < 3.7.1, docs/decisions.md).
# A device call carries at most 64 MiB with the repository's tracked files (about 16 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_12_x86_64 manylinux2010_x86_64 any)
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --only-binary=:all: --no-deps)
for p in "${PLATFORMS[@]}"; do TARGET+=(--platform "$p"); done

mkdir -p .gpu/whl
# what the machine lacks (FACTS.md, 2026-12-01/05): attrs >= 25.4 for cattrs 26, cattrs, tomli-w,
# zarr 3 (3.1.6: later releases need msgspec) with numcodecs, donfig and google-crc32c, tbparse
# (tests), fla and einops, argcomplete; setuptools to build our packages without isolation
pip download --quiet --dest .gpu/whl "${TARGET[@]}" \
    "attrs>=25.4" cattrs tomli-w "zarr==3.1.6" numcodecs donfig google-crc32c crc32c tbparse \
    "fla-core==0.6.0" "flash-linear-attention==0.6.0" einops argcomplete setuptools
du -sh .gpu/whl

if [[ "${1:-}" == "--tilelang" ]]; then
    work=$(mktemp -d)
    pip download --quiet --dest "$work/wheels" "${TARGET[@]}" "tilelang==0.1.15" "apache-tvm-ffi>=0.1.11,<0.1.13" \
        torch-c-dlpack-ext cloudpickle ml-dtypes psutil tqdm "z3-solver>=4.13.0,<4.15.5"
    pip install --quiet --no-index --target "$work/tree" "${TARGET[@]}" "$work"/wheels/*.whl
    # the z3 command-line binary is not used (22 MB), and libz3.so.4.15 is a copy of libz3.so
    rm -rf "$work/tree/bin/z3" "$work/tree/__pycache__"
    if cmp -s "$work/tree/z3/lib/libz3.so" "$work/tree/z3/lib/libz3.so.4.15"; then
        ln -sf libz3.so "$work/tree/z3/lib/libz3.so.4.15"
    fi
    tar -C "$work/tree" -cf - . | xz -T2 -9 > .gpu/tl-py312.tar.xz
    rm -rf "$work"
    ls -la .gpu/tl-py312.tar.xz
fi
