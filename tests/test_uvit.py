import copy

import pytest
import torch

from dpt_fast.config import load_config
from dpt_fast.models import UVIT_PRESETS, UViT, build_uvit
from dpt_fast.models.uvit import timestep_embedding, unpatchify
from dpt_fast.utils import UserError



pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest (conftest.py)


TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=4, num_heads=2)


def tiny(**kw) -> UViT:
    torch.manual_seed(0)
    return UViT(**{**TINY, "num_classes": 11, **kw})


def inputs(B=3, C=1, S=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, S, S, generator=g), torch.rand(B, generator=g) * 999, torch.tensor([0, 4, 10])[:B]


@pytest.mark.parametrize("conditioning", ["token", "adaln"])
@pytest.mark.parametrize("num_classes", [11, -1])
@pytest.mark.parametrize("conv, skip", [(True, True), (False, False)])
def test_output_has_input_shape(conditioning, num_classes, conv, skip):
    m = tiny(conditioning=conditioning, num_classes=num_classes, conv=conv, skip=skip)
    x, t, y = inputs()
    out = m(x, t, y if num_classes > 0 else None)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_rgb_patch4_and_mlp_time_embed_shapes():
    torch.manual_seed(0)
    m = UViT(img_size=16, patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=3, mlp_time_embed=True,
             qkv_bias=True, num_classes=5)
    x = torch.randn(2, 3, 16, 16)
    assert m(x, torch.tensor([1.0, 500.0]), torch.tensor([0, 4])).shape == x.shape
    assert m.extras == 2 and m.pos_embed.shape == (1, 2 + 16, 48)


