"""sentence-transformers pooling: converted heads against sentence-transformers' own modules.

The reference (``tests/data/pooling/``, made by ``tests/data/make_pooling_reference.py``
with torch, transformers and sentence-transformers) pools a random BERT's token states
after every encoder layer with each supported mode; here each variant is assembled into a
sentence-transformers checkpoint, converted, and every exit level compared, through the
jitted kind and its NumPy reference. Unsupported module lists and modes are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemind.errors import ConversionError
from edgemind.layers import bert, jitted, reference
from edgemind.weights import load_layer_arrays, load_manifest
from edgemind.weights.convert import convert_safetensors
from edgemind.weights.st_pooling import pooling_head

DATA = Path(__file__).parent / "data" / "pooling"
INFO = json.loads((DATA / "reference.json").read_text())
REF = np.load(DATA / "reference.npz")
ST = "sentence_transformers.models."


def checkpoint(root: Path, pooling: dict, modules: list[str] | None = None) -> Path:
    """The committed random BERT with ``modules.json`` and ``1_Pooling/config.json``."""
    shutil.copytree(DATA / "checkpoint", root)
    names = modules or ["Transformer", "Pooling"]
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    listed = [
        {"idx": i, "name": str(i), "path": paths.get(n, f"{i}_{n}"), "type": ST + n}
        for i, n in enumerate(names)
    ]
    (root / "modules.json").write_text(json.dumps(listed))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return root


def levels(model: Path, use_reference: bool) -> np.ndarray:
    """(levels, batch, hidden): every exit head's output, layer by layer."""
    ids, mask = REF["input_ids"], REF["attention_mask"]
    ctx = {"attention_mask": mask}
    run = reference if use_reference else jitted
    x, out = ids, []
    for layer in load_manifest(model).layers:
        params = load_layer_arrays(model, layer)
        if layer.config.get("gathered"):
            params = bert.gather_params(params, ids, layer.config["gathered"])
        x = run(layer.kind, layer.config)(params, x, ctx)
        if layer.exit_head is not None:
            head = layer.exit_head
            out.append(np.asarray(run(head.kind, head.config)({}, x, ctx)))
    return np.stack(out)


@pytest.mark.parametrize("variant", sorted(INFO["variants"]))
def test_every_level_matches_sentence_transformers(variant, tmp_path):
    spec = INFO["variants"][variant]
    modules = ["Transformer", "Pooling"] + (["Normalize"] if spec["normalize"] else [])
    src = checkpoint(tmp_path / "ckpt", spec["pooling"], modules)
    model = convert_safetensors(src, tmp_path / "model")
    want = REF[variant]
    for use_reference in (False, True):
        got = levels(model, use_reference)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    if variant == "mean_normalize":  # what every model was converted with before
        assert {h.exit_head.kind for h in load_manifest(model).layers if h.exit_head} == {
            "mean_pool_l2"
        }


def test_the_modes_differ_so_the_test_can_tell_them_apart():
    finals = [REF[name][-1] for name in sorted(INFO["variants"])]
    for i, a in enumerate(finals):
        for b in finals[i + 1 :]:
            assert not np.allclose(a, b, atol=1e-3)


def _pooling(**on: object) -> dict:
    return {"word_embedding_dimension": 32, **on}


@pytest.mark.parametrize(
    ("modules", "pooling", "message"),
    [
        (
            ["Transformer", "Pooling", "Dense"],
            _pooling(pooling_mode_cls_token=True),
            "Dense' is not",
        ),
        (["Transformer", "Normalize", "Pooling"], _pooling(pooling_mode_cls_token=True), "order"),
        (["Transformer"], _pooling(), "in that order"),
        (None, _pooling(pooling_mode_weightedmean_tokens=True), "'weightedmean' is not"),
        (None, _pooling(pooling_mode_lasttoken=True), "'lasttoken' is not supported"),
        (
            None,
            _pooling(pooling_mode_cls_token=True, pooling_mode_mean_tokens=True),
            "exactly one of",
        ),
        (None, _pooling(), "exactly one of"),
        (None, _pooling(pooling_mode="cls", include_prompt=False), "include_prompt"),
    ],
)
def test_what_edgemind_cannot_pool_the_same_way_is_refused(modules, pooling, message, tmp_path):
    src = checkpoint(tmp_path / "ckpt", pooling, modules)
    with pytest.raises(ConversionError, match=message) as info:
        convert_safetensors(src, tmp_path / "model")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "model").exists()


def test_the_current_config_format_and_module_paths_are_read(tmp_path):
    src = checkpoint(tmp_path / "ckpt", _pooling(pooling_mode="max"))
    listed = json.loads((src / "modules.json").read_text())
    listed[1]["type"] = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
    (src / "modules.json").write_text(json.dumps(listed))
    assert pooling_head(src) == ("bert_pool", {"mode": "max", "normalize": False, "eps": 1e-12})


def test_a_pooling_path_outside_the_checkpoint_is_refused(tmp_path):
    src = checkpoint(tmp_path / "ckpt", _pooling(pooling_mode="cls"))
    listed = json.loads((src / "modules.json").read_text())
    listed[1]["path"] = "../elsewhere"
    (src / "modules.json").write_text(json.dumps(listed))
    with pytest.raises(ConversionError, match="must be a folder in"):
        pooling_head(src)


def test_a_refused_checkpoint_is_one_line_through_the_cli(tmp_path, capsys):
    from edgemind.cli import main

    src = checkpoint(tmp_path / "ckpt", _pooling(pooling_mode_lasttoken=True))
    assert main(["convert", str(src), str(tmp_path / "model")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "lasttoken" in err
