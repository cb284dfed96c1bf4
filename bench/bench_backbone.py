"""Stage-1 / stage-3 feature extraction (`BackboneSpace.embed_tensor`) in images per second.

    pytest bench/bench_backbone.py --benchmark-only --benchmark-columns=mean,rounds --benchmark-verbose

The whole per-batch path: uint8 [B, 3, 256, 256] images in CPU memory (as stage 3 reads generated shards) ->
pinned non-blocking copy -> Resize 256 + CenterCrop 224 -> normalise -> MSN ViT under the space's precision
-> centred, L2-normalised rows back on the CPU. Random weights in MSN's checkpoint format (the speed does not
depend on their values). CPU: deit_tiny/16 (the only size a CPU does in seconds); GPU: the paper's backbones
ViT-B/4 (3,137 tokens) and ViT-L/7 (1,025 tokens), bf16 autocast (precision "auto") and fp32 / TF32.
"""
import pytest
import torch

from dpt_fast.models.classifier import BackboneSpace
from dpt_fast.models.msn import HEADS_BY_WIDTH, MSNViT

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MODELS = {"deit_tiny_p16": (16, 192, 12), "deit_base_p4": (4, 768, 12), "deit_large_p7": (7, 1024, 24)}


def _space(tmp_path, model, device, precision):
    from safetensors.torch import save_file

    patch, width, depth = MODELS[model]
    vit = MSNViT(patch, width, depth, HEADS_BY_WIDTH[width], (224 // patch) ** 2)
    torch.nn.init.normal_(vit.pos_embed, std=0.02)
    path = tmp_path / f"{model}.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return BackboneSpace("msn", str(path), device=device, precision=precision)


def _run(benchmark, sync, space, batch, device):
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    fn = sync(lambda: space.embed_tensor(images), device)
    fn()  # warm-up (cuDNN / SDPA kernel choice)
    out = benchmark.pedantic(fn, rounds=3, iterations=1)
    assert out.shape == (batch, space.dim)
    benchmark.extra_info.update(batch=batch, device=device, precision=space.precision,
                                images_per_second=batch / benchmark.stats.stats.mean,
                                torch_threads=torch.get_num_threads())


def test_features_cpu(benchmark, sync, tmp_path):
    _run(benchmark, sync, _space(tmp_path, "deit_tiny_p16", "cpu", "auto"), 8, "cpu")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["auto", "tf32", "fp16"])
@pytest.mark.parametrize("model", ["deit_base_p4", "deit_large_p7"])
def test_features_gpu(benchmark, sync, tmp_path, model, precision):
    _run(benchmark, sync, _space(tmp_path, model, "cuda", precision), 64, "cuda")