def test_timestep_embedding_is_cos_then_sin():
    e = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(e[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    assert timestep_embedding(torch.tensor([1.0]), 7).shape == (1, 7)


def test_unpatchify_layout_is_B_hw_p1p2C():
    B, C, p, h = 2, 3, 2, 3
    x = torch.randn(B, h * h, p * p * C)
    img = unpatchify(x, C, p)
    for i in range(h):
        for j in range(h):
            for p1 in range(p):
                for p2 in range(p):
                    for c in range(C):
                        assert img[1, c, i * p + p1, j * p + p2] == x[1, i * h + j, (p1 * p + p2) * C + c]


def test_tokens_are_label_then_time_then_patches():
    m = tiny()
    with torch.no_grad():
        m.pos_embed.zero_()
    seen = {}
    m.in_blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    x, t, y = inputs()
    m(x, t, y)
    tokens = seen["x"]
    assert tokens.shape == (3, 2 + 16, 32)
    torch.testing.assert_close(tokens[:, 0], m.label_emb(y))
    torch.testing.assert_close(tokens[:, 1], timestep_embedding(t, 32))
    torch.testing.assert_close(tokens[:, 2:], m.patch_embed(x))


def test_long_skips_are_popped_lifo():
    m = tiny(depth=6)
    outs, skips = [], []
    for blk in m.in_blocks:
        blk.register_forward_hook(lambda mod, args, out: outs.append(out))
    for blk in m.out_blocks:
        blk.register_forward_pre_hook(lambda mod, args: skips.append(args[1]))
    m(*inputs())
    assert len(outs) == len(skips) == 3
    assert all(s is o for s, o in zip(skips, reversed(outs)))
    assert all(b.skip_linear.in_features == 64 for b in m.out_blocks) and m.mid_block.skip_linear is None


def test_null_class_is_last_label_and_default_for_missing_y():
    m = tiny()
    x, t, _ = inputs()
    null = torch.full((3,), 10)
    torch.testing.assert_close(m(x, t, None), m(x, t, null))
    assert not torch.allclose(m(x, t, torch.tensor([1, 2, 3])), m(x, t, null))
    with pytest.raises(ValueError, match="unconditional"):
        tiny(num_classes=-1)(x, t, null)


def test_same_seed_same_model_and_output():
    a, b = tiny(), tiny()
    x, t, y = inputs()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a(x, t, y), b(x, t, y))
    assert torch.equal(a(x, t, y), a(x, t, y))


def test_official_initialisation():
    torch.manual_seed(0)
    m = UViT(img_size=8, patch_size=2, in_chans=1, embed_dim=256, depth=2, num_heads=4, num_classes=3)
    w = m.mid_block.mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.all(m.mid_block.mlp.fc1.bias == 0) and torch.all(m.mid_block.norm1.weight == 1)
    assert abs(m.pos_embed.std().item() - 0.02) < 0.003
    assert m.no_weight_decay() == {"pos_embed"}


def test_adaln_blocks_start_as_identity_and_output_is_conv_bias():
    m = tiny(conditioning="adaln")
    x, t, y = inputs()
    assert m.extras == 0 and m.pos_embed.shape[1] == 16
    tok = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    torch.testing.assert_close(m.in_blocks[0](tok, c=c), tok)
    expected = m.final_layer.bias.view(1, -1, 1, 1).expand_as(x)
    torch.testing.assert_close(m(x, t, y), expected)
    # but it is trainable: the zero-initialised layers get gradients
    m(x, t, y).square().sum().backward()
    assert m.decoder_pred.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    a = tiny()
    b = copy.deepcopy(a)
    for blk in b.blocks():
        blk.use_checkpoint = True
    x, t, y = inputs()
    a(x, t, y).square().mean().backward()
    b(x, t, y).square().mean().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_tiny_model_overfits_a_batch():
    m = tiny()
    x, t, y = inputs(B=3)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        loss = (m(x, t, y) - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first  # measured: 1.30 -> 0.23 after 80 steps


def test_paper_sizes_on_meta_device():
    # Paper (U-ViT, Table 1 / 5): U-ViT-L/2 287M, U-ViT-H/2 501M parameters (latent 256, 1001 classes).
    with torch.device("meta"):
        large = UViT(**UVIT_PRESETS["uvit_l2_latent256"], num_classes=1001)
        huge = UViT(**UVIT_PRESETS["uvit_h2_latent256"], num_classes=1001)
    assert round(sum(p.numel() for p in large.parameters()) / 1e6) == 287
    assert round(sum(p.numel() for p in huge.parameters()) / 1e6) == 501
    assert isinstance(huge.final_layer, torch.nn.Identity) and isinstance(large.final_layer, torch.nn.Conv2d)
    assert huge.pos_embed.shape == (1, 2 + 256, 1152) and len(huge.in_blocks) == 14


def test_build_uvit_uses_preset_then_config_fields():
    cfg = load_config("digits")
    m = build_uvit(cfg.model, 11)
    p = UVIT_PRESETS["uvit_digits"]
    assert (m.embed_dim, len(m.in_blocks), m.patch_size, m.num_classes) == (p["embed_dim"], p["depth"] // 2, 2, 11)
    assert isinstance(m.final_layer, torch.nn.Conv2d) and m.conditioning == "token"
    cfg = load_config("digits", ["model.embed_dim=48", "model.num_heads=3", "model.conv=false",
                                 "model.conditioning=adaln", "model.depth=2"])
    m = build_uvit(cfg.model, 11)
    assert m.embed_dim == 48 and isinstance(m.final_layer, torch.nn.Identity) and m.conditioning == "adaln"
    assert len(m.out_blocks) == 1


def test_build_uvit_resolves_paper_alias_and_rejects_unknown_preset():
    cfg = load_config("digits", ["model.preset=U-ViT-H/2"])
    from dpt_fast.models.uvit import uvit_kwargs

    assert uvit_kwargs(cfg.model, 1001)["embed_dim"] == 1152
    with pytest.raises(UserError, match="model.preset"):
        build_uvit(load_config("digits", ["model.preset=uvit_nope"]).model, 11)
    with pytest.raises(UserError, match="num_heads"):
        build_uvit(load_config("digits", ["model.num_heads=5"]).model, 11)


def test_torch_compile_traces_the_whole_model_without_graph_breaks():
    # aot_eager: dynamo + AOTAutograd as with Inductor, without minutes of C++ codegen on CPU.
    m = tiny()
    x, t, y = inputs()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = compiled(x, t, y)
    torch.testing.assert_close(out, m(x, t, y))
    out.square().mean().backward()
    assert m.pos_embed.grad is not None


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("conditioning", ["token", "adaln"])
def test_cuda_bf16_kernels_inductor_and_reference_agree(monkeypatch, conditioning):
    torch.manual_seed(0)
    m = UViT(img_size=32, patch_size=2, in_chans=4, embed_dim=288, depth=4, num_heads=4, num_classes=11,
             conditioning=conditioning).cuda()
    if conditioning == "adaln":
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 0 and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
    x, t, y = torch.randn(8, 4, 32, 32, device="cuda"), torch.rand(8, device="cuda") * 999, \
        torch.randint(0, 11, (8,), device="cuda")

    def run(model):
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, y)
        out.float().square().mean().backward()
        return out.float(), m.in_blocks[0].attn.qkv.weight.grad.clone()

    monkeypatch.setenv("DPT_FAST_KERNELS", "reference")
    ref = run(m)
    monkeypatch.setenv("DPT_FAST_KERNELS", "auto")  # Triton kernels on CUDA
    for got in (run(m), run(torch.compile(m))):
        for a, b in zip(got, ref):
            assert ((a - b).abs().max() / b.abs().max()).item() < 3e-2


@pytest.mark.parametrize("kw", [dict(), dict(conditioning="adaln", mlp_time_embed=True), dict(conv=False, skip=False)])
def test_forward_flops_matches_torch_flop_counter(kw, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    # Attention as plain matmuls: the counter has no formula for the fused CPU SDPA kernel of recent torch.
    monkeypatch.setenv("DPT_FAST_ATTN", "math")
    m = tiny(**kw)
    x, t, y = inputs(B=1)
    with FlopCounterMode(display=False) as counter:
        m(x, t, y)
    assert m.forward_flops() == counter.get_total_flops()


def test_sincos_pos_embed_init_starts_patches_at_the_2d_table_and_extras_at_zero():
    from dpt_fast.models.uvit import UViT, sincos_pos_embed_2d

    table = sincos_pos_embed_2d(16, 3)
    assert table.shape == (9, 16)
    # patch (r, c) = row r*3+c: first half encodes the row, second half the column; position 0 is sin 0 / cos 1
    torch.testing.assert_close(table[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(table[1, :8], table[0, :8])  # same row
    torch.testing.assert_close(table[3, 8:], table[0, 8:])  # same column
    assert not torch.allclose(table[1, 8:], table[0, 8:])
    m = UViT(img_size=6, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=3,
             pos_embed_init="sincos")
    assert m.extras == 2 and torch.equal(m.pos_embed[0, :2], torch.zeros(2, 16))
    torch.testing.assert_close(m.pos_embed[0, 2:], table)
    assert m.pos_embed.requires_grad  # a starting point, still learned
    with pytest.raises(ValueError, match="pos_embed_init"):
        UViT(img_size=6, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, pos_embed_init="zeros")
