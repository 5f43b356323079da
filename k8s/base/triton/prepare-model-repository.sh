#!/bin/sh
# Init container of the Triton pod: build the model repository Triton serves from
#   $MODEL_CONFIG                  (config.pbtxt from the ConfigMap kustomize generates)
#   $VISLOC_BUNDLE/model.onnx      (the bundle on the read-only bundle volume)
# into $MODEL_REPOSITORY/visloc/{config.pbtxt,1/model.onnx} (an emptyDir), so Triton and the
# Locate service serve the same bundle: both read VISLOC_BUNDLE from the same ConfigMap, and
# changing it rolls both Deployments.
#
# Waits up to $BUNDLE_WAIT_S for the bundle (the bundle Job may still be writing it) and
# refuses a bundle whose cell count differs from the config's cell_probs dims (Triton would
# fail to load the model with a less helpful message). POSIX sh: runs in the Triton image.
set -eu

bundle="${VISLOC_BUNDLE:?VISLOC_BUNDLE is not set}"
config="${MODEL_CONFIG:-/config/config.pbtxt}"
repository="${MODEL_REPOSITORY:-/models}"
wait_s="${BUNDLE_WAIT_S:-1800}"
model="${MODEL_NAME:-visloc}"

waited=0
until [ -f "$bundle/manifest.json" ] && [ -f "$bundle/model.onnx" ]; do
  if [ "$waited" -ge "$wait_s" ]; then
    echo "prepare-model-repository: no bundle at $bundle after ${wait_s}s (is the bundle Job done?)" >&2
    exit 1
  fi
  [ $((waited % 60)) -eq 0 ] && echo "prepare-model-repository: waiting for the bundle at $bundle"
  sleep 5
  waited=$((waited + 5))
done

# "num_cells": M in the manifest; dims of the output named cell_probs in the config.
bundle_cells=$(sed -n 's/^[[:space:]]*"num_cells":[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$bundle/manifest.json" | head -n 1)
config_cells=$(awk '
  /^[[:space:]]*#/ { next }
  /name:[[:space:]]*"cell_probs"/ { found = 1; next }
  found && /dims/ { gsub(/[^0-9]/, ""); print; exit }
' "$config")
if [ -z "$bundle_cells" ] || [ -z "$config_cells" ]; then
  echo "prepare-model-repository: cannot read the cell count (bundle: '$bundle_cells', config: '$config_cells')" >&2
  exit 1
fi
if [ "$bundle_cells" != "$config_cells" ]; then
  echo "prepare-model-repository: bundle $bundle has M=$bundle_cells cells but the Triton config's cell_probs has $config_cells;" >&2
  echo "  render a config for this bundle (visloc-triton --bundle DIR --print-config production) or serve the matching bundle" >&2
  exit 1
fi

mkdir -p "$repository/$model/1"
cp "$config" "$repository/$model/config.pbtxt.tmp"
mv "$repository/$model/config.pbtxt.tmp" "$repository/$model/config.pbtxt"
cp "$bundle/model.onnx" "$repository/$model/1/model.onnx.tmp"
mv "$repository/$model/1/model.onnx.tmp" "$repository/$model/1/model.onnx"
echo "prepare-model-repository: $model from $bundle (M=$bundle_cells) ready in $repository"
