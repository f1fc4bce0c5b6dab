"""The `eval` subcommand (predictions + metrics); cli.py adds it with ``add_parsers(sub)``.

The handler imports torch only once the config is known to be valid, so `tunesmith --help` stays instant.
"""

from __future__ import annotations

import argparse
import json

EVAL_HELP = "generate answers for a dataset and score them (BLEU-4, ROUGE-1/2/L), or score pairs with a reward model"
EVAL_DESCRIPTION = """\
Answer the prompts of eval_dataset (or of the validation split of dataset when val_size > 0, else of all of
dataset) with the config's model (+ adapter_name_or_path), then write output_dir/generated_predictions.jsonl
(prompt, predict, label) and output_dir/predict_results.json (BLEU-4, ROUGE-1/2/L, runtime).
Generation keys: max_new_tokens, do_sample, temperature, top_p. Chinese is segmented into words (jieba).
With stage: rm the model is a reward model: it scores the preference pairs instead (chosen and rejected score per
pair in generated_predictions.jsonl; accuracy, mean scores and margin in predict_results.json)."""


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` to the CLI's subcommands."""
    p = subparsers.add_parser(
        "eval", help=EVAL_HELP, description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="YAML config file (LLaMA-Factory keys; see README's config reference)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. max_samples=50")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from tunesmith.config import load_config
    from tunesmith.evaluate.predict import check_predict_config

    cfg = load_config(args.config, args.overrides)
    check_predict_config(cfg)
    from tunesmith.evaluate.predict import run_predict  # heavy (torch): once the config is known to be valid

    if cfg.stage == "rm":
        from tunesmith.evaluate.rewards import run_reward_eval

        results = run_reward_eval(cfg)
    else:
        results = run_predict(cfg)
    print(json.dumps(results, indent=1))
    return 0
