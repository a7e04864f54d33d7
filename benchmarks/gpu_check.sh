#!/usr/bin/env bash
# The GPU issue's measurements in one device call (at most 600 s, the machine's start-up not counted; a lease
# is 15 minutes of device time in all). Prepare here first:  bash benchmarks/gpu_check.sh --wheels
# (downloads, on this machine, the wheels the GPU image lacks into .whl/, git-ignored: benchmarks/gpu_wheels.py),
# then run there:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# In order of value, inside one deadline (HCD_GPU_CHECK_BUDGET seconds after the start, default 550):
# a. the twelve stages of configs/gpu-speedrun.yaml on a generated set of HCD_GPU_N_TRAIN patches (default
#    30,000, + a quarter as many test patches), each timed with its import time (benchmarks/run_stages.py).
#    The CPU stages (check, download = rendering the data, scan, split, stats) run in the background on most
#    cores while b uses the GPU; the GPU stages (train ... export) run after b, alone.
# b. the CUDA tests (tests/test_gpu.py, tests/test_data_paths.py) and the unit files that run a model, without
#    -x, every failure's traceback kept;
# c. benchmarks/bench_speed.py: resnet18 against the tuned reference at batch 1024 first, then each backbone's
#    plain bare step and hcd's loop with train.deterministic true and false and without augmentation.
# Every figure is written as it comes, so a call cut short keeps what was measured. $OUT gets at most 8 files
# (the device tool returns no more): env.txt, tests.txt, stages.txt, gpu_check.json, bench.txt, results.json.
# Rehearse here first: bash benchmarks/gpu_check.sh --rehearse  (every step on the CPU, in a venv with the image's
# Python and versions, small sizes; figures in benchmarks/out/rehearsal/).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--wheels" ]]; then  # here, not there: the GPU machine reaches no network
    python3 benchmarks/gpu_wheels.py .whl  # what the image lacks (DVC's closure, for dvclive), pinned
    exit 0
fi

if [[ "${1:-}" == "--rehearse" ]]; then  # here, on the CPU: every step in a venv that stands in for the image
    [[ -f .whl/image-requirements.txt ]] || { echo "gpu_check: run 'bash benchmarks/gpu_check.sh --wheels' first"; exit 2; }
    venv=.gpu-rehearsal  # the image's Python (3.12) and versions of torch, numpy, onnx...: .whl/image-requirements.txt
    [[ -x $venv/bin/python3 ]] || "$(python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import gpu_wheels; print(gpu_wheels.python312())')" -m venv "$venv"
    "$venv/bin/python3" -m pip install -q -r .whl/image-requirements.txt 2>&1 | grep -v "^WARNING" || true
    export PATH="$PWD/$venv/bin:$PATH" OUT=${OUT:-benchmarks/out/rehearsal} HCD_GPU_N_TRAIN=${HCD_GPU_N_TRAIN:-1600} HCD_WORKERS=$(nproc)
    export HCD_GPU_CHECK_PARAMS=${HCD_GPU_CHECK_PARAMS:-'{"train": {"batch_size": 32, "epochs": 2, "max_steps": 3}, "predict": {"batch_size": 256, "tta": 2}}'} HCD_GPU_CHECK_BUDGET=${HCD_GPU_CHECK_BUDGET:-1500}
    export HCD_GPU_CHECK_BENCH_ARGS=${HCD_GPU_CHECK_BENCH_ARGS:-"--backbones cnn --tuned cnn --tuned-batch 32 --batch 16 --steps 2 --gpu-tables"}  # the code path, not speed
    export HCD_GPU_CHECK_TESTS=${HCD_GPU_CHECK_TESTS:-"tests/test_gpu.py tests/test_data_paths.py tests/test_train.py"}
    exec bash "$0"
fi

OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT" benchmarks/out
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD HCD_WORKERS=${HCD_WORKERS:-16} DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
start=$(date +%s)
# One deadline for all steps: each step's timeout is cut to what is left, and the stage runner stops its stage in
# time to write the report, so a slow step costs the later ones time, never the figures so far.
export HCD_GPU_CHECK_DEADLINE=$(( start + ${HCD_GPU_CHECK_BUDGET:-550} ))
left() { local l=$(( HCD_GPU_CHECK_DEADLINE - $(date +%s) )); (( l > $1 )) && l=$1; (( l < 1 )) && l=1; echo "$l"; }
stamp() { echo "== $(( $(date +%s) - start )) s: $*"; }

