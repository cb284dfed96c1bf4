"""`load_msn` reads official MSN checkpoints and gives DPT's stage-1 feature exactly.

The reference below is a faithful copy of facebookresearch/msn `src/deit.py` (the same file ML-GSAI/DPT ships):
VisionTransformer with its PatchEmbed / Block / Attention / MLP and `forward_blocks`, which DPT's
`train_classifier.py` calls with `blocks = 1`. Checkpoints are written as MSN's `save_checkpoint` does: a
DDP-wrapped (`module.`) encoder and target encoder with the projection head `fc`, AdamW state, prototypes
and scalars beside them.
"""
import math
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn as nn

from dpt_fast.models import load_msn
from dpt_fast.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# Reference: facebookresearch/msn src/deit.py (drop-path / dropout are identities in eval and are left out)
# ---------------------------------------------------------------------------------------------------------------
class RefMLP(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x), attn


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = RefAttention(dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = RefMLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        y, attn = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefViT(nn.Module):
    def __init__(self, patch_size, embed_dim, depth, num_heads, img_size=224, mlp_ratio=4.0):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = RefPatchEmbed(img_size, patch_size, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([RefBlock(embed_dim, num_heads, mlp_ratio, True, norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.fc = None

    def forward_blocks(self, x, num_blocks=1):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, self.pos_embed)
        cls_x = []
        for i in range(len(self.blocks)):
            x = self.blocks[i](x)
            if (len(self.blocks) - i) <= num_blocks:
                cls_x.append(x[:, 0])
        return torch.cat(cls_x, dim=-1)

    def interpolate_pos_encoding(self, x, pos_embed):
        npatch = x.shape[1] - 1
        N = pos_embed.shape[1] - 1
        if npatch == N:
            return pos_embed
        class_emb = pos_embed[:, 0]
        pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        pos_embed = nn.functional.interpolate(
            pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=math.sqrt(npatch / N), mode="bicubic")
        pos_embed = pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_emb.unsqueeze(0), pos_embed), dim=1)


def msn_projection_head(emb_dim, hidden_dim=32, output_dim=16):
    """msn_train.init_model's head (use_bn=True): fc1, bn1, gelu1, fc2, bn2, gelu2, fc3."""
    fc = OrderedDict()
    fc["fc1"] = nn.Linear(emb_dim, hidden_dim)
    fc["bn1"] = nn.BatchNorm1d(hidden_dim)
    fc["gelu1"] = nn.GELU()
    fc["fc2"] = nn.Linear(hidden_dim, hidden_dim)
    fc["bn2"] = nn.BatchNorm1d(hidden_dim)
    fc["gelu2"] = nn.GELU()
    fc["fc3"] = nn.Linear(hidden_dim, output_dim)
    return nn.Sequential(fc)


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    return model


def save_msn_checkpoint(path, target, seed=0):
    """What msn_train.save_checkpoint writes: DDP state dicts, AdamW state, prototypes, scalars."""
    target.fc = msn_projection_head(target.pos_embed.shape[-1])
    online = randomise(RefViT(target.patch_embed.proj.kernel_size[0], target.pos_embed.shape[-1],
                              len(target.blocks), target.blocks[0].attn.num_heads), seed + 1)
    online.fc = msn_projection_head(online.pos_embed.shape[-1])
    prototypes = nn.Parameter(torch.randn(8, 16))
    opt = torch.optim.AdamW([
        {"params": [p for n, p in online.named_parameters() if "bias" not in n and p.ndim != 1]},
        {"params": [p for n, p in online.named_parameters() if "bias" in n or p.ndim == 1], "WD_exclude": True,
         "weight_decay": 0},
        {"params": [prototypes], "lr": 1e-3, "LARS_exclude": True, "WD_exclude": True, "weight_decay": 0}])
    loss = sum(p.square().sum() for p in online.parameters()) + prototypes.sum()  # a gradient for every entry
    loss.backward()
    opt.step()
    ddp = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}  # noqa: E731
    torch.save({"encoder": ddp(online), "opt": opt.state_dict(), "prototypes": prototypes.data,
                "target_encoder": ddp(target), "epoch": 300, "loss": 2.5, "batch_size": 1024, "world_size": 32,
                "lr": 0.001, "temperature": 0.1}, path)


CASES = {  # (patch, width, depth, heads, input side): MSN's patch sizes; 196 / 1024 / 784 / 484 / 3136 patches
    "p16_tiny_width": (16, 192, 2, None, 224),
    "p7": (7, 48, 2, 2, 224),
    "p8_at_256_interpolates": (8, 48, 1, 2, 256),
    "p10": (10, 48, 1, 2, 224),
    "p4": (4, 32, 1, 2, 224),
}


@pytest.mark.parametrize("case", list(CASES))
def test_msn_checkpoint_gives_dpt_stage1_feature(tmp_path, monkeypatch, case):
    patch, width, depth, heads, side = CASES[case]
    torch.manual_seed(0)
    ref = randomise(RefViT(patch, width, depth, heads or 3), 0).eval()
    path = tmp_path / "vit_ep300.pth.tar"
    save_msn_checkpoint(path, ref)
    ref.fc = None
    ours = load_msn(path, num_heads=heads)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        want = ref.forward_blocks(x, 1)
        got = ours(x)  # torch SDPA: the same sums in another order
        monkeypatch.setenv("DPT_FAST_ATTN", "math")
        exact = ours(x)  # the official's explicit softmax(q k^T * scale) v
    assert got.shape == (2, width)
    assert torch.equal(exact, want)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_feature_is_before_the_final_norm_and_from_the_target_encoder(tmp_path):
    torch.manual_seed(0)
    ref = randomise(RefViT(16, 192, 1, 3), 0).eval()
    path = tmp_path / "ck.pth.tar"
    save_msn_checkpoint(path, ref)
    ours = load_msn(path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feat = ours(x)
        assert not torch.allclose(feat, ref.norm(feat), atol=1e-3)  # no final LayerNorm
        assert ours.blocks[0].attn.qkv.weight.equal(ref.blocks[0].attn.qkv.weight)  # target_encoder, not encoder


def test_inferred_architecture_and_heads_from_width(tmp_path):
    torch.manual_seed(0)
    ref = RefViT(16, 192, 3, 3)
    ours = load_msn({"target_encoder": {f"module.{k}": v for k, v in ref.state_dict().items()}})
    assert (ours.patch_size, ours.embed_dim, len(ours.blocks), ours.blocks[0].num_heads) == (16, 192, 3, 3)
    assert ours.pos_embed.shape == (1, 197, 192)


def test_optimizer_state_and_scalars_load_weights_only_and_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled code ran",))

    ref = RefViT(16, 48, 1, 2)
    good = tmp_path / "good.pth.tar"
    save_msn_checkpoint(good, ref)
    torch.load(good, weights_only=True)  # MSN's dict is plain containers, tensors and numbers
    evil = tmp_path / "evil.pth.tar"
    torch.save({"target_encoder": ref.state_dict(), "sched": Payload()}, evil)
    with pytest.raises(UserError, match="refused, it holds pickled objects other than tensors") as e:
        load_msn(evil, num_heads=2)
    assert "\n" not in str(e.value)


def test_wrong_and_broken_files_are_one_line_user_errors(tmp_path):
    ref = RefViT(16, 48, 1, 2)
    good = tmp_path / "good.pth.tar"
    save_msn_checkpoint(good, ref)
    torn = tmp_path / "torn.pth.tar"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    uvit = tmp_path / "uvit.pth"
    torch.save({"pos_embed": torch.zeros(1, 5, 8), "patch_embed.proj.weight": torch.zeros(8, 4, 2, 2)}, uvit)
    for path, msg in ((tmp_path / "none.pth.tar", "no such checkpoint file"),
                      (torn, "not a readable PyTorch weights file .* truncated"),
                      (uvit, "not an MSN ViT encoder")):
        with pytest.raises(UserError, match=msg) as e:
            load_msn(path, num_heads=2)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    with pytest.raises(UserError, match="pass num_heads"):
        load_msn(good)  # width 48 is not one of MSN's
