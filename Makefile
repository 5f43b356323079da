# visloc serving: `make demo` brings the local stack up and locates sample images;
# `make test` runs ruff and the test suite. Both install what they need into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNELS := $(VENV)/.kernels
BUNDLE ?=
DEMO_BUNDLE := .cache/demo-bundle
PYTEST_ARGS ?=

.PHONY: setup demo upstream test lint format proto bench soak capacity clean help

help:
	@echo "make demo      local Triton + Locate service + sample images (DEMO_ONESHOT=1 to exit after)"
	@echo "make test      ruff + pytest: everything, as CI runs it"
	@echo "make check     the edit loop: lint + the tests without live servers or the demo model (minutes)"
	@echo "make demo BUNDLE=DIR   serve another bundle (e.g. imported with visloc-export upstream)"
	@echo "make upstream  fetch the published model (~6 GB), import, verify, serve (UPSTREAM_URL=mirror)"
	@echo "make bench     benchmarks -> bench/results, docs/BENCHMARKS.md"
	@echo "make gate-seeds  the parity gate on 20 demo seeds, wrong models' margins -> bench/results, docs/BENCHMARKS.md"
	@echo "make capacity  10x spike through the prod HPAs -> bench/results/capacity.json, docs/img (docs/capacity.md)"

$(STAMP): pyproject.toml client/pyproject.toml swc_service/pyproject.toml swc_service/setup.py export/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on this machine's disk, never the CUDA one.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e "./client[plot,web,exif,preprocess,tracing]" -e "./swc_service[triton,tracing]" -e "./export[fetch]" -e . -r requirements-dev.txt
	touch $(STAMP)
	touch $(KERNELS)

# The service's C extension (SwC/PD inner loops) is built by the editable install; rebuild it
# when its source changes (an editable install does not notice).
$(KERNELS): $(STAMP) swc_service/src/swc_service/_kernels.c swc_service/setup.py
	$(PY) -m pip install -q --no-deps -e ./swc_service
	touch $(KERNELS)

setup: $(KERNELS)

# A demo bundle built before bundles carried probes with their float64 reference gets them
# (rebuilt from its seed; the service refuses a bundle it cannot check against Triton's model);
# one whose network can no longer be rebuilt is built again.
DEMO_READY := $(DEMO_BUNDLE)/probes/reference_cell_probs.npy

$(DEMO_BUNDLE)/manifest.json: | $(KERNELS)
	$(VENV)/bin/visloc-export demo --out $(DEMO_BUNDLE)

$(DEMO_READY): $(DEMO_BUNDLE)/manifest.json
	@test -f $@ || $(VENV)/bin/visloc-export add-probes $(DEMO_BUNDLE) \
		|| $(VENV)/bin/visloc-export demo --out $(DEMO_BUNDLE) --overwrite

demo: $(KERNELS) $(if $(BUNDLE),,$(DEMO_READY))
	$(PY) -m devtools.demo --bundle $(if $(BUNDLE),$(BUNDLE),$(DEMO_BUNDLE))

# The real model: fetch the published files (resumable, verified against SOURCES.json), import
# them into a bundle when they changed, verify it, then serve it as `make demo` does.
# UPSTREAM_URL=URL takes every file from a mirror. Offline, the fetch fails at once, in one line.
UPSTREAM_DIR := .cache/upstream
UPSTREAM_BUNDLE := .cache/upstream-bundle
UPSTREAM_URL ?=
UPSTREAM_CKPTS := --backbone $(UPSTREAM_DIR)/efficientnet_backbone.pt --mvmf $(UPSTREAM_DIR)/mvmf_head.pt \
	--rrm $(UPSTREAM_DIR)/rrm_head.pt

upstream: $(KERNELS)
	$(VENV)/bin/visloc-export fetch --out $(UPSTREAM_DIR) $(if $(UPSTREAM_URL),--base-url $(UPSTREAM_URL),) \
		--only efficientnet_backbone.pt mvmf_head.pt rrm_head.pt back_coll_features.hdf5 cells_assignments.pkl
	$(MAKE) --no-print-directory $(UPSTREAM_BUNDLE)/manifest.json
	$(VENV)/bin/visloc-export verify --bundle $(UPSTREAM_BUNDLE) $(UPSTREAM_CKPTS) --checksums
	$(MAKE) --no-print-directory demo BUNDLE=$(UPSTREAM_BUNDLE)

