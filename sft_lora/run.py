"""Entry point: `accelerate launch -m sft_lora.run recipes/x.yaml [section.key=value ...]`.

Load and validate the recipe, build the SFTTrainer, train (or resume), save the adapters in the seed's layout
with the resolved recipe beside them, and merge when the recipe asks.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .config import RECIPE_FILE, SEED_FLAGS, Recipe, RecipeError, load_recipe, recipe_keys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sft_lora.run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="LoRA/QLoRA supervised fine-tuning from a YAML recipe.",
        epilog="overrides: section.key=value, typed like YAML (training.learning_rate=2e-4 lora.r=8)\n\n"
               "recipe keys:\n" + recipe_keys())
    parser.add_argument("recipe", help="recipe YAML file, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides; the command line wins")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="resume from the last complete checkpoint, or from the given checkpoint directory")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even from a checkpoint made from a different recipe or data, or incomplete")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    seed = parser.add_argument_group("the seed's flags (aliases of recipe keys)")
    for flag, key in SEED_FLAGS.items():
        seed.add_argument(f"--{flag}", default=None, help=f"sets {key}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():  # `--resume key=value`: an override
        args.overrides.append(args.resume)
        args.resume = "auto"
    try:
        recipe = load_recipe(args.recipe, args.overrides, {f: getattr(args, f) for f in SEED_FLAGS})
        if args.print_config:
            print(recipe.to_yaml(), end="")
            return 0
        train(recipe, resume=args.resume, force_resume=args.force_resume)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, evaluating, saving, merging)
        print("interrupted: SIGINT outside the training loop; finished outputs are kept, unfinished ones removed",
              file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:
        from .signals import TrainingInterrupted, exit_code  # here, not at the top: it imports transformers

        if not isinstance(exc, TrainingInterrupted):
            raise
        print(f"interrupted: {exc}", file=sys.stderr)
        return exit_code(exc.signum)
    return 0


def train(recipe: Recipe, resume: str | None = None, force_resume: bool = False) -> dict:
    """Train, save the adapters, optionally merge; print and return a summary of the run.

    Raises TrainingInterrupted when a signal stopped training (a checkpoint is saved, nothing final written)."""
    from .data import load_datasets
    from .guards import check_model_weights, check_outputs, check_qlora_backend
    from .model import load_tokenizer

    check_outputs(recipe)
    check_qlora_backend(recipe)
    check_model_weights(recipe)
    resume_from = _resume_point(recipe, resume, force_resume)
    train_set, eval_set = load_datasets(recipe.data, seed=recipe.training.get("seed", 42))
    if recipe.model.build_tiny and not Path(recipe.model.name_or_path).is_dir():
        from .tiny import build_tiny_model

        print(f"building the tiny model at {recipe.model.name_or_path}")
        build_tiny_model(recipe.model.name_or_path, recipe.data.path)
    _configure_wandb(recipe)
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    from .lengths import check_dataset_lengths

    check_dataset_lengths(recipe, tokenizer, train_set, eval_set)

    from .checkpoints import save_failure
    from .signals import interruptible
    from .trainer import build_trainer

    trainer = build_trainer(recipe, tokenizer, train_set, eval_set)
    summary = {"resumed_from": resume_from, "eval_loss_before": None, "eval_loss_after": None,
               "adapters": str(recipe.adapters_dir), "checkpoints": str(recipe.checkpoint_dir),
               "merged": str(recipe.merged_dir) if recipe.output.merge else None}
    if eval_set is not None and recipe.output.eval_before_training and resume_from is None:
        summary["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    try:
        with interruptible(trainer):  # a signal: checkpoint, stop, raise TrainingInterrupted
            result = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as exc:
        if failure := save_failure(trainer, exc):  # disk full or read-only while checkpointing: one line
            raise failure from None
        raise
    if eval_set is not None:
        summary["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    save_adapters(trainer, recipe, tokenizer)
    summary.update(global_step=result.global_step, runtime_s=result.metrics["train_runtime"],
                   train_losses=[(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log])
    main_process = trainer.accelerator.is_main_process
    del trainer
    if recipe.output.merge and main_process:
        from .merge import merge_adapter

        # overwrite=True on purpose: the run just replaced the adapters, and a merged model of the old ones
        # beside them would be wrong. `python -m sft_lora.merge` refuses to overwrite unless --overwrite.
        merge_adapter(recipe.adapters_dir, output_dir=recipe.merged_dir, overwrite=True)
    if main_process:
        _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    losses = summary["train_losses"]
    print(f"\ntrained to step {summary['global_step']} in {summary['runtime_s']:.1f} s")
    if losses:
        print(f"train loss:  {losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} (step {losses[-1][0]})")
    if summary["eval_loss_after"] is not None:
        before = summary["eval_loss_before"]
        start = f"{before:.4f} (before) -> " if before is not None else ""
        print(f"eval loss:   {start}{summary['eval_loss_after']:.4f} (after)")
    print(f"checkpoints: {summary['checkpoints']}\nadapters:    {summary['adapters']}")
    if summary["merged"]:
        print(f"merged:      {summary['merged']}")


def save_adapters(trainer, recipe: Recipe, tokenizer) -> None:
    """Adapters, tokenizer (with its chat template) and the resolved recipe, written atomically.

    `save_model` runs on every rank: under ZeRO-3 the weights are gathered collectively."""
    from .atomic import atomic_dir

    if not trainer.accelerator.is_main_process:
        trainer.save_model(str(recipe.adapters_dir) + ".unused")  # collective gather; rank 0 writes
        trainer.accelerator.wait_for_everyone()
        return
    with atomic_dir(recipe.adapters_dir, overwrite=True) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe beside it says the same
        tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    trainer.accelerator.wait_for_everyone()


def _resume_point(recipe: Recipe, resume: str | None, force: bool = False) -> str | None:
    if resume is None:
        return None
    from .checkpoints import select_checkpoint

    return select_checkpoint(recipe, resume, force)


def _configure_wandb(recipe: Recipe) -> None:
    """wandb as in the seed (project RAPA); offline when no API key is configured, so no network never crashes."""
    report_to = recipe.training["report_to"]
    if "wandb" not in ([report_to] if isinstance(report_to, str) else report_to):
        return
    os.environ.setdefault("WANDB_PROJECT", recipe.wandb.project)
    mode = recipe.wandb.mode
    if mode == "auto":
        netrc = Path.home() / ".netrc"
        logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
        mode = "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"
    os.environ.setdefault("WANDB_MODE", mode)


if __name__ == "__main__":
    sys.exit(main())
