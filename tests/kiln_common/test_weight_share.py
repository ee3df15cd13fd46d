"""Weight sharing: few aligned buckets, and another process maps the very same pages (no copy)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from kiln_common.model_loader import dummy_state_dict
from kiln_common.weight_share import (
    ALIGN,
    _align,
    attach,
    canonical_order,
    export_manifest,
    pack_state_dict,
    plan_buckets,
)


def _tiny_state() -> tuple[dict[str, torch.Tensor], object]:
    from transformers import LlamaConfig

    from kiln_common.model_loader import DUMMY_SHAPES

    config = LlamaConfig(**DUMMY_SHAPES["tiny"])  # type: ignore[arg-type]
    return dummy_state_dict(config, torch.float32, "cpu", seed=1), config


def test_pack_is_few_aligned_buckets_in_layer_order(tmp_path: Path) -> None:
    state, _ = _tiny_state()
    shared = pack_state_dict(state, shm_dir=tmp_path, bucket_bytes=1 << 30)
    try:
        assert len(shared.buckets) == 1
        for spec in shared.specs:
            assert spec.offset % ALIGN == 0
            assert torch.equal(shared.views[spec.name], state[spec.name])
            assert shared.views[spec.name].untyped_storage().data_ptr() == shared.buckets[0].data_ptr()
        names = [s.name for s in shared.specs]
        i = names.index("model.layers.0.self_attn.q_proj.weight")
        assert names[i : i + 3] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
        j = names.index("model.layers.0.mlp.gate_proj.weight")
        assert names[j + 1] == "model.layers.0.mlp.up_proj.weight"
        small = pack_state_dict(state, shm_dir=tmp_path, bucket_bytes=1 << 20)
        assert 1 < len(small.buckets) < len(state)
        small.close()
    finally:
        shared.close()
    assert not list(tmp_path.iterdir())  # close() unlinks the exporter's files


def test_fusable_groups_never_straddle_two_buckets() -> None:
    state, config = _tiny_state()
    ordered = canonical_order(list(state))
    q0 = ordered.index("model.layers.0.self_attn.q_proj.weight")
    # room for everything before q_proj and q_proj itself, not for k_proj and v_proj after it
    before = sum(_align(state[n].numel() * state[n].element_size()) for n in ordered[: q0 + 1])
    specs, sizes = plan_buckets(state, before + 1)
    assert len(sizes) > 1
    by_name = {spec.name: spec for spec in specs}
    for layer in range(config.num_hidden_layers):
        for kind, group in (("self_attn", "qkv"), ("mlp", ("gate", "up"))):
            names = [f"model.layers.{layer}.{kind}.{m}_proj.weight" for m in group]
            assert len({by_name[n].bucket for n in names}) == 1, names
    assert by_name["model.layers.0.self_attn.q_proj.weight"].offset == 0  # the group opened a bucket


def test_another_process_maps_the_same_memory(tmp_path: Path) -> None:
    state, _ = _tiny_state()
    shared = pack_state_dict(state, shm_dir=tmp_path)
    manifest = export_manifest(shared)
    name = "model.layers.1.self_attn.v_proj.weight"
    child = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import LlamaConfig
        from kiln_common.model_loader import DUMMY_SHAPES
        from kiln_common.weight_share import attach
        from kiln_train.base_model import build_model_over
        shared = attach(json.loads(sys.stdin.read()))
        model = build_model_over(shared.views, LlamaConfig(**DUMMY_SHAPES["tiny"]))
        params = dict(model.named_parameters())
        same = all(params[n].data_ptr() == v.data_ptr() for n, v in shared.views.items() if n in params)
        tied = model.lm_head.weight.data_ptr() == shared.views["model.embed_tokens.weight"].data_ptr()
        print(json.dumps({{"same": same, "tied": tied, "n": len(params),
                          "value": float(shared.views["{name}"][0, 0])}}), flush=True)
        shared.views["{name}"][0, 1] = 42.0  # the parent must see this write: same pages
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", child],
        input=json.dumps(manifest),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["same"] and out["tied"] and out["n"] > 0
    assert out["value"] == float(state[name][0, 0])
    assert float(shared.views[name][0, 1]) == 42.0
    shared.close()


def test_attach_in_process_reuses_storage(tmp_path: Path) -> None:
    state, _ = _tiny_state()
    shared = pack_state_dict(state, shm_dir=tmp_path)
    again = attach(export_manifest(shared))
    key = "model.norm.weight"
    again.views[key][0] = 7.0
    assert float(shared.views[key][0]) == 7.0
    shared.close()
