#!/bin/sh
# Init container of the Triton pod: build the model repository Triton serves from
#   $MODEL_CONFIG                  (config.pbtxt from the ConfigMap kustomize generates)
#   $VISLOC_BUNDLE/model.onnx      (the bundle on the read-only bundle volume)
#   $VISLOC_EXTRA_BUNDLES          (optional, space-separated: more bundles whose models are
#                                   served next to it, e.g. the previous one during a rollout)
# into $MODEL_REPOSITORY/visloc/{config.pbtxt,<version>/model.onnx} (an emptyDir). <version> is
# the bundle's Triton version (its model's sha256, first 12 hex digits, as a decimal number:
# swc_service.bundle.triton_version), the EXACT version the Locate service on that bundle asks
# for; config.pbtxt's `version_policy: all` serves every version placed. So Triton and the Locate
# service serve the same bundle (both read VISLOC_BUNDLE from the same ConfigMap, and changing
# it rolls both Deployments), and a service pod never gets another bundle's model: a version
# that is not there is an error, never a different model (docs/deploy.md "Rolling out a new bundle").
#
# Waits up to $BUNDLE_WAIT_S for each bundle (the bundle Job may still be writing it) and
# refuses a bundle whose cell count differs from the config's cell_probs dims (Triton would
# fail to load the model with a less helpful message). POSIX sh: runs in the Triton image.
set -eu

bundle="${VISLOC_BUNDLE:?VISLOC_BUNDLE is not set}"
config="${MODEL_CONFIG:-/config/config.pbtxt}"
repository="${MODEL_REPOSITORY:-/models}"
wait_s="${BUNDLE_WAIT_S:-1800}"
model="${MODEL_NAME:-visloc}"

# "num_cells": M in the manifest; dims of the output named cell_probs in the config.
config_cells=$(awk '
  /^[[:space:]]*#/ { next }
  /name:[[:space:]]*"cell_probs"/ { found = 1; next }
  found && /dims/ { gsub(/[^0-9]/, ""); print; exit }
' "$config")

place() {
  b="$1"
  waited=0
  until [ -f "$b/manifest.json" ] && [ -f "$b/model.onnx" ]; do
    if [ "$waited" -ge "$wait_s" ]; then
      echo "prepare-model-repository: no bundle at $b after ${wait_s}s (is the bundle Job done?)" >&2
      exit 1
    fi
    [ $((waited % 60)) -eq 0 ] && echo "prepare-model-repository: waiting for the bundle at $b"
    sleep 5
    waited=$((waited + 5))
  done
  bundle_cells=$(sed -n 's/^[[:space:]]*"num_cells":[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$b/manifest.json" | head -n 1)
  if [ -z "$bundle_cells" ] || [ -z "$config_cells" ]; then
    echo "prepare-model-repository: cannot read the cell count (bundle $b: '$bundle_cells', config: '$config_cells')" >&2
    exit 1
  fi
  if [ "$bundle_cells" != "$config_cells" ]; then
    echo "prepare-model-repository: bundle $b has M=$bundle_cells cells but the Triton config's cell_probs has $config_cells;" >&2
    echo "  render a config for this bundle (visloc-triton --bundle DIR --print-config production) or serve the matching bundle" >&2
    exit 1
  fi
  # The manifest's sha256 of model.onnx (json.dumps indent=2: the line after "model.onnx": {).
  sha=$(awk '
    /"model.onnx":[[:space:]]*\{/ { found = 1; next }
    found && /"sha256"/ { sub(/.*"sha256":[[:space:]]*"/, ""); sub(/".*/, ""); print; exit }
  ' "$b/manifest.json")
  hex=$(printf '%s' "$sha" | cut -c1-12)
  case "$hex" in
    *[!0-9a-f]* | "") hex="" ;;
  esac
  if [ "${#hex}" -ne 12 ]; then
    echo "prepare-model-repository: $b/manifest.json has no sha256 of model.onnx ('$sha')" >&2
    exit 1
  fi
  version=$((0x$hex))
  mkdir -p "$repository/$model/$version"
  cp "$b/model.onnx" "$repository/$model/$version/model.onnx.tmp"
  mv "$repository/$model/$version/model.onnx.tmp" "$repository/$model/$version/model.onnx"
  echo "prepare-model-repository: $model version $version from $b (M=$bundle_cells)"
}

for b in "$bundle" ${VISLOC_EXTRA_BUNDLES:-}; do
  place "$b"
done
cp "$config" "$repository/$model/config.pbtxt.tmp"
mv "$repository/$model/config.pbtxt.tmp" "$repository/$model/config.pbtxt"
echo "prepare-model-repository: $model ready in $repository (versions: $(ls "$repository/$model" | grep -v config | tr '\n' ' '))"
