"""Policy: YAML keys, environment and override precedence, validation messages."""

from __future__ import annotations

import pytest

from edgemind.errors import PolicyError
from edgemind.policy import ENV_ARENA_MB, Policy, load_policy
from edgemind.units import MIB


def write(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_original_design():
    policy = load_policy(None, env={})
    assert policy.arena_capacity_bytes == 50 * MIB
    assert policy.keep_resident_layers == 1
    assert policy.on_memory_quota_exceeded == "early_exit"


def test_yaml_keys_map_to_fields(tmp_path):
    path = write(
        tmp_path,
        """
model:
  arena_capacity_mb: 12.5
  keep_resident_layers: auto
  prefetch_depth: 2
  alignment_bytes: 4096
scheduler:
  on_memory_quota_exceeded: reject_request
metrics:
  enable_http: true
  http_addr: "127.0.0.1:9999"
""",
    )
    policy = load_policy(path, env={})
    assert policy.arena_capacity_bytes == int(12.5 * MIB)
    assert policy.keep_resident_layers == "auto"
    assert policy.prefetch_depth == 2
    assert policy.alignment_bytes == 4096
    assert policy.on_memory_quota_exceeded == "reject_request"
    assert policy.metrics_enable_http is True
    assert policy.metrics_http_addr == "127.0.0.1:9999"


def test_env_overrides_file_and_flags_override_env(tmp_path):
    path = write(tmp_path, "model:\n  arena_capacity_mb: 10\n")
    assert load_policy(path, env={ENV_ARENA_MB: "20"}).arena_capacity_bytes == 20 * MIB
    policy = load_policy(
        path, env={ENV_ARENA_MB: "20"}, overrides={"arena_capacity_bytes": 30 * MIB}
    )
    assert policy.arena_capacity_bytes == 30 * MIB
    assert load_policy(path, env={ENV_ARENA_MB: " "}).arena_capacity_bytes == 10 * MIB


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model:\n  arena_capacity: 10\n", "unknown key model.arena_capacity; valid keys"),
        ("modle:\n  arena_capacity_mb: 10\n", "unknown section 'modle'"),
        ("model:\n  arena_capacity_mb: -5\n", "model.arena_capacity_mb: expected a positive"),
        ("model:\n  arena_capacity_mb: lots\n", "model.arena_capacity_mb: expected a positive"),
        ("model:\n  keep_resident_layers: 0\n", "model.keep_resident_layers"),
        ("model:\n  keep_resident_layers: some\n", "model.keep_resident_layers"),
        ("model:\n  prefetch_depth: -1\n", "model.prefetch_depth"),
        ("model:\n  alignment_bytes: 100\n", "power of two"),
        ("scheduler:\n  on_memory_quota_exceeded: crash\n", "early_exit, reject_request"),
        ("metrics:\n  enable_http: maybe\n", "metrics.enable_http"),
        ("model:\n  read_mode: mmap\n", "model.read_mode: expected one of buffered, direct"),
        ("model:\n  arena_capacity_mb: 0.0000001\n", "MiB is less than one byte"),
        ("model:\n  keep_resident_layers: AUTO\n", "an integer >= 1 or 'auto'"),
        ("metrics:\n  http_addr: localhost\n", "metrics.http_addr: expected 'host:port'"),
        ("model: [1, 2]\n", "section 'model' must be a mapping"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("model:\n  arena_capacity_mb: [\n", "not valid YAML"),
    ],
)
def test_bad_policy_files_say_what_and_where(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path, env={})
    message = str(info.value)
    assert needle in message
    assert message.startswith(str(path))
    assert "\n" not in message


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "inf"])
def test_bad_environment_capacity(value):
    with pytest.raises(PolicyError, match=ENV_ARENA_MB):
        load_policy(None, env={ENV_ARENA_MB: value})


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "nope.yaml", env={})


def test_policy_is_frozen_and_validated_on_replace():
    policy = Policy()
    with pytest.raises(AttributeError):
        policy.prefetch_depth = 3  # type: ignore[misc]
    with pytest.raises(PolicyError):
        policy.replace(prefetch_depth=-2)


def test_direct_reads_align_buffers_to_blocks(tmp_path):
    policy = load_policy(write(tmp_path, "model:\n  read_mode: direct\n"), env={})
    assert policy.read_mode == "direct"
    assert policy.buffer_alignment_bytes == 4096
    assert Policy().buffer_alignment_bytes == Policy().alignment_bytes == 64


def test_digest_ignores_metrics_but_not_capacity():
    base = Policy()
    assert base.digest() == base.replace(metrics_enable_http=True).digest()
    assert base.digest() != base.replace(arena_capacity_bytes=MIB).digest()


def test_shipped_policy_file_loads():
    from pathlib import Path

    policy = load_policy(Path(__file__).parents[1] / "policy.yaml", env={})
    assert policy == Policy()


def test_a_bare_off_in_yaml_means_off(tmp_path):
    """YAML 1.1 reads `off` as false; for the keys whose value can be "off" it means that."""
    path = tmp_path / "policy.yaml"
    path.write_text("model:\n  tiling: off\n  enforce: off\n")
    policy = load_policy(path, env={})
    assert (policy.tiling, policy.enforce) == ("off", "off")
    path.write_text("model:\n  tiling: auto\n")
    assert load_policy(path, env={}).tiling == "auto"
