"""The streaming executor against the all-in-memory reference, and its memory bound."""

from __future__ import annotations

import os
import re
import shutil

import jax
import numpy as np
import pytest

from edgemind.errors import InputError, MemoryQuotaExceeded, ModelFormatError
from edgemind.layers.registry import TRACE_COUNTS
from edgemind.planner.verify import verify_plan
from edgemind.runtime import InMemoryModel, Runtime
from edgemind.runtime.executor import Executor
from edgemind.units import MIB


@pytest.fixture(scope="module")
def reference(toy_model):
    return InMemoryModel(toy_model)


def x_of(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1024)).astype(np.float32)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_streamed_output_is_bit_identical_to_in_memory(toy_model, reference, prefetch):
    x = x_of(3)
    with Runtime.open(toy_model, prefetch_depth=prefetch) as rt:
        result = rt.run(x)
        assert verify_plan(rt.plan(batch=3)) == []
    assert result.complete and result.exit_level == 3
    np.testing.assert_array_equal(result.output, reference.run(x))


def test_in_memory_matches_numpy_references(reference):
    x = x_of(2, seed=1)
    np.testing.assert_allclose(reference.run(x), reference.run(x, numpy=True), rtol=2e-4, atol=2e-4)


def test_early_exit_returns_the_level_output(toy_model, reference):
    x = x_of(2)
    with Runtime.open(toy_model, arena_capacity_bytes=24 * MIB) as rt:
        plan = rt.plan(batch=2)
        assert plan.status == "early_exit" and plan.exit_level == 2
        result = rt.run(x)
    assert not result.complete and result.exit_level == 2
    assert result.report.outcome == "early_exit" and result.report.quota_exceeded
    np.testing.assert_array_equal(result.output, reference.run(x, level=2))
    np.testing.assert_allclose(result.output.sum(axis=-1), 1.0, rtol=1e-5)  # a softmax head


