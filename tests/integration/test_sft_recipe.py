"""The SFT recipe's data path: chat-rendered samples reach the trainer with assistant-only labels."""

from conftest import tiny_overrides

from longcat.config.compose import compose_run_config
from longcat.data.chat import END_OF_TURN
from longcat.data.tokenizer import load_tokenizer
from longcat.train.trainer import Trainer


def test_sft_recipe_trains_on_assistant_tokens_only(corpus_cache, tmp_path):
    overrides = tiny_overrides(corpus_cache, str(tmp_path), **{"data.seq_length": 512})
    overrides = [o for o in overrides if not o.startswith(("data.micro_batch_size", "data.global_batch_size"))]
    cfg, d = compose_run_config("sft", overrides)
    trainer = Trainer(cfg, config_dict=d)
    tok = load_tokenizer(trainer.data.tokenizer_path)
    assert tok.encode(END_OF_TURN) == [tok.encode(END_OF_TURN)[0]], "chat markers must be single tokens"
    mb = next(iter(trainer.data.train))
    labelled = mb["labels"] != -100
    assert 0 < labelled.sum() < mb["token_mask"].sum()
    text = tok.decode(mb["labels"][0][labelled[0]].tolist())
    assert END_OF_TURN in text and "USER:" not in text and "SYSTEM:" not in text
    first = trainer.train_step().loss.ce
    for _ in range(3):
        last = trainer.train_step().loss.ce
    assert last < first
