import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dpt_fast.config import DataConfig
from dpt_fast.data import load_dataset
from dpt_fast.eval.feature_nets import accuracy, load_feature_net, predict, shipped_feature_net
from dpt_fast.models.feature_net import FeatureNet
from dpt_fast.utils import UserError, file_sha256

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_feature_net", REPO / "scripts" / "train_feature_net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("size", [8, 28])
def test_feature_net_gives_features_and_logits_for_both_image_sizes(size):
    net = FeatureNet(1, (4, 8, 16), feature_dim=32, num_classes=10, img_size=size).eval()
    f, logits = net(torch.rand(3, 1, size, size) * 2 - 1)
    assert f.shape == (3, 32) and logits.shape == (3, 10)
    assert (f >= 0).all()


@pytest.mark.parametrize("data", ["digits", "mnist5k"])
def test_shipped_feature_net_matches_its_json_and_recorded_test_accuracy(data):
    path = shipped_feature_net(data)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert path.stat().st_size < 1_000_000
    assert file_sha256(path) == meta["sha256"]
    net = load_feature_net(path)
    ds = load_dataset(DataConfig(name=data))
    assert net.img_size == ds.x_train.shape[-1] and net.in_chans == ds.x_train.shape[1]
    acc = accuracy(net, ds.x_test, ds.y_test)
    assert acc >= meta["test_accuracy"] - 0.005
    assert meta["test_accuracy"] >= (0.97 if data == "mnist5k" else 0.95)


def test_train_script_runs_and_is_reproducible(tmp_path):
    script = _script()
    args = ["--data", "digits", "--max-steps", "3", "--widths", "4", "8", "--feature-dim", "16", "--quiet"]
    assert script.main([*args, "--out", str(tmp_path / "a.safetensors")]) == 0
    assert script.main([*args, "--out", str(tmp_path / "b.safetensors")]) == 0
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["sha256"] == file_sha256(tmp_path / "a.safetensors") == file_sha256(tmp_path / "b.safetensors")
    assert meta["arch"]["widths"] == [4, 8] and meta["command"].startswith("python scripts/train_feature_net.py --data digits")
    net = load_feature_net(tmp_path / "a.safetensors")
    f, logits = predict(net, torch.zeros(5, 1, 8, 8, dtype=torch.uint8))
    assert f.shape == (5, 16) and logits.shape == (5, 10)


def test_missing_or_foreign_feature_net_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_feature_net(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="bad.safetensors"):
        load_feature_net(bad)
    with pytest.raises(UserError, match="eval.feature_net"):
        shipped_feature_net("imagefolder")