$(UPSTREAM_BUNDLE)/manifest.json: $(UPSTREAM_DIR)/SOURCES.json
	$(VENV)/bin/visloc-export upstream $(UPSTREAM_CKPTS) --background $(UPSTREAM_DIR)/back_coll_features.hdf5 \
		--assignments $(UPSTREAM_DIR)/cells_assignments.pkl --out $(UPSTREAM_BUNDLE) --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The web page's vendored libraries are compared with the packages themselves (npm registry).
WEB_PACKAGES := client/web/node_modules/.package-lock.json
$(WEB_PACKAGES): client/web/package-lock.json
	@command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm)
	cd client/web && npm ci --ignore-scripts --no-audit --no-fund

test: $(KERNELS) $(WEB_PACKAGES)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# What is too slow for every run (the parity gate on 20 demo seeds: ~35 min on 2 cores).
.PHONY: test-slow
test-slow: $(KERNELS)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The edit loop: lint + every test without a live tritonserver/service or the demo EfficientNet
# (a few minutes); `make test` runs everything, as CI does.
.PHONY: check
check: $(KERNELS) $(WEB_PACKAGES)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -m "not live and not model" -q $(PYTEST_ARGS)

# Regenerate the gRPC stubs from the one proto (a test checks they are current).
proto: $(STAMP)
	cd client/src && ../../$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
		--grpc_python_out=. visloc_client/v1/locator.proto

bench: $(KERNELS)
	$(PY) -m bench.run

# The parity gate on 20 demo seeds, and the margins of wrong models (~35 min on 2 cores)
# -> bench/results/gate_seeds.json and the "Parity gate" section of docs/BENCHMARKS.md.
.PHONY: gate-seeds
gate-seeds: $(KERNELS)
	$(PY) -m bench.gate_seeds --resume

# Overload: capacity, then 4x and 12x the clients with 2 s deadlines, and two callers;
# -> bench/results/overload.json and the Overload section of docs/BENCHMARKS.md (bounded, ~4 min).
.PHONY: overload
overload: $(KERNELS) $(DEMO_READY)
	$(PY) -m bench.overload --bundle $(DEMO_BUNDLE)

# A bounded soak at saturation on loopback (SOAK_SECONDS, default 600): 0 errors, no growth.
soak: $(KERNELS) $(DEMO_READY)
	$(PY) -m bench.soak --bundle $(DEMO_BUNDLE)

# The 10x spike simulation (docs/capacity.md): measured costs through the prod overlay's HPAs.
capacity: $(STAMP)
	$(PY) -m bench.capacity_sim --json bench/results/capacity.json

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .hypothesis

# Deployment checks (tests/test_deploy.py, tests/test_prometheus.py) run Debian's promtool and
# prometheus: install the package when they are missing (as root, like CI).
.PHONY: deploy-tools deploy-render
test check: deploy-tools

deploy-tools:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then :; else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; fi

# Re-render k8s/ copies of the Triton config, alerts and dashboard after editing their sources.
deploy-render: $(STAMP)
	$(PY) deploy/render.py

# The web page (docs/web.md). Its browser test (tests/test_web_browser.py) drives Debian's
# chromium with Playwright (pip; no browser download): install the package when it is missing.
.PHONY: web-browser web-vendor web-screenshots
test: web-browser

web-browser:
	@if [ -x /usr/bin/chromium ]; then :; else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; fi

# Re-vendor the page's front-end libraries (d3-geo, topojson-client, world-atlas) from
# client/web/package-lock.json into client/src/visloc_client/web/static/vendor/ (+ MANIFEST.json).
web-vendor:
	cd client/web && npm ci --ignore-scripts --no-audit --no-fund && node vendor.mjs

# Refresh docs/img/web-desktop.png and web-phone.png from the browser test (live demo stack).
web-screenshots: $(STAMP) web-browser
	VISLOC_WEB_DOCS_IMG=1 $(PY) -m pytest tests/test_web_browser.py -q
