"""`dpt_fast.models.weights`: the one reader of weight files (U-ViT, MSN, timm backbones, the VAE)."""
import pytest
import torch
from safetensors.torch import save_file

from dpt_fast.models.weights import read_weights, unwrap
from dpt_fast.utils import UserError

SD = {"a.weight": torch.ones(2, 2), "b.bias": torch.zeros(2)}


@pytest.mark.parametrize("wrapped", [
    SD,
    {"state_dict": SD, "epoch": 3},
    {"model": {f"module.{k}": v for k, v in SD.items()}, "optimizer": {"state": {}, "param_groups": []}},
    {"encoder": {"x": torch.zeros(1)}, "target_encoder": {f"module.{k}": v for k, v in SD.items()}, "lr": 0.1},
    {"nnet": {"x": torch.zeros(1)}, "nnet_ema": {f"_orig_mod.{k}": v for k, v in SD.items()}},
    {"state_dict": {f"module.backbone.{k}": v for k, v in SD.items()}},
])
def test_wrappers_and_prefixes_are_removed_in_one_place(tmp_path, wrapped):
    path = tmp_path / "w.pth"
    torch.save(wrapped, path)
    got = read_weights(path)
    assert list(got) == list(SD) and all(torch.equal(got[k], SD[k]) for k in SD)
    assert list(unwrap(wrapped)) == list(SD)


def test_safetensors_and_a_torn_safetensors_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(SD, str(path))
    assert list(read_weights(path)) == list(SD)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match="not a readable safetensors file.*; pass X") as e:
        read_weights(torn, hint="pass X")
    assert "\n" not in str(e.value) and str(torn) in str(e.value)


def test_unreadable_files_are_one_line_errors_naming_file_and_fix(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 64)
    full = tmp_path / "full.pth"
    torch.save(SD, full)
    torn = tmp_path / "torn.pth"
    torn.write_bytes(full.read_bytes()[:100])
    scalars = tmp_path / "scalars.pth"
    torch.save({"epoch": 3, "lr": 0.1}, scalars)
    for path, msg in ((tmp_path / "none.pth", "no such checkpoint file"),
                      (junk, "not a readable PyTorch weights file"),
                      (torn, "truncated\\? download it again"),
                      (scalars, "entry 'epoch' is a int, not a tensor")):
        with pytest.raises(UserError, match=msg) as e:
            read_weights(path, hint="pass the right file")
        assert "\n" not in str(e.value) and str(path) in str(e.value) and str(e.value).endswith("pass the right file")
