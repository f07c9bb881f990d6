"""Experiment configs, the DeepSpeed config they fill in, and the LR schedule."""

import json
from pathlib import Path

import pytest

from cluster.config import load_job_config
from trainer.config import ExperimentConfig, load_config, save_config
from trainer.ds_config import deepspeed_config
from trainer.schedule import tri_stage_lr

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["music2vec_base", "music2vec_30s", "tiny"])
def test_shipped_configs_load_and_fill_a_deepspeed_config(name):
    cfg, cluster = load_job_config(CONFIGS / f"{name}.yaml")  # experiment + the cluster: section (defaults if none)
    assert cluster.world_size == 8
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == cfg.data.batch_size * cfg.train.grad_accum * 8
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage
    assert "auto" not in json.dumps(ds)


def test_the_paper_settings():
    (best, _), (start, _) = (load_job_config(CONFIGS / f"{name}.yaml") for name in ("music2vec_base", "music2vec_30s"))
    for cfg in (best, start):
        assert cfg.model.average_top_k_layers == 8
        assert (cfg.data.mask_prob, cfg.data.mask_length) == (0.65, 10)
        assert cfg.optim.max_updates == 400_000
        assert cfg.optim.lr == 5e-4
        assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == ((0.9, 0.98), 1e-6, 0.01)
        minutes_per_update_on_8_gpus = cfg.data.batch_size * cfg.data.crop_seconds * 8 / 60
        assert 60 <= minutes_per_update_on_8_gpus <= 66  # data2vec-audio base: about 63 min
    assert (best.data.crop_seconds, start.data.crop_seconds) == (5.0, 30.0)


def test_overrides_apply_after_the_yaml_and_presets_set_the_model():
    cfg = load_config(CONFIGS / "tiny.yaml", ["optim.lr=0.002", "model.average_top_k_layers=3", "data.batch_size=2"])
    assert (cfg.optim.lr, cfg.model.average_top_k_layers, cfg.data.batch_size) == (0.002, 3, 2)
    assert cfg.model.dim == 64  # from the tiny preset
    assert load_config(CONFIGS / "tiny.yaml", ["model.preset=base"]).model.dim == 768


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"Key 'lrr' not in 'OptimConfig'.*optim\.lrr"),
        ("data.batch_size=four", r"could not be converted to Integer.*data\.batch_size"),
        ("train.precision=fp8", r"'fp8'.*train\.precision"),
        ("model.preset=huge", r"model\.preset='huge'"),
        ("optim.lr=-1", r"optim\.lr=-1\.0 must be positive"),
        ("train.zero_stage=4", r"train\.zero_stage=4"),
        ("model.heads=5", r"heads=5"),
    ],
)
def test_bad_keys_and_values_are_refused_naming_them(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_and_has_a_stable_digest(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["optim.lr=0.002"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert cfg.digest() != load_config(CONFIGS / "tiny.yaml").digest()
    assert ExperimentConfig().digest() == ExperimentConfig().digest()


def test_a_template_contradicting_the_experiment_is_refused(tmp_path):
    template = json.loads((CONFIGS.parent / "ds_configs" / "zero2.json").read_text())
    template["train_micro_batch_size_per_gpu"] = 32
    (tmp_path / "mine.json").write_text(json.dumps(template))
    cfg = load_config(CONFIGS / "tiny.yaml", [f"train.ds_config={tmp_path / 'mine.json'}"])
    with pytest.raises(ValueError, match=r"mine\.json: train_micro_batch_size_per_gpu=32 contradicts"):
        deepspeed_config(cfg, world_size=1)
    template["train_micro_batch_size_per_gpu"] = cfg.data.batch_size  # agreeing is fine
    template["optimizer"] = {"type": "Adam"}
    (tmp_path / "mine.json").write_text(json.dumps(template))
    with pytest.raises(ValueError, match="remove 'optimizer'"):
        deepspeed_config(cfg, world_size=1)


def test_offload_picks_the_offload_template():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.zero_stage=3", "train.offload=true"])
    assert deepspeed_config(cfg, 1)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ValueError, match="offload needs"):
        load_config(CONFIGS / "tiny.yaml", ["train.zero_stage=1", "train.offload=true"])


def base_lr(step: int) -> float:
    return tri_stage_lr(
        step, peak=5e-4, max_updates=400_000, phase_ratio=(0.03, 0.9, 0.07), init_scale=0.01, final_scale=0.01
    )


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 5e-6),  # warm-up starts at 1 % of the peak
        (6_000, 5e-6 + (5e-4 - 5e-6) / 2),
        (12_000, 5e-4),  # 3 % of 400k: the peak, held ...
        (371_999, 5e-4),  # ... for 90 %
        (372_000 + 14_000, 5e-4 * 0.01**0.5),  # exponential decay, halfway in log space
        (400_000, 5e-6),  # 1 % of the peak at the end ...
        (10**6, 5e-6),  # ... and after
    ],
)
def test_tri_stage_schedule_of_data2vec_audio_base(step, expected):
    assert base_lr(step) == pytest.approx(expected, rel=1e-9)
