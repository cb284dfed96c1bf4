"""`stage1.backbone=msn`: BackboneSpace gives DPT's official stage-1 rows for image files and generated images.

Official pipeline (ML-GSAI/DPT train_classifier.py): torchvision `Resize(256)` + `CenterCrop(224)` + ToTensor +
Normalize(ImageNet mean/std) on the PIL image, MSN's `forward_blocks(x, 1)`, then cyanure's row preprocessing
(centre, L2-normalise). The MSN reference network is test_msn.py's copy of MSN's deit.py.
"""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from dpt_fast.data.imagefolder import scan_imagefolder
from dpt_fast.data.stream import ArraySource, FolderSource, cached_features
from dpt_fast.models.classifier import BackboneSpace
from test_msn import RefViT, randomise, save_msn_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
OFFICIAL = T.Compose([T.Resize(size=256), T.CenterCrop(size=224), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


@pytest.fixture(scope="module")
def msn(tmp_path_factory):
    """A tiny MSN-format checkpoint (deit_tiny width, patch 16, one block) and its reference network."""
    torch.manual_seed(0)
    ref = randomise(RefViT(16, 192, 1, 3), 0).eval()
    path = tmp_path_factory.mktemp("msn") / "vit_ep300.pth.tar"
    save_msn_checkpoint(path, ref)
    ref.fc = None
    return path, ref


def official_rows(ref, pil_images):
    with torch.no_grad():
        f = ref.forward_blocks(torch.stack([OFFICIAL(im) for im in pil_images]), 1)
    f = f - f.mean(1, keepdim=True)  # cyanure preprocess(centering=True, normalize=True, columns=False)
    return (f / f.norm(dim=1, keepdim=True)).numpy()


def test_image_files_give_the_official_rows(msn, tmp_path):
    path, ref = msn
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(375, 500), (333, 500), (256, 256), (300, 257), (200, 150)]):
        (tmp_path / "imgs" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "c" / f"{i}.png")
    index = scan_imagefolder(tmp_path / "imgs", progress=False)
    space = BackboneSpace("msn", str(path), image_size=0, batch_size=2, precision="fp32")
    assert (space.resize, space.input_size, space.dim) == (256, (224, 224), 192)
    src, transformed = space.source_for(FolderSource(index, 256))
    src.backend = "pil"  # PIL decodes exactly as torchvision does; DALI is within a grey level (test_data_imagefolder)
    ours = cached_features(lambda x: space.embed_tensor(x, transformed=transformed), src, tmp_path / "f.npy",
                           key={}, dim=192, batch_size=2, progress=False)
    want = official_rows(ref, [Image.open(p).convert("RGB") for p in index.paths()])
    np.testing.assert_allclose(ours, want, rtol=0, atol=2e-6)


def test_generated_256px_images_are_only_cropped_as_the_official_transform_does(msn):
    path, ref = msn
    gen = np.random.default_rng(1).integers(0, 256, (3, 3, 256, 256), dtype=np.uint8)
    space = BackboneSpace("msn", str(path), precision="fp32")
    assert torch.equal(space.transform(torch.from_numpy(gen)), torch.from_numpy(gen[:, :, 16:240, 16:240]))
    want = official_rows(ref, [Image.fromarray(g.transpose(1, 2, 0)) for g in gen])
    np.testing.assert_allclose(space.embed(gen), want, rtol=0, atol=2e-6)


def test_tensor_transform_of_other_sizes_is_within_a_grey_level_of_torchvisions_pil_path(msn):
    path, _ = msn
    space = BackboneSpace("msn", str(path))
    x = np.random.default_rng(2).integers(0, 256, (2, 3, 300, 280), dtype=np.uint8)
    ours = space.transform(torch.from_numpy(x)).numpy().astype(int)
    pil = np.stack([np.asarray(T.CenterCrop(224)(T.Resize(256)(Image.fromarray(im.transpose(1, 2, 0)))))
                    for im in x]).transpose(0, 3, 1, 2).astype(int)
    assert np.abs(ours - pil).max() <= 1


def test_bf16_autocast_rows_stay_close_to_fp32(msn):
    path, _ = msn
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (4, 3, 256, 256), dtype=np.uint8))
    fp32 = BackboneSpace("msn", str(path), precision="fp32").embed_tensor(x)
    bf16 = BackboneSpace("msn", str(path), precision="bf16").embed_tensor(x)
    assert (fp32 * bf16).sum(1).min() > 0.99  # cosine similarity of the unit rows


def test_space_json_round_trip_keeps_the_transform(msn, tmp_path):
    from dpt_fast.models.classifier import load_space

    path, _ = msn
    space = BackboneSpace("msn", str(path), crop=0.5, image_size=112, precision="fp32")
    space.save(tmp_path)
    again = load_space(tmp_path)
    assert again.identity() == space.identity() and again.resize == 224
    x = np.random.default_rng(4).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    assert np.array_equal(again.embed(x), space.embed(x))
    assert ArraySource(x).identity  # an in-memory source is embedded as it is (transformed on tensors)
    assert space.source_for(ArraySource(x))[1] is False


def test_stage1_features_msn_fits_the_papers_classifier(msn, tmp_path):
    from dpt_fast.config import load_config
    from dpt_fast.models.classifier import LinearHead
    from dpt_fast.stages import stage1
    from dpt_fast.stages.rundir import RunDir

    path, _ = msn
    cfg = load_config("digits", ["stage1.method=features", "stage1.backbone=msn", f"stage1.backbone_weights={path}",
                                 "stage1.backbone_image_size=32"])  # 2x2 patches: positions interpolated as MSN
    rd = RunDir(tmp_path / "run")
    m = stage1.run(cfg, rd, progress=False)
    assert (m["method"], m["classifier"], m["logreg_c"]) == ("features", "paper_logreg", 400.0)
    assert m["logreg_lambda"] == pytest.approx(0.0025 / m["labelled"]) and m["logreg_duality_gap"] <= 1e-6
    head = LinearHead.load(rd.stage(1) / "head.safetensors")
    assert head.coef.shape == (10, 192) and not head.intercept.any()
    assert 0.0 <= m["test_top1"] <= 1.0
