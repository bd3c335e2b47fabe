#!/usr/bin/env bash
# The prepared GPU run: simulation and activation benchmarks on CUDA and a ResNet-20 CIFAR-10
# QCFS/NQ pair, inside one time budget (default 510 s), into one folder of at most 8 files.
# benchmarks/gpu_check.py says what each step does, its timeout and what it writes.
#
# 1. On the development machine, once (the GPU machine gets only the checkout, and no network):
#      bash benchmarks/gpu_check.sh --prepare
#    copies the CIFAR-10 archive to .data/cifar10-jpeg.tar.gz and downloads into .whl/ the
#    wheels the GPU image lacks (pydantic and its parts, spikingjelly and its loguru; CPython 3.12,
#    manylinux x86-64). Both folders are ignored by git.
# 2. On the GPU machine (device tool: carry [".data", ".whl"], timeout_s 600):
#      bash benchmarks/gpu_check.sh --out "$OUT"
#    then commit what it wrote under reports/gpu/ (the default --out when $OUT is unset).
# 3. To test this script on a CPU (toy sizes, synthetic data, about a minute of CPU time):
#      bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu_check_dry
#
# Options (passed to gpu_check.py): --out DIR, --data ARCHIVE (default: $CIFAR_ARCHIVE, then
# .data/cifar10-jpeg.tar.gz, then ../shared/data/cifar10-jpeg.tar.gz), --budget SECONDS,
# --max-epochs N, --skip env,simulate,activation,train, --dry-run.
# Environment: PYTHON (default: the checkout's .venv/bin/python if it has torch, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
        echo .venv/bin/python; return
    fi
    echo python3
}
PY=$(pick_python)
# what the GPU image lacks (KINDS.md lists its packages); versions: those of $PY where it has them
NEEDED="pydantic pydantic-core annotated-types typing-inspection typing-extensions spikingjelly loguru"

if [ "${1:-}" = "--prepare" ]; then
    src=${CIFAR_ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}
    [ -f "$src" ] || { echo "gpu_check --prepare: no archive at $src (set CIFAR_ARCHIVE)" >&2; exit 2; }
    mkdir -p .data .whl
    cp -f "$src" .data/cifar10-jpeg.tar.gz
    echo "archive: .data/cifar10-jpeg.tar.gz ($(du -h .data/cifar10-jpeg.tar.gz | cut -f1))"
    specs=()
    for pkg in $NEEDED; do
        v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg" 2>/dev/null || true)
        specs+=("$pkg${v:+==$v}")
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
    ls -1 .whl
    echo "wheels: .whl ($(du -sh .whl | cut -f1)); device run: carry [\".data\", \".whl\"]," \
         "command: bash benchmarks/gpu_check.sh --out \"\$OUT\""
    exit 0
fi

# the GPU image has torch but not the harness's pydantic (nor spikingjelly): install carried wheels
if ! "$PY" -c "import pydantic, annotated_types" 2>/dev/null || ! "$PY" -c "import spikingjelly" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        site=$(mktemp -d /tmp/gpu_check_site.XXXX)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check: installed $(ls .whl | wc -l) carried wheel(s) into $site"
    else
        echo "gpu_check: pydantic or spikingjelly is missing and .whl/ has no wheels (run --prepare where pip works);" \
             "continuing: steps that need them will fail and be recorded" >&2
    fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
