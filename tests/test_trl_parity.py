"""TRL is the anchor: on the same model, rows and batch, the first SFT loss equals TRL's SFTTrainer's."""

from __future__ import annotations

import json

import pytest

from alignkit.api import make_sft_config
from alignkit.recipes import sft as recipe
from tests.conftest import write_jsonl

# Non-chat prompt/completion rows: TRL trains on completion + eos; alignkit's `plain` template does the same.
ROWS = [
    {"prompt": "Add 12 and 30.", "completion": " The answer is 42."},
    {"prompt": "What is the capital of France?", "completion": " Paris."},
    {"prompt": "Write a short poem about the sea.", "completion": " The sea is blue."},
    {"prompt": "hello there", "completion": " Hello world"},
]


def test_first_step_loss_matches_trl_sft_trainer(tmp_path, tiny_model_dir):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
                         use_cpu=True, max_length=512, seed=0)
    trainer = trl.SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), args=args,
                             train_dataset=Dataset.from_list(ROWS))
    trainer.train()
    trl_loss = next(row["loss"] for row in trainer.state.log_history if "loss" in row)

    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    recipe.run(make_sft_config(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "ours"),
                               chat_template="plain", batch_size=4, max_steps=1, lr=1e-3, dtype="fp32"))
    ours = json.loads((tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert ours == pytest.approx(trl_loss, rel=1e-4)
