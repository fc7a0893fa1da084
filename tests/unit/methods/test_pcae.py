"""PCAE: the teacher's input, token counts, EMA, loss, config validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from launcher.methods.pcae import PCAE, PCAEConfig, ema_momentum
from launcher.methods.token_reduction import TokenReducer, default_drop_positions, reduced_token_counts


def tiny_model(**overrides: object) -> tuple[PCAE, PCAEConfig]:
    torch.manual_seed(0)
    cfg = dataclasses.replace(PCAEConfig.tiny(), **overrides)
    return PCAE(cfg), cfg


def make_batch(cfg: PCAEConfig, seeds: list[int]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(len(seeds), cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)
    return {"image": images, "seed": torch.tensor(seeds)}


def seeded_split(seed: int, num_patches: int, mask_ratio: float) -> tuple[list[int], list[int]]:
    """Visible and masked patch ids, worked out from the seed without the library's masking code."""
    noise = torch.rand(num_patches, generator=torch.Generator().manual_seed(seed)).tolist()
    order = sorted(range(num_patches), key=lambda i: noise[i])
    num_keep = int(num_patches * (1 - mask_ratio))
    return order[:num_keep], order[num_keep:]


def brute_force_least_similar(tokens: torch.Tensor, k: int) -> list[int]:
    """Indices of the k tokens with the lowest cosine to the mean of the unit-normalised tokens."""
    units = [t / t.norm() for t in tokens]
    mean = sum(units) / len(units)
    scores = [float(torch.dot(u, mean) / mean.norm()) for u in units]
    return sorted(range(len(units)), key=lambda i: scores[i])[:k]


