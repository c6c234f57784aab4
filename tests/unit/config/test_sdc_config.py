import pytest

from longcat.config.compose import compose_run_config
from longcat.config.validate import validate as validate_run_config


@pytest.mark.parametrize("overrides,needle", [
    (["sdc.replay_interval=5"], "determinism.enabled=true"),
    (["sdc.policy=rollback", "train.checkpoint_interval=0"], "checkpoint_interval"),
    (["sdc.inject.step=3"], "sdc.inject.tensor"),
    (["sdc.replica_interval=-1"], "replica_interval"),
    # a fault that would never be injected: no replay, or not on a replayed step
    (["sdc.inject.step=3", "sdc.inject.tensor=lm_head.weight"], "sdc.replay_interval=0 replays none"),
    (["determinism.enabled=true", "sdc.replay_interval=2", "sdc.inject.step=3", "sdc.inject.tensor=lm_head.weight"],
     "replays steps 2, 4, .*nothing would be injected"),
    (["determinism.enabled=true", "sdc.replay_interval=1", "sdc.inject.step=2", "sdc.inject.target=activation",
      "sdc.inject.tensor=model.layers.0.mlp.router"], "RouterOutput.*model.layers.0.mlp.router.classifier"),
])
def test_sdc_settings_fail_before_work(overrides, needle):
    cfg, _ = compose_run_config("pretrain", overrides)
    with pytest.raises(ValueError, match=needle):
        validate_run_config(cfg, world_size=1)


def test_a_parameter_fault_needs_no_replay():
    """A parameter fault is injected after the optimizer step and found by the cross-replica check."""
    cfg, _ = compose_run_config("pretrain", ["sdc.inject.step=3", "sdc.inject.target=parameter",
                                             "sdc.inject.tensor=lm_head.weight", "sdc.replica_interval=1"])
    validate_run_config(cfg, world_size=1)


def test_checks_compose_with_determinism():
    cfg, _ = compose_run_config("pretrain", ["sdc.replay_interval=20", "sdc.replica_interval=10", "sdc.policy=halt",
                                             "determinism.enabled=true"])
    validate_run_config(cfg, world_size=1)


@pytest.mark.parametrize("world_size,overrides", [
    (2, ["parallel=pp2"]), (2, ["parallel.dp=2", "parallel.dp_mode=deepspeed"]),
    (4, ["parallel=pp2_fsdp2", "data.global_batch_size=32"]),
])
def test_replay_composes_with_pipeline_and_deepspeed(world_size, overrides):
    """Replay runs per stage under PP (FSDP2 stage roots included) and beside DeepSpeed's engine
    (train/sdc_check.py)."""
    cfg, _ = compose_run_config("pretrain", ["sdc.replay_interval=5", "determinism.enabled=true", *overrides])
    validate_run_config(cfg, world_size=world_size)
