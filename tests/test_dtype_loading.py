"""Loading weights in a dtype other than the stored one (longalign_core.dtype_loading): the same values as
``from_pretrained(torch_dtype=...)``, read from the files from_pretrained reads, each tensor a copy of its own.
The memory it saves is measured side by side in ``bench/load.py``."""

import json

import pytest
import torch

from longalign_core import dtype_loading
from longalign_core.dtype_loading import from_pretrained_in_dtype, read_cast, stored_dtype, weight_files

#: A small SD-shaped UNet (4 levels, cross-attention), about 6 M parameters.
SMALL_UNET = dict(block_out_channels=[32, 64, 128, 128], layers_per_block=1, cross_attention_dim=64,
                  attention_head_dim=8, norm_num_groups=32, sample_size=32)


def clip_text(hidden=64, layers=2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=2, vocab_size=1000, max_position_embeddings=77)).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A diffusers UNet folder with fp32 weights and an fp16 variant beside them (as the published SD folders),
    a transformers text encoder stored in fp16 in three shards, and one stored in fp32."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SMALL_UNET)
    unet.save_pretrained(root / "unet")
    unet.half().save_pretrained(root / "unet", variant="fp16")
    clip_text().half().save_pretrained(root / "text_fp16_sharded", max_shard_size="100KB")
    clip_text().save_pretrained(root / "text_fp32")
    return root


@pytest.mark.parametrize("component, variant, dtype", [
    ("unet", "fp16", torch.bfloat16),  # SDXL's published fp16 variant in a bf16 run
    ("unet", None, torch.bfloat16),  # fp32 weights in a bf16 run
    ("text_fp16_sharded", None, torch.bfloat16),
    ("text_fp32", None, torch.float16),
])
def test_the_same_values_as_from_pretrained_and_every_tensor_read_cast(folders, component, variant, dtype,
                                                                       monkeypatch):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = UNet2DConditionModel if component == "unet" else CLIPTextModel
    replaced = []
    recast = dtype_loading.recast_from_files
    monkeypatch.setattr(dtype_loading, "recast_from_files", lambda *a, **k: replaced.append(recast(*a, **k)))
    ours = from_pretrained_in_dtype(cls, folders, dtype, subfolder=component, variant=variant)
    theirs = cls.from_pretrained(folders, subfolder=component, torch_dtype=dtype, variant=variant)
    want = theirs.state_dict()
    got = ours.state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    files = weight_files(folders / component, variant)
    in_files = sum(1 for f in files for _ in read_cast(f, dtype))
    assert replaced == [in_files] and in_files >= len(list(ours.parameters()))


def test_a_hub_id_in_the_local_cache_is_read_from_its_snapshot(folders, tmp_path, monkeypatch):
    import shutil

    from diffusers import UNet2DConditionModel

    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(folders / "unet", repo / "snapshots" / ("0123abcd" * 5) / "unet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd" * 5)
    replaced = []
    recast = dtype_loading.recast_from_files
    monkeypatch.setattr(dtype_loading, "recast_from_files", lambda *a, **k: replaced.append(recast(*a, **k)))
    where = dict(subfolder="unet", variant="fp16", cache_dir=str(tmp_path / "hub"), local_files_only=True)
    ours = from_pretrained_in_dtype(UNet2DConditionModel, "someone/tiny-sd", torch.bfloat16, **where)
    theirs = UNet2DConditionModel.from_pretrained("someone/tiny-sd", torch_dtype=torch.bfloat16, **where)
    assert replaced and replaced[0] == len(ours.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    # not in the cache: loaded as from_pretrained loads it (here: refused offline), nothing else tried
    with pytest.raises(OSError):
        from_pretrained_in_dtype(UNet2DConditionModel, "someone/elsewhere", torch.bfloat16, **where)


def test_stored_dtype_the_same_loads_as_usual(folders, monkeypatch):
    from diffusers import UNet2DConditionModel

    monkeypatch.setattr(dtype_loading, "recast_from_files", lambda *a, **k: pytest.fail("recast a matching file"))
    model = from_pretrained_in_dtype(UNet2DConditionModel, folders, torch.float16, subfolder="unet", variant="fp16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_weight_files_are_the_ones_from_pretrained_reads(folders, tmp_path):
    unet = folders / "unet"
    assert weight_files(unet) == [unet / "diffusion_pytorch_model.safetensors"]
    assert weight_files(unet, "fp16") == [unet / "diffusion_pytorch_model.fp16.safetensors"]
    assert stored_dtype(weight_files(unet)) == torch.float32
    assert stored_dtype(weight_files(unet, "fp16")) == torch.float16
    sharded = folders / "text_fp16_sharded"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted({sharded / f for f in index["weight_map"].values()})
    assert len(shards) >= 3 and weight_files(sharded) == shards
    # not clear-cut: two candidate files, a missing shard, no weights -> [] (the caller loads as usual)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("model.safetensors", "other.safetensors"):
        (two / name).write_bytes((unet / "diffusion_pytorch_model.safetensors").read_bytes())
    assert weight_files(two) == []
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text((sharded / "model.safetensors.index.json").read_text())
    assert weight_files(broken) == [] and weight_files(tmp_path / "missing") == []


def test_read_cast_keeps_no_tensor_on_the_file_mapping(folders):
    path = folders / "text_fp16_sharded" / "model-00001-of-00003.safetensors"
    if not path.exists():  # the shard count depends on transformers' naming
        path = weight_files(folders / "text_fp16_sharded")[0]
    from safetensors.torch import load_file

    stored = load_file(str(path))
    chunks = list(read_cast(path, torch.bfloat16, chunk_bytes=1))  # one tensor per mapping
    assert [n for n, _ in chunks] == list(stored)
    for name, value in chunks:
        want = stored[name].to(torch.bfloat16) if stored[name].is_floating_point() else stored[name]
        assert torch.equal(value, want)
        value.add_(1) if value.is_floating_point() else None  # a copy of its own: writable, the file untouched
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(path)).values(), stored.values()))