{
stamp "environment"
nvidia-smi || true
if [[ -d .whl ]]; then  # none of them is in the image; --no-deps: the image's own versions stay (a pin such as
    # celery's python-dateutil==2.9.0.post0 would otherwise stop pip's resolver on a module hcd never imports)
    python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v "^WARNING: Running pip as" || echo "carried wheels: pip said the above"
fi
python3 -c "import dvclive.live, dvc.repo, pytorch_grad_cam, isal, ruamel.yaml, pydantic, kaggle.api; print('the carried packages import')" 2>&1 | tail -1
python3 -c "import sys, torch, timm, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nproc; free -g | head -2
} > "$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt"

report="$OUT/gpu_check.json"
rm -f "$report"
work=$(mktemp -d)  # a's workspace: a copy of the checkout with the speed-run's params
git ls-files -z | xargs -0 -I{} cp --parents {} "$work/" 2>/dev/null
(
cd "$work"
python3 -m hcd params apply configs/gpu-speedrun.yaml >/dev/null
python3 - <<'PY'
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
n = int(os.environ.get("HCD_GPU_N_TRAIN", "30000"))
p["data"] = {**p["data"], "source": "demo", "demo": {**p["data"]["demo"], "n_train": n, "n_test": n // 4, "n_slides": max(60, n // 110)}}
p["split"]["groups"] = "data/groups/demo_slides.csv"
for key, value in json.loads(os.environ.get("HCD_GPU_CHECK_PARAMS", "{}")).items():  # a rerun's changes, e.g. a smaller batch
    p[key] = {**p[key], **value} if isinstance(value, dict) and isinstance(p.get(key), dict) else value
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
python3 -m hcd demo-truth data/groups
python3 -m hcd pipeline prune >/dev/null  # the copied checkout's dvclive/<b>/ of the demo's backbones (check warns of them)
stamp "a. CPU stages (background, $(( $(nproc) * 3 / 4 )) workers)"
HCD_WORKERS=$(( $(nproc) > 1 ? $(nproc) * 3 / 4 : 1 )) python3 benchmarks/run_stages.py "$report" only check download scan split stats
) > "$OUT/stages.txt" 2>&1 &
cpu_stages=$!

stamp "b. tests" | tee "$OUT/tests.txt"
# -o addopts= drops pyproject's pytest-xdist options (the image may lack it); -rfE: a summary line per failure;
# --tb=long: whole tracebacks. Snakemake is not carried: the engine (e2e) tests stay here.
# shellcheck disable=SC2086  # the list splits into words on purpose
timeout "$(left 200)" python3 -m pytest -o addopts= -p no:cacheprovider -q -rfE --tb=long -m "not e2e and not realdata" \
    ${HCD_GPU_CHECK_TESTS:-tests/test_gpu.py tests/test_data_paths.py tests/test_train.py tests/test_models_augment.py tests/test_kfold.py tests/test_bundle.py tests/test_gpuslots.py} >> "$OUT/tests.txt" 2>&1 || true
tail -4 "$OUT/tests.txt"

stamp "a. GPU stages"
wait "$cpu_stages" || { echo "the CPU stages failed:"; tail -20 "$OUT/stages.txt"; }
if grep -q '"only check download scan split stats": "ok"' "$report" 2>/dev/null; then
    (cd "$work" && stamp "a. GPU stages" && python3 benchmarks/run_stages.py "$report" except check download scan split stats) >> "$OUT/stages.txt" 2>&1 || true
fi
grep -E "^(train|predict|ensemble|metrics|explain|report|export|check|download|scan|split|stats)" "$OUT/stages.txt" | cut -c1-160 || true

stamp "c. bench_speed" | tee "$OUT/bench.txt"
# shellcheck disable=SC2086  # the extra arguments split into words on purpose
timeout "$(left 400)" python3 benchmarks/bench_speed.py --backbones resnet18 efficientnet_b0 seresnet50 densenet169 --crop 96 --steps 30 \
    --skip-engines --skip-scan --skip-peer --skip-tta --out "$OUT/results.json" ${HCD_GPU_CHECK_BENCH_ARGS:-} >> "$OUT/bench.txt" 2>&1 || true
grep -E "^(tuned|modes|device)" "$OUT/bench.txt" || tail -5 "$OUT/bench.txt"
stamp "done"
cat "$report" 2>/dev/null || true
