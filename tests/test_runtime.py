import os
import subprocess
import sys

from conftest import free_port

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


def test_deepspeed_on_cpu_builds_no_inference_op(tmp_path):
    """A DeepSpeed engine on CPU, set up as a worker sets it up: DeepSpeed's shared-memory inference op
    is not JIT-compiled (nothing lands in the extensions dir) and the engine still trains."""
    script = """
import os, torch, deepspeed
from puma_ray.config import ScalingConfig, TrainConfig
from puma_ray.runtime import deepspeed_config, skip_inference_comm_op
skip_inference_comm_op()
model = torch.nn.Linear(4, 1)
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
config = deepspeed_config(ScalingConfig(), TrainConfig(), "float32")
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
before = model.weight.detach().clone()
engine.backward(engine(torch.ones(2, 4)).sum())
engine.step()
assert deepspeed.comm.comm.cdb.shm_comm_op is None and not torch.equal(before, model.weight)
print("ok", os.listdir(os.environ["TORCH_EXTENSIONS_DIR"]))
"""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(tmp_path),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[-1] == "ok []"
