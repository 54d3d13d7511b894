"""Plan files: round trip, and clear errors for tampered, foreign or mismatched files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgpack
import pytest

from edgemind.errors import PlanError
from edgemind.planner import CostTable, ExitCost, Plan, UnitCost, make_plan
from edgemind.planner.planfile import check_plan_matches, load_plan, save_plan
from edgemind.policy import Policy


@pytest.fixture
def plan() -> Plan:
    layers = tuple(
        UnitCost(f"l{i}", "dense", (("kernel", 5000), ("bias", 70)), 900, 300) for i in range(5)
    )
    costs = CostTable("toy", (2, 8), 900, layers, (ExitCost(1, 1, None), ExitCost(2, 4, None)))
    policy = Policy(arena_capacity_bytes=12_000, keep_resident_layers="auto")
    return make_plan(costs, policy, manifest_digest="abc123", policy_digest=policy.digest())


def rewrite(path: Path, edit) -> None:
    data = msgpack.unpackb(path.read_bytes(), raw=False)
    edit(data)
    path.write_bytes(msgpack.packb(data, use_bin_type=True))


def test_round_trip(plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "plan.msgpack"
    save_plan(plan, path)
    assert load_plan(path) == plan
    assert [p.name for p in tmp_path.iterdir()] == ["plan.msgpack"]
    header = msgpack.unpackb(path.read_bytes(), raw=False)
    assert header["magic"] == "edgemind-plan" and header["format_version"] == 1
    assert header["manifest_digest"] == "abc123" and header["edgemind_version"]
    infeasible = make_plan(
        CostTable("x", (1,), 64, plan_units(), (ExitCost(1, 0, None),)),
        Policy(arena_capacity_bytes=100, on_memory_quota_exceeded="reject_request"),
    )
    save_plan(infeasible, path)
    assert load_plan(path) == infeasible and infeasible.witness is not None


def plan_units() -> tuple[UnitCost, ...]:
    return (UnitCost("l0", "dense", (("w", 1000),), 64, 0),)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d.update(magic="safetensors"),
            "expected magic 'edgemind-plan', found 'safetensors'",
        ),
        (lambda d: d.update(format_version=9), "version 9, this edgemind reads version 1"),
        (lambda d: d["plan"].update(peak_bytes="big"), "peak_bytes: expected an integer"),
        (lambda d: d["plan"].update(status="great"), "status: expected one of"),
        (lambda d: d["plan"].pop("steps"), "missing field 'steps'"),
        (lambda d: d["plan"].update(surprise=1), "unknown fields"),
        (lambda d: d.update(manifest_digest="other"), "header manifest_digest"),
        (lambda d: d["plan"]["buffers"][1].update(offset_bytes=8), "fails verification"),
        (lambda d: d["plan"]["steps"][0].update(loads=[[1]]), "expected an integer"),
    ],
)
def test_tampered_files_are_refused(plan: Plan, tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "plan.msgpack"
    save_plan(plan, path)
    rewrite(path, edit)
    with pytest.raises(PlanError, match=message.replace("(", r"\(")):
        load_plan(path)


def test_unreadable_files_are_refused(plan: Plan, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "missing.msgpack")
    path = tmp_path / "plan.msgpack"
    save_plan(plan, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PlanError, match="not valid msgpack"):
        load_plan(path)
    path.write_bytes(msgpack.packb([1, 2]))
    with pytest.raises(PlanError, match="found 'list'"):
        load_plan(path)


def test_mismatches_say_what_and_how_to_fix(plan: Plan) -> None:
    check_plan_matches(plan, "abc123", plan.policy_digest, (2, 8))
    with pytest.raises(PlanError, match="made for model digest abc123, this model is def"):
        check_plan_matches(plan, "def", plan.policy_digest, (2, 8))
    with pytest.raises(PlanError, match=r"policy digest .* re-run `edgemind plan --out`"):
        check_plan_matches(plan, "abc123", "0000", (2, 8))
    with pytest.raises(PlanError, match=r"input shape \(2, 8\), this request has \(4, 8\)"):
        check_plan_matches(plan, "abc123", plan.policy_digest, [4, 8])
    unbound = dataclasses.replace(plan, manifest_digest="")
    with pytest.raises(PlanError, match=r"\(none\)"):
        check_plan_matches(unbound, "abc123", plan.policy_digest, (2, 8))
