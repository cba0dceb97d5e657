"""Split PrefEval's distractor conversations (inter_turns.json) into a development half and a held-out half, so that
multi-turn figures can be measured on distractor turns no method was tuned on.

    python bench/experiments/split_distractors.py [INTER_TURNS] --out DIR   # writes DIR/inter_dev.json, DIR/inter_heldout.json

Conversations 0, 2, 4, ... go to the development half, 1, 3, 5, ... to the held-out half."""
import argparse
import json
from pathlib import Path

from localpers.personalize.datasets import data_path

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("inter_turns", nargs="?", default=str(data_path("inter_turns")))
parser.add_argument("--out", required=True)
args = parser.parse_args()
conversations = json.loads(Path(args.inter_turns).read_text())
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
for name, half in (("inter_dev.json", conversations[0::2]), ("inter_heldout.json", conversations[1::2])):
    (out / name).write_text(json.dumps(half))
    print(out / name, len(half))
