#!/usr/bin/env bash
# Online DPO's per-round cost on the embedded model (issue 22): 16 demo prompts x 4 samples, 2 rounds, LoRA,
# sentiment reward; then offline DPO alone on round 2's pairs, same settings. Usage: bench/online_dpo.sh [DIR]
set -euo pipefail
out=${1:-runs/bench-online}
mkdir -p "$out"
python -c "
import json, sys
from alignkit.demo.data import prompts
open(sys.argv[1], 'w').write(''.join(json.dumps({'prompt': p}) + '\n' for p in prompts(0)[0][:16]))
" "$out/prompts.jsonl"
common=(--model smollm2-135m-instruct --lora true --lr 5e-4 --beta 0.1 --batch-size 8 --max-length 256
        --lr-scheduler constant --save-steps 0 --seed 0 --overwrite true)
python -m alignkit dpo --online --prompts "$out/prompts.jsonl" --reward sentiment --rounds 2 --n 4 \
    --max-new-tokens 48 --generation-batch-size 16 "${common[@]}" --output-dir "$out/online"
python -m alignkit dpo --data "$out/online/round-2/pairs.jsonl" "${common[@]}" --output-dir "$out/offline"
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
for line in open(f"{out}/online/metrics.jsonl"):
    r = json.loads(line)
    print({k: r[k] for k in ("round", "pairs", "generation_s", "scoring_s", "training_s", "loading_saving_s",
                             "round_s", "generation_plus_training_vs_training")})
offline = json.load(open(f"{out}/offline/summary.json"))
print({"offline_train_seconds": offline["train_seconds"], "offline_wall_seconds": offline["wall_seconds"]})
PY
