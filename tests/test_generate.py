"""generate / load_generated: deterministic per item, resumable, atomic shards, manifest checks."""
import json

import numpy as np
import pytest
import torch

from dpt_fast.diffusion.schedule import NoiseScheduleVP
from dpt_fast.sampling import generate, load_generated
from dpt_fast.sampling.generate import item_noise
from dpt_fast.utils import UserError

NULL = 10


class ToyUViT(torch.nn.Module):
    """A U-ViT-shaped eps model (x, timesteps, y) whose rows do not interact, so results are bitwise
    independent of the batch composition."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 1)
        torch.nn.init.normal_(self.emb.weight, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def forward(self, x, timesteps, y):
        self.calls += 1
        shift = self.emb(y).view(-1, 1, 1, 1)
        return torch.tanh(x - shift) * (0.5 + timesteps.view(-1, 1, 1, 1) / 2000.0)


def _gen(out_dir, model=None, **over):
    kw = dict(classes=[0, 1, 2], k_per_class=5, shape=(1, 4, 4), null_class=NULL, cfg_scale=0.4, steps=6, order=2,
              method="multistep", algorithm="dpmsolver++", skip_type="time_uniform", batch_size=4, shard_size=4,
              seed=7, device="cpu", progress=False)
    kw.update(over)
    return generate(model or ToyUViT(), NoiseScheduleVP("linear"), out_dir=out_dir, **kw)


def test_generated_images_depend_only_on_seed_class_and_index(tmp_path):
    s1 = _gen(tmp_path / "a", batch_size=4, shard_size=4)
    s2 = _gen(tmp_path / "b", batch_size=7, shard_size=6)
    ia, la = load_generated(tmp_path / "a")
    ib, lb = load_generated(tmp_path / "b")
    assert ia.shape == (15, 1, 4, 4) and ia.dtype == np.uint8 and la.dtype == np.int64
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ia, ib)
    assert sorted(np.bincount(la).tolist()) == [5, 5, 5]
    assert s1["generated"] == 15 and s1["shards"] == 4 and s2["shards"] == 3 and s1["nfe"] == 6
    assert s1["images_per_second"] > 0
    assert ia.std() > 0 and len({ia[i].tobytes() for i in range(15)}) == 15  # not degenerate
    # Another seed gives other images.
    _gen(tmp_path / "c", seed=8)
    assert not np.array_equal(load_generated(tmp_path / "c")[0], ia)


def test_item_noise_is_per_item():
    a = item_noise(0, [3, 4], [0, 1], (2, 2))
    b = item_noise(0, [4], [1], (2, 2))
    torch.testing.assert_close(a[1:], b)
    assert not torch.equal(item_noise(0, [3], [1], (2, 2)), item_noise(0, [4], [1], (2, 2)))


class _Crash(ToyUViT):
    def __init__(self, after):
        super().__init__()
        self.after = after

    def forward(self, x, timesteps, y):
        if self.calls >= self.after:
            raise KeyboardInterrupt("killed")
        return super().forward(x, timesteps, y)


def test_an_interrupted_run_resumes_to_the_same_images_and_leaves_no_torn_shards(tmp_path):
    _gen(tmp_path / "one_go")
    with pytest.raises(KeyboardInterrupt):
        _gen(tmp_path / "resumed", model=_Crash(after=6 * 2 + 3))  # dies inside the third shard (2 batches done)
    files = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert files == ["manifest.json", "shard-00000.npz", "shard-00001.npz"]  # no temp file, no partial shard
    with pytest.raises(UserError, match="incomplete"):
        load_generated(tmp_path / "resumed")
    model = ToyUViT()
    summary = _gen(tmp_path / "resumed", model=model)
    assert summary["skipped_shards"] == 2 and summary["generated"] == 7
    assert model.calls == 2 * 6  # only the two missing shards' batches (4 + 3 images) were sampled
    for a, b in zip(load_generated(tmp_path / "one_go"), load_generated(tmp_path / "resumed")):
        np.testing.assert_array_equal(a, b)


def test_a_rerun_with_everything_done_samples_nothing(tmp_path):
    _gen(tmp_path)
    model = ToyUViT()
    summary = _gen(tmp_path, model=model)
    assert model.calls == 0 and summary["generated"] == 0 and summary["skipped_shards"] == 4
    assert summary["images_per_second"] > 0  # the last run's rate


def test_changed_settings_regenerate_or_fail_clearly_never_mix(tmp_path):
    _gen(tmp_path)
    before, _ = load_generated(tmp_path)
    with pytest.raises(UserError, match="cfg_scale"):
        _gen(tmp_path, cfg_scale=1.0, on_mismatch="error")
    model = ToyUViT()
    _gen(tmp_path, model=model, cfg_scale=1.0)
    assert model.calls == 4 * 6  # every shard again
    after, _ = load_generated(tmp_path)
    assert not np.array_equal(before, after)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["identity"]["cfg_scale"] == 1.0 and manifest["complete"] is True
    # A corrupted shard is detected and remade.
    (tmp_path / "shard-00001.npz").write_bytes(b"not an npz")
    model = ToyUViT()
    _gen(tmp_path, model=model, cfg_scale=1.0)
    assert model.calls == 6
    np.testing.assert_array_equal(load_generated(tmp_path)[0], after)


def test_raising_k_keeps_the_finished_shards(tmp_path):
    _gen(tmp_path, k_per_class=4)  # 12 images = 3 full shards
    model = ToyUViT()
    summary = _gen(tmp_path, model=model, k_per_class=8)
    assert summary["skipped_shards"] == 3 and summary["generated"] == 12
    images, labels = load_generated(tmp_path)
    _gen(tmp_path / "fresh", k_per_class=8)
    np.testing.assert_array_equal(images, load_generated(tmp_path / "fresh")[0])
    # Lowering K drops the extra shards.
    _gen(tmp_path, k_per_class=2)
    assert len(load_generated(tmp_path)[1]) == 6 and not (tmp_path / "shard-00003.npz").exists()


def test_guidance_uses_one_forward_of_2b_rows_and_no_guidance_uses_b(tmp_path):
    rows = []

    class Spy(ToyUViT):
        def forward(self, x, timesteps, y):
            rows.append((x.shape[0], int((y == NULL).sum())))
            return super().forward(x, timesteps, y)

    _gen(tmp_path / "cfg", model=Spy(), k_per_class=2, batch_size=6, shard_size=6)
    assert rows[0] == (12, 6)  # [x; x] with [y; null]
    rows.clear()
    _gen(tmp_path / "nocfg", model=Spy(), k_per_class=2, batch_size=6, shard_size=6, cfg_scale=0.0)
    assert rows[0] == (6, 0)


@pytest.mark.parametrize("kind,first_time_input", [("linear", 999.0), ("discrete", 1000.0)])
def test_the_network_gets_uvits_time_input(tmp_path, kind, first_time_input):
    """999 t (sde.py) / N t (train_ldm_discrete.py), not the DPM-Solver reference's t / (t - 1/N) 1000."""
    from dpt_fast.diffusion.schedule import scaled_linear_betas

    times = []

    class Spy(ToyUViT):
        def forward(self, x, timesteps, y):
            times.append(timesteps.max().item())
            return super().forward(x, timesteps, y)

    ns = NoiseScheduleVP("linear") if kind == "linear" else NoiseScheduleVP("discrete", betas=scaled_linear_betas())
    generate(Spy(), ns, [0], 1, (1, 4, 4), tmp_path, null_class=NULL, cfg_scale=0.4, steps=3, order=1,
             method="multistep", algorithm="dpmsolver++", skip_type="time_uniform", batch_size=1, shard_size=1, seed=0,
             device="cpu", progress=False)
    assert times[0] == pytest.approx(first_time_input)  # sampling starts at t = 1


