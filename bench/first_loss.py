"""How far bf16 autocast moves an SFT loss, against the gap between alignkit's and TRL's ways of computing it.

    python bench/first_loss.py [--batches 3] [--model smollm2-135m-instruct]

For a few batches of 4 synthetic plain rows (the rows `vs_trl.py --format plain` trains on), the same token ids
and loss masks go through four computations of the batch's mean completion cross-entropy:

- exact: fp32, a right-padded batch with its attention mask and full logits (the textbook computation), the
  log-softmax taken in float64;
- alignkit fp32: alignkit's per-sequence forward passes and chunked log-probs from hidden states, fp32;
- padded bf16: the exact computation under bf16 autocast, which is what TRL's SFTTrainer runs with bf16=True;
- alignkit bf16: alignkit's computation under bf16 autocast, its default on this CPU.

It prints each value and its distance from the exact one: the distance of "padded bf16" is the rounding that bf16
itself brings, whatever tool runs it; alignkit and TRL cannot agree more closely than that in bf16. The last column
moves TRL's own bf16 loss by a setting that leaves the exact loss unchanged: batch 2 with 2 accumulation steps
instead of batch 4 (TRL normalises by the step's tokens either way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from vs_trl import make_rows  # noqa: E402


def tokenize_plain(rows: list[dict], tokenizer, max_length: int = 512):
    """prompt + completion + eos, loss on the completion and eos: TRL's prompt-completion rows, alignkit's `plain`."""
    from alignkit.data.tokenize import IGNORE, TokenizedRow

    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append(TokenizedRow((prompt + completion)[:max_length],
                                ([IGNORE] * len(prompt) + completion)[:max_length], "bench"))
    return out


@torch.no_grad()
def padded_nll(model, rows, pad_id: int, bf16: bool, exact: bool = False) -> tuple[float, int]:
    """Summed completion NLL and token count of one right-padded batch; `exact` takes the log-softmax in float64
    (float32's, TRL's, is biased here by ~1e-6 per token on average, up to ~1e-5)."""
    from alignkit.data import packing
    from alignkit.data.tokenize import IGNORE

    unit = packing.padded(rows, pad_id)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        logits = model(input_ids=unit.input_ids, attention_mask=unit.attention_mask).logits
    logps = torch.log_softmax(logits[:, :-1].to(torch.float64 if exact else torch.float32), dim=-1)
    labels = unit.labels[:, 1:]
    trained = labels != IGNORE
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -picked[trained].sum().item(), int(trained.sum())


def padded_loss(model, rows, pad_id: int, bf16: bool, micro_batch: int | None = None, exact: bool = False) -> float:
    """The batch's mean completion NLL, computed in padded micro-batches (TRL's way with gradient accumulation,
    which normalises by the tokens of the whole step)."""
    size = micro_batch or len(rows)
    parts = [padded_nll(model, rows[i:i + size], pad_id, bf16, exact) for i in range(0, len(rows), size)]
    return sum(nll for nll, _ in parts) / sum(tokens for _, tokens in parts)


@torch.no_grad()
def alignkit_loss(model, rows, bf16: bool) -> float:
    from alignkit.data import packing
    from alignkit.training.forward import unit_sequence_logps

    nll, tokens = 0.0, 0
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for row in rows:
            sums, counts = unit_sequence_logps(model, packing.single(row), 1)
            nll -= sums.sum().item()
            tokens += int(counts.sum())
    return nll / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or folder (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=3, help="batches of 4 rows, seeds 0.. (default: %(default)s)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print(f"{'batch':<7}{'exact':>12}{'alignkit fp32':>15}{'padded bf16':>13}{'alignkit bf16':>15}"
          f"{'|alignkit-padded|':>19}{'TRL 2x2':>10}")
    for seed in range(args.batches):
        rows = tokenize_plain(make_rows("sft", 4, seed=seed, tokenizer=tokenizer, chat=False), tokenizer)
        pad_id = tokenizer.pad_token_id
        exact = padded_loss(model, rows, pad_id, bf16=False, exact=True)
        ours32, theirs16 = alignkit_loss(model, rows, bf16=False), padded_loss(model, rows, pad_id, bf16=True)
        ours16 = alignkit_loss(model, rows, bf16=True)
        # the same step as TRL computes it with batch 2 and 2 accumulation steps
        theirs16_2x2 = padded_loss(model, rows, pad_id, bf16=True, micro_batch=2)
        print(f"{seed:<7}{exact:>12.5f}{ours32 - exact:>+15.1e}{theirs16 - exact:>+13.1e}{ours16 - exact:>+15.1e}"
              f"{abs(ours16 - theirs16):>19.1e}{theirs16_2x2 - theirs16:>+10.1e}")
    print("(columns 3-5: difference from exact; the last: TRL's bf16 loss in 2 micro-batches of 2 minus its\n"
          " bf16 loss of the batch of 4)")


if __name__ == "__main__":
    main()
