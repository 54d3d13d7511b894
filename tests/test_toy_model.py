"""The toy model: its layer table, and the model directory edgemind/examples/toy.py writes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from edgemind.examples import toy as build  # the builder ships in the package
from edgemind.layers import cost_table
from edgemind.units import MIB
from edgemind.weights.manifest import Manifest, load_manifest


def _writer_available() -> bool:
    try:
        from edgemind.weights import ModelWriter  # noqa: F401
    except ImportError:
        return False
    return True


needs_writer = pytest.mark.skipif(
    not _writer_available(), reason="edgemind.weights.ModelWriter is not importable yet"
)


def _checksums(manifest: Manifest) -> list[tuple[str, str, str]]:
    out = []
    for layer in manifest.layers:
        for spec in (layer, layer.exit_head):
            if spec is not None:
                out.extend((spec.name, t.name, t.crc32) for t in spec.tensors)
    return out


def test_layer_table_is_the_ten_layer_design():
    layers = build.LAYERS
    assert len(layers) == 10
    assert layers[0][1] == build.INPUT_DIM
    for (_, _, d_out, _, _), (_, d_in, _, _, _) in itertools.pairwise(layers):
        assert d_out == d_in  # a chain
    assert [name for name, *_, has_exit in layers if has_exit] == ["L3", "L6"]
    assert layers[-1][2:4] == (build.NUM_CLASSES, "none")
    weight_mib = [d_in * d_out * 4 / MIB for _, d_in, d_out, _, _ in layers]
    assert weight_mib[:9] == [4, 4, 4, 6, 12, 16, 16, 20, 25]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _writer_available():
        pytest.skip("edgemind.weights.ModelWriter is not importable yet")
    return build.build_toy_model(tmp_path_factory.mktemp("toy") / "toy", seed=0)


@needs_writer
def test_toy_model_manifest(toy_dir: Path):
    manifest = load_manifest(toy_dir)
    assert manifest.model_name == "toy-ffn-10"
    assert manifest.alignment_bytes == 4096
    assert [layer.name for layer in manifest.layers] == [f"L{i}" for i in range(10)]
    assert {layer.kind for layer in manifest.layers} == {"dense"}
    assert manifest.exit_levels() == ((1, 3), (2, 6), (3, 9))
    assert manifest.metadata["seed"] == 0
    assert 106.5 * MIB < manifest.nbytes < 107.5 * MIB
    assert manifest.inputs[0].shape == ("batch", 1024)


@needs_writer
def test_toy_model_costs(toy_dir: Path):
    table = cost_table(load_manifest(toy_dir), {"batch": 2})
    assert table.input_bytes == 2 * 1024 * 4
    assert table.layers[-1].output_bytes == 2 * 10 * 4
    heads = [e.head for e in table.exits]
    assert [e.after_layer for e in table.exits] == [3, 6, 9]
    assert heads[2] is None
    assert [h.output_bytes for h in heads[:2] if h is not None] == [80, 80]
    assert max(u.weight_bytes for u in table.layers) < 25.1 * MIB


@needs_writer
def test_same_seed_same_bytes_other_seed_other_bytes(toy_dir: Path, tmp_path: Path, capsys):
    assert build.main([str(tmp_path / "again"), "--seed", "0"]) == 0
    assert "wrote toy-ffn-10 (seed 0)" in capsys.readouterr().out
    again = tmp_path / "again"
    manifest = load_manifest(toy_dir)
    assert (again / "manifest.json").read_bytes() == (toy_dir / "manifest.json").read_bytes()
    first = manifest.layers[0].file
    assert (again / first).read_bytes() == (toy_dir / first).read_bytes()
    other = build.build_toy_model(tmp_path / "other", seed=1)
    sums = [crc for *_, crc in _checksums(manifest)]
    assert [crc for *_, crc in _checksums(load_manifest(other))] != sums


@needs_writer
def test_main_refuses_an_existing_directory_without_overwrite(
    toy_dir: Path, tmp_path: Path, capsys
):
    target = tmp_path / "toy"
    target.mkdir()
    assert build.main([str(target)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert build.main([str(target), "--overwrite", "--seed", "3"]) == 0
    assert load_manifest(target).metadata["seed"] == 3


@needs_writer
def test_sizes_give_the_designed_verdicts_under_the_default_policy(toy_dir: Path):
    schedule = pytest.importorskip("edgemind.planner.schedule", reason="planner not present")
    from edgemind.policy import Policy

    costs = cost_table(load_manifest(toy_dir), {"batch": 2})  # analysed above: cached
    verdicts = {}
    for capacity_mib in (50, 24, 2):
        plan = schedule.make_plan(costs, Policy(arena_capacity_bytes=capacity_mib * MIB))
        verdicts[capacity_mib] = (plan.status, plan.exit_level)
    assert verdicts == {
        50: ("feasible", 3),
        24: ("early_exit", 2),
        2: ("infeasible", None),
    }