def test_rejection_reads_nothing_and_allocates_nothing(toy_model, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read for a rejected request")

    def no_arena(*args, **kwargs):
        raise AssertionError("an arena was allocated for a rejected request")

    monkeypatch.setattr("edgemind.weights.reader.LayerFile.read_into", no_reads)
    monkeypatch.setattr(Executor, "__init__", no_arena)
    rt = Runtime.open(toy_model, arena_capacity_bytes=2 * MIB)
    with rt, pytest.raises(MemoryQuotaExceeded) as info:
        rt.run(x_of(1))
    message = str(info.value)
    assert "needs" in message and "arena_capacity_mb" in message and "\n" not in message
    assert info.value.needed_bytes > 2 * MIB


def test_reject_policy_raises_instead_of_exiting_early(toy_model):
    with (
        Runtime.open(
            toy_model, arena_capacity_bytes=24 * MIB, on_memory_quota_exceeded="reject_request"
        ) as rt,
        pytest.raises(MemoryQuotaExceeded, match="early_exit"),
    ):
        rt.run(x_of(1))


def test_arena_use_never_exceeds_the_plan(toy_model):
    with Runtime.open(toy_model) as rt:
        result = rt.run(x_of(4))
        plan = rt.plan(batch=4)
    report = result.report
    assert report.arena_bytes == plan.arena_bytes
    assert report.arena_peak_used_bytes <= plan.arena_bytes
    assert max(report.arena_used_bytes_per_step) <= plan.arena_bytes
    assert len(report.arena_used_bytes_per_step) == len(plan.steps)
    for step, used in zip(plan.steps, report.arena_used_bytes_per_step, strict=True):
        assert used == step.arena_live_bytes  # the ledger holds exactly what the plan says
    assert report.bytes_read == plan.streamed_bytes
    if report.observed_peak_bytes is not None:
        # RSS counts pages touched; the arena may be larger than what one request touches.
        assert report.observed_peak_bytes <= plan.peak_bytes + 16 * MIB


def test_each_signature_compiles_once(toy_model):
    with Runtime.open(toy_model) as rt:
        rt.run(x_of(5))
        before = dict(TRACE_COUNTS)
        for seed in range(3):
            rt.run(x_of(5, seed))
    assert dict(TRACE_COUNTS) == before


def test_weights_reach_jax_without_copies(toy_model):
    with Runtime.open(toy_model) as rt:
        plan = rt.plan(batch=1)
        executor = Executor(toy_model, rt.manifest, plan, {"batch": 1})
        try:
            buf = next(b for b in plan.buffers if b.tensors)
            executor._load(buf, None)
            params = executor._params(buf)
            for view in params.values():
                assert view.ctypes.data % 64 == 0
                assert jax.device_put(view).unsafe_buffer_pointer() == view.ctypes.data
        finally:
            executor.close()


def test_pinned_layers_are_read_once(toy_model, reference):
    x = x_of(2)
    with Runtime.open(toy_model, arena_capacity_bytes=120 * MIB, keep_resident_layers="auto") as rt:
        plan = rt.plan(batch=2)
        assert plan.pinned_layers
        first = rt.run(x)
        second = rt.run(x)
    assert first.report.bytes_read > second.report.bytes_read
    assert second.report.bytes_read == plan.streamed_bytes
    pinned = sum(b.nbytes for b in plan.buffers if b.role == "pinned")
    for report in (first.report, second.report):  # the ledger keeps the pins between requests
        assert report.arena_held_bytes == pinned
    assert first.report.arena_peak_used_bytes == second.report.arena_peak_used_bytes
    np.testing.assert_array_equal(second.output, reference.run(x))


@pytest.mark.parametrize(
    ("x", "needle"),
    [
        (np.ones((2, 1024), np.float64), "expected dtype float32"),
        (np.ones((2, 512), np.float32), "expected shape (batch, 1024)"),
        (np.ones((1024,), np.float32), "expected shape"),
        ([[1.0] * 1024], "expected a NumPy array"),
    ],
)
def test_bad_inputs(toy_model, x, needle):
    with Runtime.open(toy_model) as rt, pytest.raises(InputError, match=re.escape(needle)):
        rt.run(x)


def test_weight_file_changed_after_planning_stops_cleanly(toy_model, tmp_path):
    model = shutil.copytree(toy_model, tmp_path / "toy")
    with Runtime.open(model) as rt:
        rt.plan(batch=1)
        victim = model / rt.manifest.layers[5].file
        os.truncate(victim, os.path.getsize(victim) // 2)
        with pytest.raises(ModelFormatError, match="L5"):
            rt.run(x_of(1))
        assert rt._executor is None or rt._executor.arena is None  # released


def test_flipped_byte_caught_with_verification(toy_model, tmp_path):
    from edgemind.errors import ChecksumError

    model = shutil.copytree(toy_model, tmp_path / "toy")
    with Runtime.open(model, verify_checksums=True) as rt:
        spec = rt.manifest.layers[2].tensor("w")
        path = model / rt.manifest.layers[2].file
        with open(path, "r+b") as f:
            f.seek(spec.offset_bytes + 100)
            byte = f.read(1)
            f.seek(spec.offset_bytes + 100)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(ChecksumError, match="L2"):
            rt.run(x_of(1))


def _direct_io_supported(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return hasattr(os, "O_DIRECT")


@pytest.mark.parametrize("prefetch", [0, 1])
def test_direct_reads_match_buffered(toy_model, reference, prefetch):
    if not _direct_io_supported(toy_model / "manifest.json"):
        pytest.skip("the test filesystem does not support O_DIRECT")
    x = x_of(2)
    with Runtime.open(toy_model, read_mode="direct", prefetch_depth=prefetch) as rt:
        plan = rt.plan(batch=2)
        result = rt.run(x)
    assert plan.alignment_bytes == 4096  # whole blocks, so block-sized reads stay in slots
    assert all(b.offset_bytes % 4096 == 0 for b in plan.buffers if b.offset_bytes is not None)
    assert verify_plan(plan) == []
    np.testing.assert_array_equal(result.output, reference.run(x))
    assert result.report.bytes_read == plan.streamed_bytes


def _ctx_apply(params, x, ctx):
    import jax.numpy as jnp

    return x @ params["w"] + jnp.sum(ctx["c1"], -1, keepdims=True) + 2 * ctx["c2"][:, :1]


def _ctx_reference(params, x, ctx):
    return x @ params["w"] + ctx["c1"].sum(-1, keepdims=True) + 2 * ctx["c2"][:, :1]


def test_several_context_inputs_each_get_their_own_bytes(tmp_path):
    """Context inputs share one arena buffer; odd sizes must not overlap one another."""
    from edgemind.layers.registry import LayerKind, known_kinds, register
    from edgemind.weights import ModelWriter
    from edgemind.weights.manifest import InputSpec

    if "test_ctx_dense" not in known_kinds():
        register(LayerKind("test_ctx_dense", _ctx_apply, _ctx_reference, ("w",)))
    rng = np.random.default_rng(0)
    inputs = [InputSpec("x", "float32", ("batch", 64)), InputSpec("c1", "float32", ("batch", 17)),
              InputSpec("c2", "float32", ("batch", 17))]  # fmt: skip
    with ModelWriter(tmp_path / "m", model_name="ctx", inputs=inputs) as w:
        for i in range(3):
            weights = rng.standard_normal((64, 64)).astype(np.float32)
            w.add_layer(f"d{i}", "test_ctx_dense", {}, [("w", weights)])
    x = rng.standard_normal((2, 64)).astype(np.float32)
    c1 = np.full((2, 17), 1.5, np.float32)
    c2 = np.full((2, 17), 9.0, np.float32)
    want = InMemoryModel(tmp_path / "m").run(x, c1, c2, numpy=True)
    for keep in (1, "auto"):
        with Runtime.open(tmp_path / "m", keep_resident_layers=keep) as rt:
            got = rt.run(x, c1, c2).output
        np.testing.assert_allclose(got, want, rtol=1e-4)


def test_a_failed_pinned_read_leaves_the_runtime_usable(toy_model, tmp_path, reference):
    from edgemind.errors import ChecksumError

    model = shutil.copytree(toy_model, tmp_path / "toy")
    victim = model / "layers" / "08_L8.msgpack"
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[-100] ^= 0xFF
    victim.write_bytes(bytes(bad))
    x = x_of(1)
    rt = Runtime.open(model, arena_capacity_bytes=200 * MIB, keep_resident_layers="auto",
                      verify_checksums=True)  # fmt: skip
    with rt:
        assert "L8" in rt.plan(batch=1).pinned_layers
        with pytest.raises(ChecksumError, match="L8"):
            rt.run(x)
        victim.write_bytes(good)
        np.testing.assert_array_equal(rt.run(x).output, reference.run(x))


def test_a_plan_for_another_shape_is_refused(toy_model):
    from edgemind.errors import PlanError

    with Runtime.open(toy_model) as rt:
        plan = rt.plan(batch=1)
        with pytest.raises(PlanError, match="shape"):
            rt.use_plan(plan, batch=2)


def test_requests_from_two_threads_take_turns(toy_model, reference):
    import threading

    xs = [x_of(2, seed) for seed in range(6)]
    outputs: dict[int, np.ndarray] = {}
    with Runtime.open(toy_model) as rt:

        def worker(ids):
            for i in ids:
                outputs[i] = rt.run(xs[i]).output

        threads = [threading.Thread(target=worker, args=(r,)) for r in (range(0, 3), range(3, 6))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(outputs[i], reference.run(x))


def test_rejection_says_what_the_shallowest_exit_needs(toy_model):
    from edgemind.planner import level_min_capacity

    rt = Runtime.open(toy_model, arena_capacity_bytes=2 * MIB)
    with rt, pytest.raises(MemoryQuotaExceeded, match=r"exit level 1 alone needs (\d+\.\d\d)"):
        rt.run(x_of(1))
    with Runtime.open(toy_model) as big:
        need = level_min_capacity(
            big.costs(batch=1), big.policy.replace(arena_capacity_bytes=2 * MIB), 1
        )
    assert need is not None
    with Runtime.open(toy_model, arena_capacity_bytes=need) as ok:
        assert ok.plan(batch=1).exit_level == 1
    with Runtime.open(toy_model, arena_capacity_bytes=need - 64) as short:
        assert short.plan(batch=1).status == "infeasible"


def test_an_edited_plan_is_refused(toy_model):
    import dataclasses

    from edgemind.errors import PlanError

    with Runtime.open(toy_model, arena_capacity_bytes=40 * MIB) as rt:
        plan = rt.plan(batch=1)
        looser = dataclasses.replace(plan, capacity_bytes=100 * MIB)
        with pytest.raises(PlanError, match="differs"):
            rt.use_plan(looser, batch=1)
        rt.use_plan(plan, batch=1)  # the genuine one is fine


def test_a_weight_file_modified_between_requests_is_noticed(toy_model, tmp_path):
    model = shutil.copytree(toy_model, tmp_path / "toy")
    with Runtime.open(model) as rt:
        rt.run(x_of(1))  # every file is open now, its header checked
        victim = model / rt.manifest.layers[4].file
        data = victim.read_bytes()
        victim.write_bytes(data + b"\0")  # same inode, new length and mtime
        with pytest.raises(ModelFormatError, match="changed since it was opened"):
            rt.run(x_of(1))


def test_close_waits_for_a_running_request_then_refuses_more(toy_model, reference):
    import threading
    import time

    from edgemind.errors import EdgemindError

    rt = Runtime.open(toy_model)
    rt.run(x_of(1))  # compiled and measured: the next request starts at once
    started, results = threading.Event(), {}
    real = rt._run

    def slow_run(x, *context):
        started.set()
        time.sleep(0.2)  # close() arrives while this request runs
        return real(x, *context)

    rt._run = slow_run  # type: ignore[method-assign]
    worker = threading.Thread(target=lambda: results.setdefault("out", rt.run(x_of(2)).output))
    worker.start()
    started.wait(5)
    rt.close()  # waits for the request, then releases everything
    worker.join()
    np.testing.assert_array_equal(results["out"], reference.run(x_of(2)))
    with pytest.raises(EdgemindError, match="closed; open a new one"):
        rt.run(x_of(1))
    rt.close()  # closing twice is harmless


def test_release_keeps_a_runtime_usable(toy_model, reference):
    with Runtime.open(toy_model, keep_resident_layers="auto") as rt:
        first = rt.run(x_of(1)).output
        rt.release()
        np.testing.assert_array_equal(rt.run(x_of(1)).output, first)


def test_corruption_at_rest_is_caught_by_default(toy_model, tmp_path):
    """A payload byte flipped before the runtime opens the file: the default policy
    (verify_checksums: false) still checks each tensor's crc32 on its first read."""
    from edgemind.errors import ChecksumError

    model = shutil.copytree(toy_model, tmp_path / "toy")
    with Runtime.open(model) as rt:
        spec = rt.manifest.layers[2]
        tensor = spec.tensor("w")
        victim = model / spec.file
        with open(victim, "r+b") as f:  # same size, same inode: only the crc can tell
            f.seek(tensor.offset_bytes + 100)
            byte = f.read(1)
            f.seek(tensor.offset_bytes + 100)
            f.write(bytes([byte[0] ^ 0x40]))
        assert rt.policy.verify_checksums is False
        with pytest.raises(ChecksumError, match="L2"):
            rt.run(x_of(1))
