"""Checkpoint -> Hugging Face folder -> checkpoint: transformers parity, bitwise round trip, errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longcat.config.schema import ModelConfig
from longcat.config.validate import validate as validate_run_config
from longcat.data.corpus import train_bpe_tokenizer
from longcat.data.tokenizer import EOD_TOKEN, PAD_TOKEN, load_tokenizer
from longcat.interop import (
    ExportDtype,
    ExportLayout,
    TransformersLayoutError,
    export_hf,
    import_hf,
    transformers_layout,
)
from longcat.interop import transformers_compat as layout_module
from longcat.model import LongcatFlashForCausalLM
from longcat.model.hf_mapping import HFLayout, to_hf_state_dict
from longcat.train.checkpoint import CheckpointManager

transformers = pytest.importorskip("transformers")
# CheckpointManager runs DCP without a process group here, as a single-process run does.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

REPO = Path(__file__).resolve().parents[3]
CFG = ModelConfig(
    vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96, q_lora_rank=32,
    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
    zero_expert_num=4, moe_topk=4, expert_ffn_hidden_size=32, routed_scaling_factor=2.0,
    initializer_range=0.08,  # routing and attention far from uniform
    mtp_num_layers=1,
)
N, Z = CFG.n_routed_experts, CFG.zero_expert_num
ROUTER_RE = r"\.mlp\.router\.(classifier\.weight|e_score_correction_bias)$"


def _trained_model(cfg: ModelConfig, *, seed: int = 0) -> LongcatFlashForCausalLM:
    """A model whose expert biases look trained: random, so they change the top-k choices."""
    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.e_score_correction_bias.copy_(torch.randn(cfg.num_experts_total) * 0.05)
    return model


def _save_checkpoint(model: LongcatFlashForCausalLM, root: Path, *, config_model: dict | None = None) -> Path:
    config = {"model": config_model or dataclasses.asdict(model.cfg), "data": {}}
    manager = CheckpointManager(root)
    return manager.save(7, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                        trainer_state={"step": 7, "config": config})


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _write_hf_folder(folder: Path, tensors: dict[str, torch.Tensor], *, config: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _assert_state_dicts_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 20
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe_tokenizer(texts, vocab_size=300, progress=False).save(str(path))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_path):
    """A saved checkpoint of a model with zero experts, trained biases and an MTP head, and its export
    (default layout, fp32, shards small enough that there are several)."""
    tmp = tmp_path_factory.mktemp("run")
    model = _trained_model(CFG)
    _save_checkpoint(model, tmp / "checkpoints")
    result = export_hf(tmp / "checkpoints", output=tmp / "hf", tokenizer=tokenizer_path, max_shard_bytes=400_000)
    return model, result


@pytest.mark.parametrize("layout", [ExportLayout.transformers, ExportLayout.released])
def test_transformers_loads_export_with_same_logits_and_routing(run, tmp_path, layout):
    model, result = run
    folder = result.output if layout == ExportLayout.transformers else \
        export_hf(result.checkpoint, output=tmp_path / "hf", layout=layout).output
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours_routes, hf_routes, hooks = [], [], []
    for ours_layer, hf_layer in zip(model.model.layers, hf.model.layers):
        hooks.append(ours_layer.mlp.router.register_forward_hook(lambda m, i, out: ours_routes.append((out, m))))
        hf_layer.mlp.router.register_forward_hook(lambda m, i, out: hf_routes.append(out[2]))
    ids = torch.randint(0, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits_BSV
        ref = hf(ids).logits
    for hook in hooks:
        hook.remove()
    assert ref.std() > 0.05
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    assert len(ours_routes) == len(hf_routes) == CFG.num_layers
    for layer, ((route, router), hf_ids_TK) in enumerate(zip(ours_routes, hf_routes)):
        hf_bias = hf.model.layers[layer].mlp.router.e_score_correction_bias
        assert hf_bias.dtype == torch.float32 and torch.equal(hf_bias, router.e_score_correction_bias)
        # transformers' top-k is unsorted: compare the chosen sets.
        assert torch.equal(route.expert_ids_TK.sort(dim=-1).values, hf_ids_TK.sort(dim=-1).values)
        unbiased_TK = route.probs_TE.topk(CFG.moe_topk, dim=-1).indices
        assert not torch.equal(unbiased_TK.sort(dim=-1).values, route.expert_ids_TK.sort(dim=-1).values)
        assert (route.expert_ids_TK >= N).any()  # zero experts are chosen


def test_export_folder_follows_released_names(run, tokenizer_path):
    model, result = run
    folder = result.output
    config = json.loads((folder / "config.json").read_text())
    tok = load_tokenizer(str(tokenizer_path))
    assert config["model_type"] == "longcat_flash" and config["architectures"] == ["LongcatFlashForCausalLM"]
    assert config["head_dim"] == CFG.qk_rope_head_dim and config["rope_parameters"]["rope_theta"] == CFG.rope_theta
    assert (config["vocab_size"], config["n_routed_experts"], config["zero_expert_num"]) == (512, N, Z)
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eod_id and config["pad_token_id"] == tok.pad_id
    assert config["mtp_num_layers"] == 1 and config["dtype"] == "float32"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eod_id

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(result.shards) > 1 and sorted(set(index["weight_map"].values())) == result.shards
    tensors = _hf_tensors(folder)
    assert set(index["weight_map"]) == set(tensors)
    expert = "model.layers.1.mlp.experts"
    assert torch.equal(tensors[f"{expert}.5.down_proj.weight"], model.model.layers[1].mlp.experts.down_proj[5])
    assert f"{expert}.{N}.down_proj.weight" not in tensors
    # Exactly the tensors the installed transformers' save_pretrained writes (asked of transformers itself),
    # plus our MTP head, which transformers ignores.
    on_disk = transformers_layout(CFG).on_disk
    assert {k: tuple(t.shape) for k, t in tensors.items() if not k.startswith("model.mtp.")} == on_disk
    assert {"model.mtp.layers.0.enorm.m.weight", "model.mtp.embed_tokens.weight",
            "model.mtp.layers.0.transformer_layer.mlp.up_proj.weight"} <= set(tensors)
    assert torch.equal(tensors["model.layers.0.mlp.router.e_score_correction_bias"],
                       model.model.layers[0].mlp.router.e_score_correction_bias)


def test_released_layout_bf16_keeps_router_fp32(run, tmp_path):
    model, result = run
    out = export_hf(result.checkpoint, output=tmp_path / "hf", dtype=ExportDtype.bf16, layout=HFLayout.PER_EXPERT)
    tensors = _hf_tensors(out.output)
    released = to_hf_state_dict(model.state_dict(), cfg=CFG, layout=HFLayout.PER_EXPERT)
    assert tensors.keys() == released.keys()  # exactly the released tensors: no zero-expert padding
    for name, tensor in tensors.items():
        want = torch.float32 if re.search(ROUTER_RE, name) else torch.bfloat16
        assert tensor.dtype == want, name
        assert torch.equal(tensor, released[name].to(want)), name
    assert json.loads((out.output / "config.json").read_text())["dtype"] == "bfloat16"
    assert out.tokenizer is None and not (out.output / "tokenizer.json").exists()


@pytest.mark.parametrize("layout,packed_experts", [
    (ExportLayout.transformers, None), (HFLayout.PER_EXPERT_PADDED, None), (HFLayout.PER_EXPERT, None),
    (HFLayout.PACKED, N), (HFLayout.PACKED, N + Z)])  # packed as transformers 5.25 and 5.0 hold it
def test_export_import_is_bitwise(run, tmp_path, layout, packed_experts):
    model, result = run
    if layout == ExportLayout.transformers:
        hf_dir = result.output
        found = transformers_layout(CFG).file_layout
    elif layout != HFLayout.PACKED:
        hf_dir = export_hf(result.checkpoint, output=tmp_path / "hf", layout=layout).output
        found = layout
    else:  # transformers' in-memory layout, as hf.state_dict() would hold it
        config = json.loads((result.output / "config.json").read_text())
        packed = to_hf_state_dict(model.state_dict(), cfg=CFG, layout=layout, packed_experts=packed_experts)
        packed["model.mtp.embed_tokens.weight"] = packed["model.mtp.embed_tokens.weight"].clone()
        hf_dir = _write_hf_folder(tmp_path / "hf", packed, config=config)
        found = layout
    imported = import_hf(hf_dir, output=tmp_path / "ckpt" / "step_00000000")
    assert imported.layout == found and imported.config == CFG

    fresh = LongcatFlashForCausalLM(CFG)
    seen = {}
    state = CheckpointManager(tmp_path / "unused").load(
        imported.output, model=fresh, optimizer=None, check_config=lambda c: seen.update(c))
    assert state["step"] == 0 and seen["model"] == dataclasses.asdict(CFG)
    _assert_state_dicts_equal(fresh.state_dict(), model.state_dict())
    if layout == ExportLayout.transformers:
        assert (imported.output / "tokenizer.json").is_file()


def test_packed_layout_with_unknown_row_count_is_named(run, tmp_path):
    model, result = run
    config = json.loads((result.output / "config.json").read_text())
    packed = to_hf_state_dict(model.state_dict(), cfg=CFG, layout=HFLayout.PACKED, packed_experts=N + 1,
                              include_mtp=False)
    hf_dir = _write_hf_folder(tmp_path / "hf", packed, config=config)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.gate_up_proj: expected \(8, 64, 64\), "
                                         r"found \(9, 64, 64\)"):
        import_hf(hf_dir, output=tmp_path / "out")


def test_a_transformers_layout_change_is_a_clear_error(run, tmp_path, monkeypatch):
    """A transformers release that shapes the experts differently: the export names the version and the
    tensor before writing anything, instead of a size-mismatch traceback at load time."""
    _, result = run
    experts_cls = transformers.models.longcat_flash.modeling_longcat_flash.LongcatFlashExperts
    original_init = experts_cls.__init__

    def init_with_three_projections(self, config):
        original_init(self, config)
        self.gate_up_proj = torch.nn.Parameter(torch.empty(self.num_experts, 3 * self.intermediate_dim,
                                                           self.hidden_dim))

    monkeypatch.setattr(experts_cls, "__init__", init_with_three_projections)
    monkeypatch.setattr(layout_module, "_LAYOUTS", {})
    version = re.escape(transformers.__version__)
    with pytest.raises(TransformersLayoutError, match=rf"transformers {version} changed its LongCat-Flash tensor "
                                                      r"layout.*model.layers.0.mlp.experts.gate_up_proj: "
                                                      r"transformers \(8, 96, 64\) vs ours \(8, 64, 64\)"):
        export_hf(result.checkpoint, output=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    released = export_hf(result.checkpoint, output=tmp_path / "released", layout=ExportLayout.released)
    assert released.num_tensors > 0  # the released layout does not depend on transformers


def test_tied_no_zero_expert_model_round_trips(tmp_path):
    cfg = dataclasses.replace(CFG, zero_expert_num=0, tie_word_embeddings=True, attention_bias=True,
                              mtp_num_layers=0, num_layers=1)
    model = _trained_model(cfg, seed=3)
    ckpt = _save_checkpoint(model, tmp_path / "checkpoints")
    hf_dir = export_hf(ckpt, output=tmp_path / "hf").output
    assert "lm_head.weight" not in _hf_tensors(hf_dir)  # tied, as transformers saves it
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits_BSV, hf(ids).logits, atol=1e-5, rtol=1e-5)

    out = import_hf(hf_dir, output=tmp_path / "back").output
    fresh = LongcatFlashForCausalLM(cfg)
    CheckpointManager(tmp_path).load(out, model=fresh, optimizer=None)
    _assert_state_dicts_equal(fresh.state_dict(), model.state_dict())


@pytest.mark.parametrize("case", ["unknown", "missing", "wrong_shape", "model_type"])
def test_import_names_bad_tensors(run, tmp_path, case):
    _, result = run
    tensors = _hf_tensors(result.output)
    config = json.loads((result.output / "config.json").read_text())
    down = "model.layers.1.mlp.experts.3.down_proj.weight"
    if case == "unknown":
        tensors["model.layers.0.mlp.experts.extra.weight"] = torch.zeros(2)
        match = "unknown tensors.*model.layers.0.mlp.experts.extra.weight"
    elif case == "missing":
        del tensors["model.layers.1.mlps.0.up_proj.weight"]
        match = "missing tensors.*model.layers.1.mlps.0.up_proj.weight"
    elif case == "wrong_shape":
        tensors[down] = tensors[down].t()
        match = rf"{down}: expected \(64, 32\), found \(32, 64\)"
    else:
        config["model_type"] = "deepseek_v3"
        match = "model_type='deepseek_v3'"
    hf_dir = _write_hf_folder(tmp_path / "hf", tensors, config=config)
    with pytest.raises(ValueError, match=match):
        import_hf(hf_dir, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_names_tensors_that_disagree_with_the_config(tmp_path):
    model = _trained_model(CFG)
    ckpt = _save_checkpoint(model, tmp_path / "checkpoints",
                            config_model=dataclasses.asdict(dataclasses.replace(CFG, expert_ffn_hidden_size=16)))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.gate_proj: expected \(8, 16, 64\), "
                                         r"found \(8, 32, 64\)"):
        export_hf(ckpt, output=tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_autotokenizer_loads_exported_tokenizer(run, tokenizer_path):
    _, result = run
    tok = transformers.AutoTokenizer.from_pretrained(result.output)
    ours = load_tokenizer(str(tokenizer_path))
    assert (tok.eos_token, tok.pad_token) == (EOD_TOKEN, PAD_TOKEN)
    assert (tok.eos_token_id, tok.pad_token_id) == (ours.eod_id, ours.pad_id)
    text = "def g(y):\n    return os.getcwd()\n"
    assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text


def test_tools(run, tmp_path, capsys):
    _, result = run
    export_tool, import_tool = _tool("export_hf"), _tool("import_hf")
    for tool in (export_tool, import_tool):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--help"])
        assert exit_info.value.code == 0
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["--checkpoint", str(result.checkpoint), "--output", str(out), "--dtype", "bf16", "--layout", "released"]
    assert export_tool.main(args) == 2 and "--force" in capsys.readouterr().err
    assert export_tool.main(args + ["--force", "--max-shard-size", "1MB"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert import_tool.main(["--hf", str(out), "--output", str(tmp_path / "ckpt")]) == 0
    assert "model.moe_topk=4" in capsys.readouterr().out


def test_trainer_init_from_imported_checkpoint(corpus_cache, tmp_path):
    """A trainer's checkpoint -> export (the run's own tokenizer found) -> import -> train.init_from."""
    from conftest import tiny_overrides

    from longcat.config.compose import compose_run_config
    from longcat.train.trainer import Trainer

    def trainer(out_dir: Path, **extra) -> Trainer:
        cfg, cfg_dict = compose_run_config("pretrain", tiny_overrides(corpus_cache, str(out_dir), **extra))
        validate_run_config(cfg, world_size=1)
        return Trainer(cfg, config_dict=cfg_dict)

    source = trainer(tmp_path / "a")
    with torch.no_grad():
        source.biases_L[0].copy_(torch.randn_like(source.biases_L[0]))
    exported = export_hf(source.save_checkpoint().parent, output=tmp_path / "hf")
    assert exported.tokenizer is not None and (exported.output / "tokenizer_config.json").is_file()
    imported = import_hf(exported.output, output=tmp_path / "imported")
    target = trainer(tmp_path / "b", **{"train.init_from": str(imported.output), "train.seed": 123})
    _assert_state_dicts_equal(target.model.state_dict(), source.model.state_dict())
