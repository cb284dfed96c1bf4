"""Official-checkpoint import: a separate, minimal re-implementation of the official U-ViT forward (written
from the paper / docs/PAPER.md, module names as in the official libs/uvit.py, explicit per-head math attention)
saves a random state dict as nnet.pth; `load_official_uvit` must reproduce its fp32 CPU forward to 1e-5."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dpt_fast.models import UViT, load_official_uvit
from dpt_fast.models.official import infer_uvit_kwargs
from dpt_fast.utils import UserError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest (conftest.py)


# ---------------------------------------------------------------------------------------------- the reference
class RefAttention(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        dh = D // self.heads
        q, k, v = self.qkv(x).split(D, dim=-1)  # 'B L (K H D)': q, k, v are the three D-wide thirds
        outs = []
        for h in range(self.heads):
            sl = slice(h * dh, (h + 1) * dh)
            w = torch.einsum("bid,bjd->bij", q[..., sl], k[..., sl]) / math.sqrt(dh)
            outs.append(torch.einsum("bij,bjd->bid", w.softmax(-1), v[..., sl]))
        return self.proj(torch.cat(outs, dim=-1))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qkv_bias, skip):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RefAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, p, c, d):
        super().__init__()
        self.proj = nn.Conv2d(c, d, p, stride=p)


class RefUViT(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio=4.0,
                 qkv_bias=False, mlp_time_embed=False, num_classes=-1, conv=True, skip=True):
        super().__init__()
        D = embed_dim
        self.p, self.c, self.D = patch_size, in_chans, D
        self.patch_embed = RefPatchEmbed(patch_size, in_chans, D)
        self.time_embed = nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D)) if mlp_time_embed \
            else nn.Identity()
        self.label_emb = nn.Embedding(num_classes, D) if num_classes > 0 else None
        extras = 2 if num_classes > 0 else 1
        self.pos_embed = nn.Parameter(torch.randn(1, extras + (img_size // patch_size) ** 2, D) * 0.02)
        blk = lambda s: RefBlock(D, num_heads, mlp_ratio, qkv_bias, s)  # noqa: E731
        self.in_blocks = nn.ModuleList([blk(False) for _ in range(depth // 2)])
        self.mid_block = blk(False)
        self.out_blocks = nn.ModuleList([blk(skip) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, patch_size ** 2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        with torch.no_grad():  # random, non-trivial weights everywhere (LN affine included)
            for name, prm in self.named_parameters():
                if name != "pos_embed":
                    prm.copy_(torch.randn_like(prm) * (0.1 if prm.dim() > 1 else 0.3) + (1.0 if "norm" in name
                                                                                          and "weight" in name else 0))

    def forward(self, x, t, y=None):
        B, _, H, W = x.shape
        tok = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        half = self.D // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        ang = t[:, None].float() * freqs
        temb = self.time_embed(torch.cat([ang.cos(), ang.sin()], dim=1))
        front = [temb[:, None]] if y is None else [self.label_emb(y)[:, None], temb[:, None]]
        x = torch.cat(front + [tok], dim=1) + self.pos_embed
        stack = []
        for b in self.in_blocks:
            x = b(x)
            stack.append(x)
        x = self.mid_block(x)
        for b in self.out_blocks:
            x = b(x, stack.pop())
        x = self.decoder_pred(self.norm(x))[:, len(front):]
        p, c = self.p, self.c
        img = torch.empty(B, c, H, W)
        for n in range(x.shape[1]):  # token n = patch (n // (W/p), n % (W/p)); features ordered (p1, p2, C)
            i, j = divmod(n, W // p)
            img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = x[:, n].view(B, p, p, c).permute(0, 3, 1, 2)
        return self.final_layer(img)


CASES = {
    "digits_cond": dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=2, num_classes=11),
    "latent_like": dict(img_size=8, patch_size=2, in_chans=4, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                        conv=False, mlp_time_embed=True, qkv_bias=True),
    "uncond_rgb": dict(img_size=12, patch_size=3, in_chans=3, embed_dim=32, depth=2, num_heads=4, skip=True),
}


def make_reference(case):
    torch.manual_seed(0)
    return RefUViT(**CASES[case]).eval()


def ref_inputs(cfg, B=3):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, cfg["in_chans"], cfg["img_size"], cfg["img_size"], generator=g)
    t = torch.tensor([0.0, 312.5, 999.0][:B])
    y = torch.tensor([0, 2, cfg["num_classes"] - 1][:B]) if cfg.get("num_classes", -1) > 0 else None
    return x, t, y


@pytest.mark.parametrize("case", list(CASES))
def test_official_nnet_pth_loads_and_matches_forward(tmp_path, case):
    ref = make_reference(case)
    path = tmp_path / "nnet_ema.pth"
    torch.save(ref.state_dict(), path)
    heads = {"num_heads": CASES[case]["num_heads"]}
    model = load_official_uvit(path, **heads)
    x, t, y = ref_inputs(CASES[case])
    with torch.no_grad():
        want, got = ref(x, t, y), model(x, t, y)
    assert want.abs().max() > 0.1  # a real signal, not a collapsed output
    assert (got - want).abs().max().item() <= 1e-5


def test_inferred_architecture_from_weights():
    ref = make_reference("latent_like")
    kw = infer_uvit_kwargs(ref.state_dict())
    c = CASES["latent_like"]
    assert {k: kw[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_classes")} == \
        {k: c[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_classes")}
    assert kw["conv"] is False and kw["mlp_time_embed"] is True and kw["qkv_bias"] is True and kw["skip"] is True
    assert kw["mlp_ratio"] == 4.0 and "num_heads" not in kw  # width 48 is not a paper width


def test_paper_width_gives_num_heads_and_wrapped_prefixed_dicts_load():
    torch.manual_seed(0)
    ours = UViT(img_size=4, patch_size=2, in_chans=4, embed_dim=512, depth=2, num_heads=8, num_classes=3)
    wrapped = {"nnet_ema": {f"module.{k}": v for k, v in ours.state_dict().items()}}
    loaded = load_official_uvit(wrapped)
    assert loaded.mid_block.attn.num_heads == 8
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))


def test_safetensors_round_trip_through_convert_cli(tmp_path):
    ref = make_reference("digits_cond")
    src = tmp_path / "nnet.pth"
    torch.save(ref.state_dict(), src)
    dst = tmp_path / "uvit.safetensors"
    r = subprocess.run([sys.executable, "-m", "dpt_fast.convert", str(src), str(dst), "--num-heads", "2"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert dst.is_file() and dst.with_suffix(".json").is_file()
    model = load_official_uvit(dst)  # kwargs (num_heads=2) come from the JSON beside it
    x, t, y = ref_inputs(CASES["digits_cond"])
    with torch.no_grad():
        assert (model(x, t, y) - ref(x, t, y)).abs().max().item() <= 1e-5


def test_wrong_keys_are_a_one_line_user_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(UserError, match=r"no 'pos_embed', so this is not a U-ViT") as e:
        load_official_uvit(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    sd = make_reference("digits_cond").state_dict()
    del sd["out_blocks.0.mlp.fc2.bias"]
    with pytest.raises(UserError, match="missing: out_blocks.0.mlp.fc2.bias"):
        load_official_uvit(sd, num_heads=2)
    with pytest.raises(UserError, match="pass num_heads"):
        load_official_uvit(make_reference("digits_cond").state_dict())


class _Payload:
    """Unpickling this would run code (create the marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "nnet.pth"
    torch.save({"pos_embed": torch.zeros(1, 3, 4), "evil": _Payload(marker)}, path)
    with pytest.raises(UserError, match="refused, it holds pickled objects other than tensors") as e:
        load_official_uvit(path)
    assert not marker.exists()
    assert "\n" not in str(e.value)


def test_missing_or_foreign_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint file"):
        load_official_uvit(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable PyTorch weights file"):
        load_official_uvit(junk)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(UserError, match="not a state_dict"):
        load_official_uvit(tensor_only)


def test_convert_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    from dpt_fast.convert import main

    assert main([str(tmp_path / "none.pth"), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "no such checkpoint file" in err
    src = tmp_path / "nnet.pth"
    torch.save(make_reference("digits_cond").state_dict(), src)
    assert main([str(src), str(tmp_path / "o.bin"), "--num-heads", "2"]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
