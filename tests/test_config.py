"""Config parsing: official keys, unknown keys ignored, clear errors for bad values."""
import json

import pytest

from ixc25_ms.config import ConfigError, IXCConfig, VisionConfig
from parity_tests.helpers import GOLDEN

SEVEN_B = {  # spec §9 values
    "vocab_size": 92544, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 24576,
    "attn_implementation": "flash_attention_2", "auto_map": {"AutoModel": "x"}, "torch_dtype": "bfloat16",
}


def test_seven_b_config_and_defaults():
    c = IXCConfig.from_dict(SEVEN_B)
    assert (c.head_dim, c.num_kv_groups, c.qkv_out) == (128, 4, 6144)
    assert c.vision == VisionConfig() and c.vision.hidden_size == 1024 and c.vision.num_hidden_layers == 24
    assert c.vit_merged_dim == 4096 and c.lora_scaling == 1.0


def test_golden_config_reads_vision_config():
    c = IXCConfig.from_file(GOLDEN)
    assert c.hidden_size == 64 and c.vision.hidden_size == 64 and c.vision.num_hidden_layers == 2
    assert c.vit_merged_dim == 256 and c.num_key_value_heads == 2


@pytest.mark.parametrize("change,match", [
    ({"num_attention_heads": 5}, "divisible"),
    ({"num_key_value_heads": 3}, "divisible"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "unknown rope_scaling type 'yarn'"),
    ({"rope_scaling": {"factor": 2.0}}, "rope_scaling"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    # (a 336-px CLIP was refused here while only 560/14 was accepted; its 24x24 grid is valid now)
    ({"vision_config": {"image_size": 350}}, r"vision_config: 'image_size' 350 / 'patch_size' 14 .*odd"),
    ({"vision_config": {"image_size": 450}}, r"vision_config: 'image_size' 450 is not divisible by 'patch_size' 14"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, r"vision_config: unknown 'model_type' 'siglip"),
    ({"vision_config": {"model_type": "timm_vit", "hidden_act": "quick_gelu"}}, "vision_config: 'hidden_act'"),
    ({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}, "vision_config.*divisible"),
])
def test_bad_values(change, match):
    with pytest.raises(ConfigError, match=match):
        IXCConfig.from_dict(dict(SEVEN_B, **change))


def test_missing_keys_and_bad_files(tmp_path):
    d = dict(SEVEN_B)
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        IXCConfig.from_dict(d)
    with pytest.raises(ConfigError, match="no such config"):
        IXCConfig.from_file(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        IXCConfig.from_file(str(tmp_path))


def test_kv_heads_default_to_heads():
    d = dict(SEVEN_B)
    del d["num_key_value_heads"]
    assert IXCConfig.from_dict(d).num_key_value_heads == 32


def test_round_trip_to_dict():
    c = IXCConfig.from_dict(SEVEN_B)
    again = IXCConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.vision == c.vision


def test_tower_checks_are_one_line_and_name_the_field():
    for vc, field in (({"image_size": 450}, "'image_size'"), ({"image_size": 350}, "'image_size'"),
                      ({"model_type": 3}, "'model_type'")):
        with pytest.raises(ConfigError) as e:
            IXCConfig.from_dict(dict(SEVEN_B, vision_config=vc))
        assert "\n" not in str(e.value) and field in str(e.value) and "vision_config" in str(e.value)


def test_other_geometries_are_valid():
    c = IXCConfig.from_dict(dict(SEVEN_B, vision_config={"image_size": 448, "patch_size": 16}))
    assert (c.vision.model_type, c.vision.grid, c.vision.num_positions) == ("clip_vision_model", 28, 785)
    assert IXCConfig.from_dict(dict(SEVEN_B, vision_config={"image_size": 336})).vision.grid == 24
    # a config without vision_config (or without its model_type) gets the CLIP tower
    assert IXCConfig.from_dict(SEVEN_B).vision.model_type == "clip_vision_model"


def test_timm_vit_defaults_and_round_trip():
    c = IXCConfig.from_dict(dict(SEVEN_B, vision_config={"model_type": "timm_vit", "num_hidden_layers": 2,
                                                         "unknown_key": 1}))
    v = c.vision
    assert (v.image_size, v.patch_size, v.grid, v.hidden_size, v.num_hidden_layers) == (448, 16, 28, 768, 2)
    assert (v.layer_norm_eps, v.hidden_act, c.vit_merged_dim) == (1e-6, "gelu", 3072)
    again = IXCConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again.vision == v