def test_explicit_labels_give_per_class_indices_resume_and_extend(tmp_path):
    labels = [2, 0, 2, 2, 1, 0, 2, 1, 1, 0, 2]
    summary = _gen(tmp_path / "a", labels=labels, classes=[], k_per_class=0)
    images, got = load_generated(tmp_path / "a")
    np.testing.assert_array_equal(got, labels)
    assert summary["images"] == 11 and summary["shards"] == 3
    index = np.concatenate([np.load(tmp_path / "a" / f"shard-0000{s}.npz")["index"] for s in range(3)])
    np.testing.assert_array_equal(index, [0, 0, 1, 2, 0, 1, 3, 1, 2, 2, 4])  # k-th image of its class
    # Item (class c, index i) is the same image as in a classes x K run: the noise depends on (seed, c, i) only.
    _gen(tmp_path / "k")  # classes [0, 1, 2], K = 5: item j is image j // 3 of class j % 3
    k_images, _ = load_generated(tmp_path / "k")
    for c, i, img in zip(labels, index, images):
        np.testing.assert_array_equal(img, k_images[int(i) * 3 + c])
    # A longer label list with the same prefix keeps the full shards; a rerun samples nothing.
    model = ToyUViT()
    more = _gen(tmp_path / "a", model=model, labels=labels + [0, 1, 2, 0, 1], classes=[], k_per_class=0)
    assert more["skipped_shards"] == 2 and more["generated"] == 8
    assert _gen(tmp_path / "a", model=ToyUViT(), labels=labels + [0, 1, 2, 0, 1], classes=[], k_per_class=0)["generated"] == 0
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["k_per_class"] is None


def test_load_generated_without_a_generation_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="stage 2"):
        load_generated(tmp_path / "nothing")


def test_decode_hook_maps_latents_to_images(tmp_path):
    def decode(z):  # a stand-in "VAE": 1x4x4 latent -> 3x8x8 image
        return torch.nn.functional.interpolate(z, scale_factor=2).repeat(1, 3, 1, 1).clamp(-1, 1)

    _gen(tmp_path, decode=decode)
    images, _ = load_generated(tmp_path)
    assert images.shape == (15, 3, 8, 8)


def _rank_main(rank, world, port, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        summary = _gen(out_dir)
        with open(f"{out_dir}-rank{rank}.json", "w") as f:
            json.dump(summary, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_distributed_ranks_split_the_shards_and_match_a_single_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    done = [json.loads((tmp_path / f"ddp-rank{r}.json").read_text())["generated"] for r in range(2)]
    assert done == [8, 7]  # rank 0: shards 0 and 2 (4 + 4 images), rank 1: shards 1 and 3 (4 + 3)
    _gen(tmp_path / "single")
    for a, b in zip(load_generated(tmp_path / "ddp"), load_generated(tmp_path / "single")):
        np.testing.assert_array_equal(a, b)


def test_bad_sampler_settings_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="steps >= order"):
        _gen(tmp_path, steps=2, order=3)
    with pytest.raises(UserError, match="method"):
        _gen(tmp_path, method="adaptive")
