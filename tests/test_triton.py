"""The real tritonserver (nvidia-pytriton wheel) serving the demo bundle; no mocks.

The production config is checked against Triton's own schema and the bundle's ONNX graph;
the local server must return what in-process onnxruntime returns, merge concurrent requests,
and leave no process behind when its launcher is stopped or killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from conftest import free_port
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from devtools.triton_local import LocalTriton
from swc_service import bundle as B
from swc_service.triton_config import (
    MODEL_NAME,
    PRODUCTION_CONFIG,
    TritonError,
    load_production_config,
    production_config,
)

ONNX_TYPES = {mc.TYPE_UINT8: "tensor(uint8)", mc.TYPE_FP32: "tensor(float)"}


@pytest.fixture(scope="module")
def triton(local_triton: LocalTriton) -> LocalTriton:
    """conftest's session-wide LocalTriton on the demo bundle (started once for all test files)."""
    return local_triton


@pytest.fixture(scope="module")
def client(triton: LocalTriton):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def session(demo_bundle: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(B.load_bundle(demo_bundle).model_path), providers=["CPUExecutionProvider"])


def _onnx_shape(shape: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _infer(client: grpcclient.InferenceServerClient, x: np.ndarray) -> grpcclient.InferResult:
    inp = grpcclient.InferInput(B.INPUT_NAME, list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    return client.infer(MODEL_NAME, [inp])


# --------------------------------------------------------------------------- configs


def test_production_config_matches_the_onnx_graph(demo_bundle: Path, session: ort.InferenceSession):
    """Names, dtypes and full shapes ([-1] + dims) equal what onnxruntime reports for the graph,
    which is what Triton's onnxruntime backend compares (output dims exactly)."""
    committed = load_production_config()
    assert (committed.name, committed.backend) == (MODEL_NAME, "onnxruntime")
    assert [k.kind for k in committed.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert committed.dynamic_batching.max_queue_delay_microseconds > 0
    probs = next(o for o in committed.output if o.name == B.OUTPUT_PROBS)
    assert len(probs.dims) == 1 and probs.dims[0] > 0, "a static M: the backend rejects -1 for it"

    cfg = production_config(B.load_bundle(demo_bundle).num_cells)
    graph_inputs = {i.name: i for i in session.get_inputs()}
    graph_outputs = {o.name: o for o in session.get_outputs()}
    assert [i.name for i in cfg.input] == list(graph_inputs) == [B.INPUT_NAME]
    assert sorted(o.name for o in cfg.output) == sorted(graph_outputs) == sorted([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING])
    pairs = [(i, graph_inputs[i.name]) for i in cfg.input] + [(o, graph_outputs[o.name]) for o in cfg.output]
    for io, graph in pairs:
        assert ONNX_TYPES[io.data_type] == graph.type, io.name
        assert [-1, *io.dims] == _onnx_shape(graph.shape), io.name
    for w in committed.model_warmup:
        assert 1 <= w.batch_size <= committed.max_batch_size
        (name, data), *rest = w.inputs.items()
        assert not rest and name == B.INPUT_NAME and data.data_type == mc.TYPE_UINT8
        assert len(data.dims) == 3 and data.dims[2] == 3


def test_tensorrt_block_is_a_valid_opt_in():
    """The commented TensorRT block parses as Triton config once uncommented."""
    text = PRODUCTION_CONFIG.read_text()
    block = text.split("# BEGIN tensorrt\n")[1].split("# END tensorrt")[0]
    cfg = load_production_config()
    text_format.Merge("\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines()), cfg)
    (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert trt.parameters["trt_engine_cache_enable"] == "true"
    for key in ("min", "opt", "max"):
        name, shape = trt.parameters[f"trt_profile_{key}_shapes"].split(":")
        assert name == B.INPUT_NAME and len(shape.split("x")) == 4
    assert trt.parameters["trt_profile_max_shapes"].split(":")[1].split("x")[0] == str(cfg.max_batch_size)


def test_served_config_is_the_production_contract(demo_bundle: Path, triton: LocalTriton, client):
    """What Triton loaded for the local server: production tensors, batch size and batching."""
    prod = production_config(B.load_bundle(demo_bundle).num_cells)
    assert triton.config.input == prod.input and triton.config.output == prod.output
    assert triton.config.dynamic_batching == prod.dynamic_batching
    served = client.get_model_config(MODEL_NAME).config
    assert served.backend == "python"
    assert list(served.input) == list(prod.input) and list(served.output) == list(prod.output)
    assert served.max_batch_size == prod.max_batch_size
    db = served.dynamic_batching
    assert db.max_queue_delay_microseconds == prod.dynamic_batching.max_queue_delay_microseconds
    # Triton fills an absent preferred_batch_size with max_batch_size: the same batcher.
    assert list(db.preferred_batch_size) in ([], [prod.max_batch_size])
    # Overload (issue 17): Triton drops expired work; the service may set each request's timeout.
    qp = prod.dynamic_batching.default_queue_policy
    assert qp.timeout_action == qp.REJECT and qp.allow_timeout_override
    assert qp.max_queue_size > 0 and qp.default_timeout_microseconds > 0
    assert db.default_queue_policy == qp  # loaded by Triton as written


# --------------------------------------------------------------------------- serving


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("height, width", [(300, 400), (400, 300)])
def test_outputs_equal_in_process_onnxruntime(client, session, batch: int, height: int, width: int):
    x = np.random.default_rng(batch * height + width).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    result = _infer(client, x)
    expected = dict(
        zip([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], session.run([B.OUTPUT_PROBS, B.OUTPUT_EMBEDDING], {B.INPUT_NAME: x}))
    )
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert float(np.max(np.abs(got - want))) <= 1e-6, name
    if batch > 1:  # the images reached the model: different images, different outputs
        assert float(np.max(np.abs(expected[B.OUTPUT_EMBEDDING][0] - expected[B.OUTPUT_EMBEDDING][1]))) > 1e-4


def settled_statistics(client):
    """The model's statistics once earlier tests' requests are all counted (the backend reports
    them after it has sent the responses, so a count read too early grows later)."""
    last = client.get_inference_statistics(MODEL_NAME).model_stats[0]
    for _ in range(100):
        time.sleep(0.2)
        now = client.get_inference_statistics(MODEL_NAME).model_stats[0]
        if now.inference_count == last.inference_count and now.execution_count == last.execution_count:
            return now
        last = now
    return last


def test_concurrent_requests_are_batched(client):
    """16 concurrent same-shape requests run in fewer executions than requests."""
    x = np.random.default_rng(7).integers(0, 256, (1, 300, 300, 3), dtype=np.uint8)
    inp = grpcclient.InferInput(B.INPUT_NAME, list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    before = settled_statistics(client)
    done, errors, results = threading.Semaphore(0), [], []

    def callback(result, error) -> None:
        errors.append(error) if error else results.append(result.as_numpy(B.OUTPUT_EMBEDDING))
        done.release()

    for _ in range(16):
        client.async_infer(MODEL_NAME, [inp], callback=callback)
    for _ in range(16):
        assert done.acquire(timeout=120)
    assert not errors
    deadline = time.monotonic() + 30  # the backend reports statistics after it sends the responses
    while True:
        after = client.get_inference_statistics(MODEL_NAME).model_stats[0]
        requests = after.inference_count - before.inference_count
        executions = after.execution_count - before.execution_count
        if requests >= 16 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert requests == 16
    assert executions < requests, f"{requests} requests ran as {executions} executions"
    assert all(np.array_equal(r, results[0]) for r in results)  # split back in the right rows


# --------------------------------------------------------------------------- lifecycle


def _live_procs(text: str) -> dict[int, str]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmd and state != "Z":
            found[int(d.name)] = cmd
    return found


def _launcher() -> list[str]:
    script = Path(sys.executable).with_name("visloc-triton")
    return [str(script)] if script.exists() else [sys.executable, "-m", "devtools.triton_local"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_or_killing_the_launcher_leaves_nothing(demo_bundle: Path, tmp_path: Path, sig: int):
    workdir = tmp_path / "triton"
    http = free_port()
    cmd = _launcher() + ["--bundle", str(demo_bundle), "--workdir", str(workdir), "--http-port", str(http)]
    cmd += ["--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    out = open(tmp_path / "launcher.out", "wb")  # noqa: SIM115 (closed in finally)
    launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert launcher.poll() is None, (tmp_path / "launcher.out").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "visloc-triton did not become ready"
                time.sleep(0.2)
        spawned = _live_procs(str(workdir))
        assert any("tritonserver " in c for c in spawned.values()), spawned
        assert any("triton_python_backend_stub" in c for c in spawned.values()), spawned

        launcher.send_signal(sig)
        rc = launcher.wait(timeout=60)
        assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        deadline = time.monotonic() + 30  # after SIGKILL the server shuts down on its own
        while (left := _live_procs(str(workdir))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left behind: {left}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in _live_procs(str(workdir)):  # only what this test started
            os.kill(pid, signal.SIGKILL)
        out.close()


def test_a_model_that_fails_to_load_is_a_clear_error(demo_bundle: Path, tmp_path: Path):
    bad = tmp_path / "bad-bundle"
    shutil.copytree(demo_bundle, bad, ignore=shutil.ignore_patterns(B.MODEL), symlinks=True)
    (bad / B.MODEL).write_bytes(b"not an onnx model")
    server = LocalTriton(bad, tmp_path / "work")
    with pytest.raises(TritonError, match="exited with status") as info:
        server.start(timeout=120)
    assert "failed to load 'visloc'" in str(info.value) and "tritonserver.log" in str(info.value)
    assert not server.running() and not _live_procs(str(tmp_path / "work"))


def test_place_model_sizes_the_config_and_keeps_its_comments(demo_bundle, tmp_path):
    repo = tmp_path / "model_repository"
    shutil.copytree(Path(__file__).parents[1] / "model_repository", repo)
    out = subprocess.run(
        [Path(sys.executable).parent / "visloc-export", "place", "--bundle", str(demo_bundle), "--repository", repo],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    version = B.load_bundle(demo_bundle).triton_version  # the version the service asks for
    placed = repo / "visloc" / version / "model.onnx"
    assert placed.read_bytes()[:64] == (demo_bundle / "model.onnx").read_bytes()[:64]
    text = (repo / "visloc" / "config.pbtxt").read_text()
    assert "BEGIN tensorrt" in text  # comments kept
    cfg = text_format.Parse(text, mc.ModelConfig())
    assert cfg.version_policy.HasField("all")  # old and new versions are served side by side
    assert [list(o.dims) for o in cfg.output if o.name == "cell_probs"] == [[2000]]
