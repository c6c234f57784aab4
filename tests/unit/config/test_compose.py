import re

import pytest

from longcat.config.compose import available_recipes, compose_run_config, project_root
from longcat.config.schema import DPMode, PipelineSchedule, RunConfig
from longcat.config.validate import validate as validate_run_config


def _recipe_world_size(recipe: str) -> int:
    """The world size a recipe's header comment states (house style: every recipe opens with it)."""
    header = (project_root() / "recipes" / f"{recipe}.yaml").read_text()
    found = re.search(r"World size: (\d+)", header)
    assert found, f"recipes/{recipe}.yaml does not state its world size in its opening comment"
    return int(found.group(1))


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_composes_and_validates(recipe):
    cfg, as_dict = compose_run_config(recipe)
    assert isinstance(cfg, RunConfig)
    validate_run_config(cfg, world_size=_recipe_world_size(recipe))
    assert as_dict["model"]["hidden_size"] == cfg.model.hidden_size


def test_overrides_apply():
    cfg, _ = compose_run_config("pretrain", ["train.steps=7", "optim.lr=0.5"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.5


def test_modes_compose_to_enum_members_and_back_to_strings():
    cfg, as_dict = compose_run_config("pretrain", ["parallel.dp_mode=fsdp", "parallel.pp_schedule=1f1b"])
    assert cfg.parallel.dp_mode is DPMode.fsdp and cfg.parallel.pp_schedule is PipelineSchedule.one_f_one_b
    assert cfg.parallel.dp_mode == "fsdp" and f"{cfg.parallel.pp_schedule}" == "1f1b"  # str-valued
    assert as_dict["parallel"]["dp_mode"] == "fsdp" and as_dict["parallel"]["pp_schedule"] == "1f1b"


@pytest.mark.parametrize("override,needle", [
    (["train.stepz=3"], r"train\.stepz is not a key of the run config; did you mean train\.steps\?"),
    (["+train.stepz=3"], r"did you mean train\.steps\?"),  # Hydra's append syntax must not smuggle in a key
    (["+stepz=3"], r"stepz is not a key .*train\.steps"),
    (["logging.wandb.mod=x"], r"did you mean logging\.wandb\.mode\?"),  # nested
    (["modle=small"], r"did you mean model\?"),
    (["+model.nope=1"], r"model\.nope is not a key"),
    (["model=smal"], r"model=smal: no such option in conf/model; did you mean model=small\?"),
    (["train.steps=abc"], r"train\.steps: .*abc"),
    (["optim.schedule=linear_wobble"], r"optim\.schedule=linear_wobble: expected one of \[warmup_cosine, wsd, "),
    (["train.resume=bogus"], r"train\.resume=bogus.*expected one of \[auto, none\]"),  # names the allowed values
    (["parallel.dp_mode=fdsp"], r"parallel\.dp_mode=fdsp: expected one of \[replicate, fsdp, deepspeed\]"),
    (["parallel.pp_schedule=1f1c"], r"expected one of \[1f1b, interleaved_1f1b, zbv\]$"),  # the alias listed once
    (["train.device=gpu"], r"train\.device=gpu: expected one of \[cpu, cuda\]"),
    (["logging.wandb.mode=loud"], r"expected one of \[online, offline, disabled\]"),
    (["data.sft_packing=gredy"], r"data\.sft_packing=gredy: expected one of \[pad, greedy\]"),
    (["data.sft_overflow=cut"], r"expected one of \[drop, truncate\]"),
    (["data.corpus=web"], r"data\.corpus=web: expected one of \[stdlib, files, sft\]"),
])
def test_bad_key_or_value_fails_with_its_name(override, needle):
    with pytest.raises(ValueError, match=needle):
        compose_run_config("pretrain", override)


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(ValueError, match="pretrain"):
        compose_run_config("no_such_recipe")


def test_validation_errors_name_the_fix():
    cfg, _ = compose_run_config("pretrain", ["data.global_batch_size=12", "data.micro_batch_size=8"])
    with pytest.raises(ValueError, match="global_batch_size=12"):
        validate_run_config(cfg, world_size=1)
