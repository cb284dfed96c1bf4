"""Resumable checkpoints: safetensors + JSON round trip, retention, torn writes, no pickle."""
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dpt_fast.diffusion.checkpoint import (
    checkpoint_paths,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_ema_weights,
    save_checkpoint,
)
from dpt_fast.utils import UserError


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    ema = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.99, 0.99))
    return model, ema, opt


def _steps(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = model(torch.randn(16, 4, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_round_trip_restores_model_ema_and_optimizer_so_training_continues_identically(tmp_path):
    model, ema, opt = _setup()
    _steps(model, opt, 3)
    ema.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})
    save_checkpoint(tmp_path, 3, model, ema, opt, {"fingerprint": "abc", "rng": [1, 2]})

    model2, ema2, opt2 = _setup(seed=7)
    meta = load_checkpoint(tmp_path, 3, model2, ema2, opt2)
    assert meta["fingerprint"] == "abc" and meta["step"] == 3 and meta["rng"] == [1, 2]
    assert opt2.param_groups[0]["betas"] == (0.99, 0.99)
    for a, b in ((model, model2), (ema, ema2)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    _steps(model, opt, 2, seed=5)
    _steps(model2, opt2, 2, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), model2.parameters()))
    saved_ema = load_ema_weights(tmp_path, 3)
    assert saved_ema.keys() == ema.state_dict().keys()
    assert all(torch.equal(saved_ema[k], v) for k, v in ema.state_dict().items())


def test_files_are_safetensors_and_json_without_pickle(tmp_path):
    model, ema, opt = _setup()
    _steps(model, opt, 1)
    save_checkpoint(tmp_path, 1, model, ema, opt, {})
    st, js = checkpoint_paths(tmp_path, 1)
    keys = load_file(str(st)).keys()
    assert {"model.0.weight", "ema.2.bias", "optim.0.exp_avg", "optim.0.exp_avg_sq", "optim.0.step"} <= set(keys)
    assert json.loads(js.read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [js.name, st.name]  # no temporary files left behind


def test_keeps_the_latest_and_keep_older_ones(tmp_path):
    model, ema, opt = _setup()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, ema, opt, {}, keep=1)
    assert list_checkpoints(tmp_path) == [30, 40]
    assert not checkpoint_paths(tmp_path, 10)[0].exists()


def test_a_torn_checkpoint_without_its_json_is_ignored(tmp_path):
    model, ema, opt = _setup()
    save_checkpoint(tmp_path, 5, model, ema, opt, {})
    st, js = checkpoint_paths(tmp_path, 5)
    st.rename(checkpoint_paths(tmp_path, 9)[0])  # tensors of step 9 written, killed before its JSON
    st2, _ = checkpoint_paths(tmp_path, 9)
    save_checkpoint(tmp_path, 5, model, ema, opt, {})
    assert latest_checkpoint(tmp_path) == 5 and st2.exists()
    assert latest_checkpoint(tmp_path / "missing") is None


def test_weights_of_another_architecture_are_a_user_error(tmp_path):
    model, ema, opt = _setup()
    save_checkpoint(tmp_path, 1, model, ema, opt, {})
    other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(UserError, match="--fresh"):
        load_checkpoint(tmp_path, 1, other)


def _overwrite_first_float(st_path, value: float) -> None:
    """Overwrite the first 4 data bytes of a safetensors file in place (same size, valid header)."""
    import struct

    raw = bytearray(st_path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # after the header
    raw[start:start + 4] = struct.pack("<f", value)
    st_path.write_bytes(bytes(raw))


@pytest.mark.parametrize("value", [float("nan"), 3.0])
def test_overwritten_tensor_bytes_are_detected_and_training_falls_back_to_the_previous_checkpoint(tmp_path, value):
    model, ema, opt = _setup()
    for step in (10, 20):
        _steps(model, opt, 1)
        save_checkpoint(tmp_path, step, model, ema, opt, {})
    _overwrite_first_float(checkpoint_paths(tmp_path, 20)[0], value)
    with pytest.raises(UserError, match="sha256") as e:
        load_checkpoint(tmp_path, 20, *_setup())
    assert "\n" not in str(e.value)
    assert latest_checkpoint(tmp_path) == 10  # the damaged newest one is skipped
    load_checkpoint(tmp_path, 10, *_setup())


def test_a_truncated_or_garbled_checkpoint_json_is_skipped(tmp_path):
    model, ema, opt = _setup()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, ema, opt, {})
    checkpoint_paths(tmp_path, 2)[1].write_bytes(b"\xff\xfe garbage")
    assert latest_checkpoint(tmp_path) == 1
    checkpoint_paths(tmp_path, 1)[0].write_bytes(b"short")
    assert latest_checkpoint(tmp_path) is None
