"""Models: tiny configs, parameter subsets, LoRA on fused projections, checkpoint round trip."""

from __future__ import annotations

import json

import pytest
import torch

from ecif_ray.models.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    checkpoint_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from ecif_ray.models.factory import create_model, similarity_matrix
from ecif_ray.models.subsets import ParamSubset


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("ecif-micro")


def _inputs(bundle, n=4):
    images = torch.randn(n, 3, 8, 8)
    tokens = bundle.tokenizer([f"a photo of a {w}." for w in ["one", "two", "three", "four"][:n]])
    return images, tokens


def test_tiny_configs_build_and_preprocess():
    for arch, size in (("ecif-micro", 8), ("ecif-small", 28)):
        bundle = create_model(arch)
        from PIL import Image

        x = bundle.preprocess(Image.new("L", (40, 40), 128))  # another size: resized by the model's transform
        assert x.shape == (3, size, size)
        assert bundle.tokenizer(["a photo of a cat."]).shape[1] == 16


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        create_model("nope")


@pytest.mark.parametrize("kind,expected", [
    ("heads", {"visual.proj", "text_projection"}),
    ("last-k", None),
    ("all", None),
])
def test_subset_names(kind, expected):
    bundle = create_model("ecif-micro")
    subset = ParamSubset(kind=kind, last_k=1)
    subset.apply(bundle.model)
    names = set(subset.names(bundle.model))
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert names == trainable
    assert "logit_scale" not in names
    if expected is not None:
        assert names == expected
    if kind == "last-k":
        assert any(n.startswith("visual.transformer.resblocks.1.") for n in names)
        assert any(n.startswith("transformer.resblocks.1.") for n in names)
        assert not any(".resblocks.0." in n for n in names)
        assert {"visual.proj", "text_projection", "ln_final.weight", "visual.ln_post.weight"} <= names
    if kind == "all":
        assert len(names) == sum(1 for _ in bundle.model.parameters()) - 1


def test_lora_adapters_on_fused_in_proj():
    bundle = create_model("ecif-micro")
    images, tokens = _inputs(bundle)
    before = similarity_matrix(bundle.model, images, tokens, 10.0).detach()
    subset = ParamSubset(kind="lora", lora_rank=2, lora_blocks=1, lora_targets=("q", "v"))
    subset.apply(bundle.model)
    names = subset.names(bundle.model)
    # q and v adapters on the last block of each tower only; base weights frozen.
    assert len(names) == 2 * 2 * 2
    assert all(".resblocks.1.attn." in n for n in names)
    assert all(not p.requires_grad for n, p in bundle.model.named_parameters() if n not in names)
    # B starts at zero: the adapted model equals the base model, and θ_0 = 0.
    after = similarity_matrix(bundle.model, images, tokens, 10.0).detach()
    torch.testing.assert_close(before, after)
    assert all(float(a.abs().sum()) == 0 for a in subset.initial_anchor(bundle.model).values())
    # A change of the q adapter moves only the q rows of the fused in_proj weight.
    attn = bundle.model.visual.transformer.resblocks[1].attn
    lora = attn.parametrizations.in_proj_weight[0]
    base = attn.in_proj_weight.detach().clone()
    with torch.no_grad():
        lora.lora_B_q.fill_(0.1)
    d = attn.in_proj_weight.shape[1]
    changed = (attn.in_proj_weight.detach() - base).abs().sum(dim=1) > 0
    assert changed[:d].all() and not changed[d:].any()


def test_functional_call_differentiates_subset(micro):
    subset = ParamSubset(kind="heads")
    subset.apply(micro.model)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in subset.trainable(micro.model).items()}
    images, tokens = _inputs(micro)
    s = similarity_matrix(micro.model, images, tokens, 10.0, params)
    grads = torch.autograd.grad(s.sum(), list(params.values()))
    assert all(g.abs().sum() > 0 for g in grads)


def _meta(subset: ParamSubset, **kw) -> CheckpointMeta:
    fields = {"arch": "ecif-micro", "param_subset": subset, "logit_scale": 12.5, "delta": 1e-3, "segment_size": 8,
              "seed": 3, "data_fingerprint": "abc"}
    return CheckpointMeta(**{**fields, **kw})


@pytest.mark.parametrize("kind", ["heads", "lora"])
def test_checkpoint_round_trip(tmp_path, kind):
    bundle = create_model("ecif-micro")
    subset = ParamSubset(kind=kind)
    subset.apply(bundle.model)
    with torch.no_grad():
        for p in subset.trainable(bundle.model).values():
            p.add_(0.01 * torch.randn_like(p))
    anchor = subset.initial_anchor(bundle.model)
    path = save_checkpoint(tmp_path / "ckpt", bundle, _meta(subset), anchor)
    loaded = load_checkpoint(path)
    assert loaded.meta.param_subset == subset and loaded.meta.logit_scale == pytest.approx(12.5)
    for name, tensor in bundle.model.state_dict().items():
        if name != "logit_scale":
            torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)
    assert set(loaded.anchor) == set(subset.names(loaded.model))
    images, tokens = _inputs(bundle)
    torch.testing.assert_close(similarity_matrix(loaded.model, images, tokens, 12.5),
                               similarity_matrix(bundle.model, images, tokens, 12.5))
    fp = checkpoint_fingerprint(path)
    save_checkpoint(path, bundle, _meta(subset, seed=4), anchor)  # overwrite in place
    assert checkpoint_fingerprint(path) != fp


def test_checkpoint_errors_name_the_field(tmp_path):
    bundle = create_model("ecif-micro")
    subset = ParamSubset(kind="heads")
    subset.apply(bundle.model)
    path = save_checkpoint(tmp_path / "ckpt", bundle, _meta(subset), subset.initial_anchor(bundle.model))
    meta = json.loads((path / "ecif.json").read_text())
    meta["delta"] = -1
    (path / "ecif.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="field 'delta'"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"missing ecif\.json"):
        load_checkpoint(tmp_path)


def test_checkpoint_loading_does_not_unpickle(tmp_path):
    """A pickle payload in place of the weights is refused, never executed."""
    bundle = create_model("ecif-micro")
    subset = ParamSubset(kind="heads")
    subset.apply(bundle.model)
    path = save_checkpoint(tmp_path / "ckpt", bundle, _meta(subset), subset.initial_anchor(bundle.model))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (path / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(Exception):  # noqa: B017 - any refusal is fine; executing the payload is not
        load_checkpoint(path)
    assert not marker.exists()
