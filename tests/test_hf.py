"""Hugging Face interoperability: numerical parity with transformers' Data2VecAudioModel and exact round trips."""

import json

import pytest
import torch
from transformers import Data2VecAudioModel

from model import Data2VecAudio, load_hf, preset, save_hf
from model.hf import config_from_hf, from_hf_state_dict, hf_config, to_hf_state_dict


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.fixture(scope="module")
def base_pair(tmp_path_factory):
    """A random-init `base` encoder and the Hugging Face model loaded from its exported folder."""
    torch.manual_seed(0)
    ours = Data2VecAudio(preset("base")).eval()
    folder = save_hf(ours, tmp_path_factory.mktemp("export"))
    reference = Data2VecAudioModel.from_pretrained(folder).eval()
    return ours, reference, folder


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_all_13_hidden_states_match_transformers_in_fp32(base_pair, masked):
    ours, reference, _ = base_pair
    generator = torch.Generator().manual_seed(1)
    audio = torch.randn(1, 5 * 16_000, generator=generator)  # 5 s -> 249 frames
    mask = None
    if masked:
        mask = torch.zeros(1, 249, dtype=torch.bool)
        mask[0, 10:60] = mask[0, 120:135] = True
    with torch.no_grad():
        mine = ours(audio, mask).hidden_states
        theirs = reference(audio, mask_time_indices=mask, output_hidden_states=True).hidden_states
    assert len(mine) == len(theirs) == 13
    for layer, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert relative_error(a, b) < 1e-5, f"hidden state {layer}"


def test_parity_is_not_vacuous(base_pair):
    """A small change in one layer's weights must show up in the comparison above."""
    ours, reference, _ = base_pair
    changed = Data2VecAudio(ours.cfg).eval()
    changed.load_state_dict(ours.state_dict())
    with torch.no_grad():
        fc1 = changed.transformer.layers[5].fc1.weight
        fc1.add_(torch.randn_like(fc1) * 1e-3)
        audio = torch.randn(1, 16_000)
        mine = changed(audio).hidden_states
        theirs = reference(audio, output_hidden_states=True).hidden_states
    assert relative_error(mine[5], theirs[5]) < 1e-5
    assert relative_error(mine[6], theirs[6]) > 1e-4


def test_transformers_loads_every_weight_of_the_export(base_pair):
    ours, reference, _ = base_pair
    converted = to_hf_state_dict(ours.state_dict())
    theirs = reference.state_dict()
    assert converted.keys() == theirs.keys()
    for name, tensor in converted.items():
        assert torch.equal(tensor, theirs[name]), name


def test_ours_to_hf_to_ours_is_exact(base_pair):
    ours, reference, folder = base_pair
    back = from_hf_state_dict(to_hf_state_dict(ours.state_dict()))
    from_transformers = from_hf_state_dict(reference.state_dict())
    reloaded = load_hf(folder)
    assert reloaded.cfg == ours.cfg
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back[name], tensor), name
        assert torch.equal(from_transformers[name], tensor), name
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_config_round_trip_keeps_every_field(name):
    cfg = preset(name, average_top_k_layers=2, loss_beta=0.25, ema_anneal_end_step=1000)
    assert config_from_hf(json.loads(json.dumps(hf_config(cfg)))) == cfg


def test_a_pickled_hf_checkpoint_loads_without_running_code(tmp_path):
    """m-a-p/music2vec-v1 ships pytorch_model.bin; it is read with weights_only=True."""
    torch.manual_seed(2)
    ours = Data2VecAudio(preset("tiny"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(ours.cfg)))
    torch.save(to_hf_state_dict(ours.state_dict()), tmp_path / "pytorch_model.bin")
    reloaded = load_hf(tmp_path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_a_foreign_config_without_pretraining_fields_gets_defaults_that_fit():
    hf = hf_config(preset("tiny"))
    del hf["music2vec"]
    assert config_from_hf(hf).average_top_k_layers == preset("tiny").layers


def test_bad_folders_are_refused_naming_the_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf(tmp_path)
    hf = hf_config(preset("tiny")) | {"conv_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"config\.json: conv_bias=True"):
        load_hf(tmp_path)
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="'hidden_size'"):
        config_from_hf(hf | {"conv_bias": False}, source="x/config.json")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(preset("tiny"))))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_hf(tmp_path)


def test_unknown_weights_are_refused():
    state = to_hf_state_dict(Data2VecAudio(preset("tiny")).state_dict())
    state["encoder.adapter.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"encoder\.adapter\.weight"):
        from_hf_state_dict(state)