def capture_inputs(module: torch.nn.Module, store: list[torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_pre_hook(lambda mod, args: store.append(args[0].detach().clone()))


def test_teacher_sees_only_the_masked_patches() -> None:
    model, cfg = tiny_model()
    seeds = [5, 9, 123]
    batch = make_batch(cfg, seeds)
    teacher_in, student_in = [], []
    capture_inputs(model.teacher.blocks[0], teacher_in)
    capture_inputs(model.student.blocks[0], student_in)
    with torch.no_grad():
        model(batch)

    images = batch["image"]
    teacher_tokens = model.teacher.patch_embed(images) + model.teacher.pos_embed[1:]
    student_tokens = model.student.patch_embed(images) + model.student.pos_embed[1:]
    for b, seed in enumerate(seeds):
        visible, masked = seeded_split(seed, cfg.num_patches, cfg.mask_ratio)
        assert set(visible).isdisjoint(masked) and len(visible) + len(masked) == cfg.num_patches
        # The teacher gets exactly the masked patches, with their positions and no cls token.
        torch.testing.assert_close(teacher_in[0][b], teacher_tokens[b, masked])
        # The student gets cls + exactly the visible ones.
        torch.testing.assert_close(student_in[0][b, 0], model.student.cls_token[0, 0].detach())
        torch.testing.assert_close(student_in[0][b, 1:], student_tokens[b, visible])


def test_teacher_targets_ids_stay_within_the_masked_patches() -> None:
    model, cfg = tiny_model()
    batch = make_batch(cfg, [1, 2])
    masking = model.mask(batch)
    targets = model.teacher_targets(batch["image"], masking.ids_masked)
    for b in range(2):
        visible = set(masking.ids_keep[b].tolist())
        previous = set(masking.ids_masked[b].tolist())
        for ids in targets.ids_per_stage:
            stage = ids[b].tolist()
            assert len(set(stage)) == len(stage)
            assert set(stage) <= previous and visible.isdisjoint(stage)
            previous = set(stage)


def test_token_counts_per_stage_micro() -> None:
    model, cfg = tiny_model()
    assert model.drop_positions == (0, 1, 2)
    assert cfg.target_token_counts == (12, 6, 3, 1)
    block_inputs: list = []
    for block in model.teacher.blocks:
        capture_inputs(block, block_inputs)
    batch = make_batch(cfg, [0, 1])
    with torch.no_grad():
        out = model(batch)
    assert [x.shape[1] for x in block_inputs] == [12, 6, 3]
    targets = model.teacher_targets(batch["image"], model.mask(batch).ids_masked)
    assert [ids.shape[1] for ids in targets.ids_per_stage] == [12, 6, 3, 1]
    assert targets.features.shape == (2, 1, cfg.vit.embed_dim)
    assert out["num_target_tokens"].item() == 1.0


def test_token_counts_vit_b16() -> None:
    cfg = PCAEConfig()  # ViT-B/16 at 224, mask 0.75
    assert (cfg.num_patches, cfg.num_visible, cfg.num_masked) == (196, 49, 147)
    assert cfg.resolved_drop_positions == (0, 4, 8)
    assert cfg.target_token_counts == (147, 73, 36, 18)
    assert PCAEConfig(size="large").resolved_drop_positions == (0, 8, 16)
    assert default_drop_positions(12, 3) == (0, 4, 8)
    assert reduced_token_counts(147, 0.5, 3) == (147, 73, 36, 18)
    # The reducer's own arithmetic on ViT-B-shaped tokens.
    reducer = TokenReducer(0.5)
    x, ids = torch.randn(1, 147, 768), torch.arange(147)[None]
    counts = [147]
    for _ in range(3):
        x, ids = reducer(x, ids)
        counts.append(x.shape[1])
    assert counts == [147, 73, 36, 18]


@pytest.mark.slow
def test_vit_b16_teacher_token_counts() -> None:
    torch.manual_seed(0)
    model = PCAE(PCAEConfig(decoder_depth=1))
    images = torch.randn(1, 3, 224, 224)
    masking = model.mask({"image": images, "seed": torch.tensor([0])})
    targets = model.teacher_targets(images, masking.ids_masked)
    assert [ids.shape[1] for ids in targets.ids_per_stage] == [147, 73, 36, 18]
    assert targets.features.shape == (1, 18, 768)


def test_teacher_reduction_follows_similarity_after_block_0() -> None:
    model, cfg = tiny_model()
    block0_out: list = []
    model.teacher.blocks[0].register_forward_hook(lambda mod, args, out: block0_out.append(out.detach().clone()))
    batch = make_batch(cfg, [3, 4])
    masking = model.mask(batch)
    targets = model.teacher_targets(batch["image"], masking.ids_masked)
    for b in range(2):
        want = brute_force_least_similar(block0_out[0][b], cfg.target_token_counts[1])
        assert targets.ids_per_stage[1][b].tolist() == masking.ids_masked[b, want].tolist()


def test_random_mode_is_driven_by_the_batch_seeds() -> None:
    model, cfg = tiny_model(drop_mode="random")
    batch = make_batch(cfg, [8, 9, 10])

    def target_ids() -> torch.Tensor:
        masking, stage_noise = model._draw(batch)
        return model.teacher_targets(batch["image"], masking.ids_masked, stage_noise).ids

    assert torch.equal(target_ids(), target_ids())
    with torch.no_grad():
        assert torch.isfinite(model(batch)["loss"])


def test_no_drop_stages_keeps_every_masked_token() -> None:
    model, cfg = tiny_model(num_drop_stages=0)
    batch = make_batch(cfg, [0, 1])
    with torch.no_grad():
        assert model(batch)["num_target_tokens"].item() == cfg.num_masked


def test_teacher_starts_as_the_student_and_is_frozen() -> None:
    model, _ = tiny_model()
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert student.keys() == teacher.keys()
    for key in student:
        assert torch.equal(student[key], teacher[key]), key
    assert all(not p.requires_grad for p in model.teacher.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable.isdisjoint(id(p) for p in model.teacher.parameters())
    assert {id(p) for p in model.student.parameters()} <= trainable
    assert all(getattr(b.drop_path1, "drop_prob", 0.0) == 0.0 for b in model.teacher.blocks)


def test_teacher_gets_no_gradient() -> None:
    model, cfg = tiny_model()
    model(make_batch(cfg, [0, 1]))["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())


def test_ema_update_matches_hand_computation() -> None:
    model, _ = tiny_model(momentum=0.9, momentum_final=1.0)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.clone() for p in model.teacher.parameters()]
    s0 = [p.clone() for p in model.student.parameters()]
    model.on_step_end(3, 10)
    m = 1.0 - (1.0 - 0.9) * (math.cos(math.pi * 3 / 10) + 1) / 2
    for t, t_old, s_old, s in zip(model.teacher.parameters(), t0, s0, model.student.parameters()):
        torch.testing.assert_close(t, m * t_old + (1 - m) * s_old)
        assert torch.equal(s, s_old)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_ema_momentum_schedule() -> None:
    assert ema_momentum(0, 100, 0.9999, 1.0) == pytest.approx(0.9999)
    assert ema_momentum(100, 100, 0.9999, 1.0) == pytest.approx(1.0)
    assert ema_momentum(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert ema_momentum(50, 100, 0.99, 0.999) == pytest.approx(0.9945)
    assert ema_momentum(150, 100, 0.99, 1.0) == pytest.approx(1.0)
    values = [ema_momentum(s, 20, 0.9, 1.0) for s in range(21)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="total_steps"):
        ema_momentum(1, 0, 0.9, 1.0)


def test_loss_is_one_minus_cosine_to_standardised_teacher_features() -> None:
    model, cfg = tiny_model(num_drop_stages=1)  # 12 -> 6 targets
    model.eval()
    with torch.no_grad():  # an affine final norm, so the extra standardisation is not a no-op
        model.teacher.norm.weight.normal_()
        model.teacher.norm.bias.normal_()
    captured = {}
    model.decoder.register_forward_hook(lambda mod, args, out: captured.setdefault("pred", out.detach()))
    model.teacher.norm.register_forward_hook(lambda mod, args, out: captured.setdefault("teacher", out.detach()))
    with torch.no_grad():
        loss = model(make_batch(cfg, [2, 3]))["loss"]
    pred, feats = captured["pred"], captured["teacher"]
    assert pred.shape == feats.shape == (2, 6, cfg.vit.embed_dim)
    total = 0.0
    for b in range(2):
        for j in range(6):
            f = feats[b, j]
            target = (f - f.mean()) / torch.sqrt(((f - f.mean()) ** 2).mean() + 1e-6)
            total += float(torch.dot(pred[b, j], target) / (pred[b, j].norm() * target.norm()))
    assert loss.item() == pytest.approx(1 - total / 12, abs=1e-5)


def test_encoder_wider_than_a_pixel_patch() -> None:
    # As in ViT-L/16 (1024 > 16*16*3): the target width is the teacher's, not p*p*3, which the
    # reference's pixel-sized head assumed.
    torch.manual_seed(0)
    cfg = dataclasses.replace(PCAEConfig.tiny(), img_size=16, patch_size=2)
    model = PCAE(cfg)
    assert model.decoder.pred.out_features == cfg.vit.embed_dim == 32 > cfg.patch_size**2 * 3
    assert cfg.target_token_counts == (48, 24, 12, 6)
    out = model(make_batch(cfg, [0, 1]))
    assert torch.isfinite(out["loss"]) and out["num_target_tokens"].item() == 6
    out["loss"].backward()
    assert all(p.grad is not None for p in model.decoder.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop_positions": (0, 4, 12)}, r"out of range; blocks are numbered 0 to 11"),
        ({"drop_positions": (-1, 4, 8)}, "out of range"),
        ({"drop_positions": (4, 0, 8)}, "increasing order"),
        ({"drop_positions": (0, 4, 4)}, "duplicates"),
        ({"drop_positions": (0, 4)}, "set num_drop_stages to 2"),
        ({"num_drop_stages": 13}, "between 0 and the encoder depth 12"),
        ({"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\]"),
        ({"drop_mode": "merge"}, "known modes: similarity, random"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
        ({"momentum_final": -0.1}, r"momentum_final must be in \[0, 1\]"),
        ({"decoder_drop_path": 1.0}, r"decoder_drop_path must be in \[0, 1\)"),
        ({"keep_ratio": 0.01}, "leaves no target tokens"),
        ({"size": "giant"}, "known presets"),
        ({"img_size": 100}, "not divisible by patch_size"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PCAEConfig(**kwargs)


def test_config_accepts_explicit_drop_positions() -> None:
    cfg = PCAEConfig(drop_positions=[3, 7, 11])  # a YAML list
    assert cfg.drop_positions == (3, 7, 11) and cfg.resolved_drop_positions == (3, 7, 11)
    assert PCAEConfig.tiny().size == "micro"


def test_a_momentum_horizon_means_the_same_share_of_any_run() -> None:
    # The paper's 0.9999 at ImageNet length: 400 epochs of 1,281,167 images at batch 4096.
    paper = PCAEConfig(momentum_horizon=0.08)
    assert paper.start_momentum(400 * math.ceil(1_281_167 / 4096)) == pytest.approx(0.9999, abs=2e-7)
    local = PCAEConfig(momentum_horizon=0.08)
    assert local.start_momentum(186) == pytest.approx(1 - 1 / (0.08 * 186))
    # The same epochs at another batch size: the teacher's memory in samples (and epochs) is the same.
    steps_small, steps_large = 8 * 100, 8 * 25  # batch 32 vs 128 over 3,200 samples, 8 epochs
    memory = lambda m, batch: batch / (1 - m)  # noqa: E731  the samples a teacher averages over
    assert memory(local.start_momentum(steps_small), 32) == pytest.approx(
        memory(local.start_momentum(steps_large), 128)
    )
    assert PCAEConfig().start_momentum(186) == 0.9999  # without a horizon the momentum is as given
    with pytest.raises(ValueError, match="momentum_horizon"):
        PCAEConfig(momentum_horizon=0.0)
