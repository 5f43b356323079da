#!/usr/bin/env bash
# GPU benchmark of the production Triton config, on a host with an NVIDIA GPU and Docker
# (NVIDIA Container Toolkit). Not run by CI; no GPU was lent to the session that wrote it.
#
#   bench/gpu.sh BUNDLE_DIR [OUT_DIR]
#
# 1. places the bundle's model into a copy of model_repository/ (config sized for its M);
# 2. onnxruntime CUDA EP: starts the NGC Triton image, runs perf_analyzer (NGC SDK image) at
#    concurrency 1..32 on 300x400 uint8 images, then the same with a mix of shapes;
# 3. TensorRT FP16: the same with the config's opt-in TensorRT block uncommented;
# 4. writes perf_analyzer CSVs and the GPU name to OUT_DIR.
# Compare the two runs (and with bench/results/bench.json from `make bench` on the CPU) as
# ratios measured on the same card.
set -euo pipefail
bundle=${1:?usage: bench/gpu.sh BUNDLE_DIR [OUT_DIR]}
out=${2:-bench/results/gpu}
triton_image=${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:24.10-py3}
sdk_image=${SDK_IMAGE:-nvcr.io/nvidia/tritonserver:24.10-py3-sdk}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'docker rm -f visloc-triton-bench >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv"

run_case() {  # $1: name, $2: model repository (TensorRT caches its engines in the container's /var/cache/triton)
  docker rm -f visloc-triton-bench >/dev/null 2>&1 || true
  docker run -d --name visloc-triton-bench --gpus 1 --shm-size 1g -p 127.0.0.1:18001:8001 \
    -v "$2":/models "$triton_image" tritonserver --model-repository=/models \
    --disable-auto-complete-config --model-control-mode=none >/dev/null
  for _ in $(seq 600); do
    if curl -fs 127.0.0.1:18001 >/dev/null 2>&1 || docker logs visloc-triton-bench 2>&1 | grep -q "Started GRPCInferenceService"; then break; fi
    sleep 1
  done
  for shape in 300,400,3 400,300,3 300,533,3; do
    docker run --rm --network host "$sdk_image" perf_analyzer -m visloc -i grpc -u 127.0.0.1:18001 \
      --shape "image:${shape}" --concurrency-range 1:32:2 --measurement-interval 5000 \
      -f "/dev/stdout" > "$out/${1}_${shape//,/x}.csv"
  done
  docker logs visloc-triton-bench > "$out/${1}_triton.log" 2>&1
}

mkdir -p "$work/ort" "$work/trt"
cp -r "$here/model_repository/." "$work/ort/"
"$here/.venv/bin/visloc-export" place --bundle "$bundle" --repository "$work/ort"
run_case ort_cuda "$work/ort"

cp -r "$work/ort/." "$work/trt/"
# Uncomment the opt-in TensorRT FP16 block between the BEGIN/END markers.
sed -i '/# BEGIN tensorrt/,/# END tensorrt/{/BEGIN tensorrt\|END tensorrt/!s/^# \{0,1\}//}' "$work/trt/visloc/config.pbtxt"
mkdir -p "$work/trt/trt_cache"
run_case tensorrt_fp16 "$work/trt"
echo "results in $out"
