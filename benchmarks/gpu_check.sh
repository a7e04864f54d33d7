#!/usr/bin/env bash
# The GPU issue's measurements in one go, for the first session that is lent a GPU (device tool:
# one call of at most 10 minutes). Prepare here first:  bash benchmarks/gpu_check.sh --wheels
# (downloads, on this machine, the wheels the GPU image lacks into .whl/, git-ignored: benchmarks/gpu_wheels.py),
# then run there:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# 1. tests: the CUDA tests (tests/test_gpu.py: hot loop and TTA under sync-debug "error";
#    tests/test_data_paths.py: GPU-resident = host = memory-mapped batches), then the unit suite
#    without the engine tests (Snakemake is not carried there), in one process
#    (-o addopts= drops pyproject's pytest-xdist options: the GPU image may lack it);      ~2 min
# 2. benchmarks/bench_speed.py on the GPU: resnet18, efficientnet_b0, densenet169, seresnet50,
#    hcd loop / bare step, hcd / a tifffile Dataset + DataLoader (the peer), TTA x8 / bare forward,
#    patches/s, peak GPU memory;                                                    ~3-4 min
# 3. configs/gpu-speedrun.yaml on a generated dataset (HCD_GPU_N_TRAIN patches, default 100,000)
#    stage by stage (benchmarks/run_stages.py: the table's commands in order, each timed);  ~4 min
#    its check and download stages (rendering 125,000 patches: a CPU job of 1-2 minutes on 8 cores)
#    run in the background, niced, on half the cores, while steps 1-2 use the GPU.
# Figures: $OUT/results.json (bench_speed's, for benchmarks/results.json) and $OUT/gpu_check.json (stage times, AUCs).
# Rehearse here first: bash benchmarks/gpu_check.sh --rehearse  (every step on the CPU, in a venv with the image's
# Python and versions, small sizes; about 10 minutes, 5 more the first time; figures in benchmarks/out/rehearsal/).
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
    export HCD_GPU_CHECK_PARAMS=${HCD_GPU_CHECK_PARAMS:-'{"train": {"batch_size": 64, "epochs": 2}, "predict": {"batch_size": 256}}'}
    export HCD_GPU_CHECK_BENCH_ARGS=${HCD_GPU_CHECK_BENCH_ARGS:-"--batch 16 --steps 2"}  # a CPU's pace: checks the code path, not speed
    exec bash "$0"
fi

OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT" benchmarks/out
export PYTHONPATH=$PWD HCD_WORKERS=${HCD_WORKERS:-16} DVC_NO_ANALYTICS=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if [[ -d .whl ]]; then  # none of them is in the image; --no-deps: the image's own versions stay (a pin such as
    # celery's python-dateutil==2.9.0.post0 would otherwise stop pip's resolver on a module hcd never imports)
    python3 -m pip install -q --no-index --no-deps .whl/*.whl > "$OUT/pip.txt" 2>&1 || { echo "carried wheels did not install:"; tail -5 "$OUT/pip.txt"; }
    python3 -m pip check >> "$OUT/pip.txt" 2>&1 || true
fi
python3 -c "import dvclive.live, dvc.repo, pytorch_grad_cam, isal, ruamel.yaml, pydantic, kaggle.api; print('the carried packages import')" 2>&1 | tail -1 | tee "$OUT/imports.txt" || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/torch.txt"

start=$(date +%s)
# One deadline for all steps, inside the device call's 600 s: each step's timeout is cut to what is left, and step 3
# stops its stage in time to write the report, so a slow step costs the later ones time, never the figures so far.
export HCD_GPU_CHECK_DEADLINE=$(( start + ${HCD_GPU_CHECK_BUDGET:-570} ))
left() { local l=$(( HCD_GPU_CHECK_DEADLINE - $(date +%s) )); (( l > $1 )) && l=$1; (( l < 1 )) && l=1; echo "$l"; }
report="$(cd "$OUT" && pwd)/gpu_check.json"
steps=${HCD_GPU_CHECK_STEPS:-1 2 3}  # a rerun can take only some, e.g. HCD_GPU_CHECK_STEPS=3
# HCD_GPU_CHECK_PARAMS='{"train": {"batch_size": 512}}' changes step 3's params (JSON, merged one level deep)
rm -f "$report"
if [[ " $steps " == *" 3 "* ]]; then
work=$(mktemp -d)  # step 3's workspace, set up first so that its data renders while steps 1-2 run
git ls-files -z | xargs -0 -I{} cp --parents {} "$work/" 2>/dev/null
(
cd "$work"
python3 -m hcd params apply configs/gpu-speedrun.yaml >/dev/null
python3 - <<'PY'
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
n = int(os.environ.get("HCD_GPU_N_TRAIN", "100000"))
p["data"] = {**p["data"], "source": "demo", "demo": {**p["data"]["demo"], "n_train": n, "n_test": n // 4, "n_slides": max(60, n // 110)}}
p["split"]["groups"] = "data/groups/demo_slides.csv"
for key, value in json.loads(os.environ.get("HCD_GPU_CHECK_PARAMS", "{}")).items():  # a rerun's changes, e.g. a smaller batch
    p[key] = {**p[key], **value} if isinstance(value, dict) and isinstance(p.get(key), dict) else value
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
python3 -m hcd demo-truth data/groups
python3 -m hcd pipeline prune >/dev/null  # the copied checkout's dvclive/<b>/ of the demo's backbones (check warns of them)
HCD_WORKERS=$(( $(nproc) > 1 ? $(nproc) / 2 : 1 )) nice -n 10 python3 benchmarks/run_stages.py "$report" only check download  # half the cores
) > "$OUT/gpu_check_data.txt" 2>&1 &
data_pid=$!
fi

if [[ " $steps " == *" 1 "* ]]; then
echo "== 1. tests"
timeout "$(left 150)" python3 -m pytest -o addopts= -q -p no:cacheprovider tests/test_gpu.py tests/test_data_paths.py 2>&1 | tail -5 | tee "$OUT/tests_cuda.txt" || true
timeout "$(left 120)" python3 -m pytest -o addopts= -q -p no:cacheprovider -m "not e2e and not realdata" -x tests/test_train.py tests/test_models_augment.py tests/test_kfold.py tests/test_gpuslots.py 2>&1 | tail -3 | tee "$OUT/tests_unit.txt" || true
fi

if [[ " $steps " == *" 2 "* ]]; then
echo "== 2. bench_speed"
# shellcheck disable=SC2086  # the extra arguments split into words on purpose
timeout "$(left 240)" python3 benchmarks/bench_speed.py --backbones resnet18 efficientnet_b0 densenet169 seresnet50 --crop 96 --skip-engines --skip-scan --out "$OUT/results.json" ${HCD_GPU_CHECK_BENCH_ARGS:-} 2>&1 | tail -25 | tee "$OUT/bench_speed.txt" || true
fi

if [[ " $steps " == *" 3 "* ]]; then
echo "== 3. gpu-speedrun on generated data"
wait "$data_pid" || { echo "generating the data failed:"; tail -20 "$OUT/gpu_check_data.txt"; exit 1; }
cat "$OUT/gpu_check_data.txt"
cd "$work"
python3 benchmarks/run_stages.py "$report" except check download || true
cat "$report"
fi
echo "gpu_check: $(( $(date +%s) - start )) s"
