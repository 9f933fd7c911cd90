from puma_ray.config import ScalingConfig, TrainConfig
from puma_ray.runtime import deepspeed_config


def test_deepspeed_config_cpu_and_gpu():
    cpu = deepspeed_config(ScalingConfig(zero_stage=2), TrainConfig(batch_size=16, grad_clip=0.5), "bfloat16")
    assert cpu["zero_optimization"] == {"stage": 2} and cpu["train_micro_batch_size_per_gpu"] == 16
    assert cpu["bf16"] == {"enabled": False} and cpu["fp16"] == {"enabled": False}  # no bf16 on CPU
    assert cpu["zero_allow_untested_optimizer"] and cpu["gradient_clipping"] == 0.5
    gpu = deepspeed_config(ScalingConfig(use_gpu=True, zero_stage=3), TrainConfig(), "bfloat16")
    assert gpu["bf16"] == {"enabled": True} and gpu["zero_optimization"] == {"stage": 3}
    assert deepspeed_config(ScalingConfig(use_gpu=True), TrainConfig(), "float32")["bf16"] == {"enabled": False}
