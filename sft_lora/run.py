"""Entry point: `accelerate launch -m sft_lora.run recipes/x.yaml [section.key=value ...]`: load the recipe, prepare
and check the data once, train (or resume), save the adapters (with the recipe and manifest), merge when asked,
smoke-test generation, write the summary and push when asked."""

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path

from .atomic import signals_interrupt
from .config import SEED_FLAGS, Recipe, RecipeError, load_recipe
from .sections import recipe_keys
from .text import first_line, printable


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
                        help="resume (implies --resume) even from a checkpoint made from a different recipe or "
                        "data, or incomplete")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--check", action="store_true",
                        help="print the pre-flight data report and exit (exit code 2 when a check fails)")
    seed = parser.add_argument_group("the seed's flags (aliases of recipe keys)")
    for flag, key in SEED_FLAGS.items():
        seed.add_argument(f"--{flag}", default=None, help=f"sets {key}")
    argv = list(sys.argv[1:] if argv is None else argv)
    for n, item in enumerate(argv[:-1]):  # `--resume recipe.yaml`: a recipe, not the checkpoint to resume from
        if item == "--resume" and argv[n + 1].endswith((".yaml", ".yml")) and Path(argv[n + 1]).is_file():
            argv[n], argv[n + 1] = argv[n + 1], item
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the flags


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():  # `--resume key=value`: an override
        args.overrides.append(args.resume)
        args.resume = "auto"
    args.resume = args.resume or ("auto" if args.force_resume else None)  # --force-resume alone means resume
    try:
        with signals_interrupt():
            _command(args, argv)
    except RecipeError as exc:
        return _stopped(exc, args, 2, f"error: {printable(str(exc))}")
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`): nothing is wrong with the run
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 128 + signal.SIGPIPE
    except OSError as exc:  # a path the system refuses wherever a value is used (name too long, I/O error …)
        where = f"{exc.filename}: " if exc.filename else ""
        return _stopped(exc, args, 2, f"error: {printable(where + (exc.strerror or first_line(exc)))}; check the paths")
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP outside the training loop (loading, saving, merging …)
        signum = getattr(exc, "signum", signal.SIGINT)
        return _stopped(exc, args, 128 + signum, f"interrupted: {signal.Signals(signum).name} outside the training "
                        "loop; finished outputs are kept, unfinished ones removed")
    except Exception as exc:
        from .callbacks import TrainingInterrupted  # here, not at the top: it imports transformers
        from .turns import template_refusal

        if isinstance(exc, TrainingInterrupted):
            return _stopped(exc, args, 128 + exc.signum, f"interrupted: {exc}")
        if line := template_refusal(exc):
            return _stopped(exc, args, 2, f"error: {printable(line)}")
        _stopped(exc, args, 1)  # before the traceback
        raise
    return 0


def _command(args: argparse.Namespace, argv: list[str] | None) -> None:
    """--print-config, --check, or the run (relaunched under the recipe's accelerate config where it names one)."""
    recipe = load_recipe(args.recipe, args.overrides, {f: getattr(args, f) for f in SEED_FLAGS})
    if args.print_config:
        print(recipe.to_yaml(), end="")
    elif args.check:
        from .model import build_tiny_if_asked, check_target_modules
        from .preflight import run_check
        from .prepare import load_inputs

        build_tiny_if_asked(recipe)
        tokenizer, data = load_inputs(recipe)
        check_target_modules(recipe)  # as a run does, once the model (a tiny one: built above) is there
        run_check(recipe, tokenizer, data)
    else:
        from .launch import check_this_launch, relaunch

        launched = {"SFT_LORA_LAUNCHED", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"} & os.environ.keys()
        if recipe.accelerate_config and not launched:  # under ours or a hand-run `accelerate launch`: train here
            _check_before_training(recipe)  # one line now, not one per process and the launcher's traceback
            relaunch(recipe, argv if argv is not None else sys.argv[1:], args.resume, args.force_resume)
        check_this_launch(recipe)
        train(recipe, resume=args.resume, force_resume=args.force_resume)


def _stopped(exc: BaseException, args: argparse.Namespace, code: int, line: str | None = None) -> int:
    """Print `line` (by one rank: all stop on it; an unexpected error, exit 1, by each) and, once training had started
    (`train` marks it), this command with --resume: the checkpoint a signal saved, else the last complete one."""
    first = os.environ.get("RANK", "0") == "0"
    if line and (code == 1 or first):
        print(line, file=sys.stderr)
    if getattr(exc, "training_started", False) and first:
        from .launch import launched_processes

        flags = [f"--{flag}={value}" for flag in SEED_FLAGS if (value := getattr(args, flag, None)) is not None]
        saved = [str(exc.checkpoint)] if getattr(exc, "checkpoint", None) else []
        command = shlex.join([args.recipe, *args.overrides, *flags, "--resume", *saved])
        by_hand = launched_processes() > 1 and "SFT_LORA_LAUNCHED" not in os.environ  # its options
        head = "accelerate launch <the same options>" if by_hand else shlex.quote(sys.executable)  # are not known
        print(f"to continue: {head} -m sft_lora.run {command}", file=sys.stderr)
    return code


def train(recipe: Recipe, resume: str | None = None, force_resume: bool = False) -> dict:
    """Check the data, train, save the adapters, optionally merge; write, print and return a summary of the run.
    Raises TrainingInterrupted when a signal stopped training (a checkpoint is saved, nothing final written)."""
    _check_before_training(recipe)
    from .launch import exclusive

    with exclusive(recipe):
        return _train(recipe, resume, force_resume)


def _check_before_training(recipe: Recipe) -> None:
    """Each in one line, before anything heavy is loaded, and before launching (not once per launched process)."""
    from .data import paths
    from .hub import check_push
    from .model import check_model_weights, check_qlora_backend, check_tiny_path
    from .outputs import check_outputs
    from .records import found

    for key in ("path", "eval_path"):  # a mistyped path: said as such, not blamed on the checkpoints
        for path in paths(getattr(recipe.data, key)):
            found(path, f"data.{key}")
    for check in (check_outputs, check_qlora_backend, check_model_weights, check_push, check_tiny_path):
        check(recipe)


def _train(recipe: Recipe, resume: str | None, force_resume: bool) -> dict:
    from accelerate import PartialState

    from .decisions import settle_attention
    from .fingerprint import fingerprint
    from .model import build_tiny_if_asked
    from .preflight import run_check
    from .prepare import load_inputs
    from .resume import check_fresh_start, check_template, checkpoint_state, nothing_left, resumable, select_checkpoint

    resume_from = select_checkpoint(recipe, resume, force_resume) if resume else None
    if not resume:
        check_fresh_start(recipe)  # no other run's checkpoints to mix with
    if resume_from and (done := nothing_left(recipe, resume_from, force_resume)) is not None:
        return done
    build_tiny_if_asked(recipe)  # before the fingerprint, which hashes the base model's tokenizer files
    settle_attention(recipe)  # before it too: the checkpoints record the attention trained with
    taken, (tokenizer, data) = fingerprint(recipe), load_inputs(recipe)  # hashed as read, not as edited meanwhile
    check_template(resume_from, tokenizer, force_resume)
    preflight = (run_check(recipe, tokenizer, data, main_process=PartialState().is_main_process).to_dict()
                 if recipe.check.enabled else None)
    from .trainer import build_trainer, configure_wandb

    configure_wandb(recipe)
    trainer = build_trainer(recipe, tokenizer, data, resume_from=resume_from, fingerprint=taken)
    evaluate = data.eval_records is not None
    summary = {"resumed_from": resume_from,
               "resumed_at_step": checkpoint_state(resume_from).get("global_step") if resume_from else None,
               "eval_loss_before": None, "eval_loss_after": None,
               "adapters": str(recipe.adapters_dir), "checkpoints": str(recipe.checkpoint_dir),
               "merged": str(recipe.merged_dir) if recipe.output.merge else None,
               "title": f"{recipe.model_name} {recipe.method}", "preflight": preflight,
               "records_by_source": data.records_by_source}
    try:
        _fit(trainer, recipe, tokenizer, summary, evaluate)
        main_process = trainer.accelerator.is_main_process
        del trainer
        if main_process:
            _finish(recipe, summary, *((data.eval_records, "eval") if evaluate else (data.records, "train")))
    except BaseException as exc:  # main prints the command that continues, where there is something to continue
        exc.training_started = getattr(exc, "training_started", resume_from is not None or resumable(recipe))
        raise
    return summary


def _fit(trainer, recipe: Recipe, tokenizer, summary: dict, evaluate: bool) -> None:
    """Train (a signal: checkpoint, stop, raise TrainingInterrupted), save the adapters; the numbers into `summary`."""
    from . import report
    from .callbacks import AtTheEnd, interruptible, training_error
    from .outputs import peak_memory_gib, replicas_agree, save_adapters

    resumed = summary["resumed_from"]
    try:
        with interruptible(trainer):
            result = trainer.train(resume_from_checkpoint=resumed)
    except AtTheEnd:
        print(f"nothing left to train: {resumed} is this run's last step; saving its adapters")
        trainer.load_best_as_at_the_end()
        result = None
    except Exception as exc:
        if (error := training_error(exc, trainer, recipe, resumed)) is not None:
            raise error from None  # main prints it through printable
        raise
    after = (report.logged_at_best(trainer) or trainer.evaluate()) if evaluate else {}
    summary.update(world_size=trainer.accelerator.num_processes, replicas_agree=replicas_agree(trainer),
                   peak_memory_gib=peak_memory_gib())
    save_adapters(trainer, recipe, tokenizer)
    summary.update(report.run_numbers(trainer, result, after, sorted(summary["records_by_source"]["eval"])))


def _finish(recipe: Recipe, summary: dict, held_out, inputs: str) -> None:
    """On the main process: the summary first (the merged card reads its losses), merge, smoke check, table, push."""
    from . import atomic, outputs, report
    from .card import model_card
    from .chat import run_smoke_check

    outputs.remove_stale_merge(recipe)  # the merge of the adapters just replaced: none rather than a mismatched one
    report.write_summary(recipe.adapters_dir, summary)
    card = model_card(recipe.adapters_dir, recipe.model.name_or_path)
    atomic.write_atomic(recipe.adapters_dir / "README.md", card)
    if recipe.output.merge:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from .merge import merge_adapter

        unset_hf_deepspeed_config()  # merge runs on rank 0 alone: ZeRO-3's sharded loading would wait for peers
        # overwrite=True on purpose: the run just replaced the adapters, and a merged model of the old ones
        # beside them would be wrong. `python -m sft_lora.merge` refuses to overwrite unless --overwrite.
        merge_adapter(recipe.adapters_dir, output_dir=recipe.merged_dir, overwrite=True,
                      trust_remote_code=recipe.model.trust_remote_code)
    summary["smoke"] = run_smoke_check(recipe, held_out, inputs)
    report.write_summary(recipe.adapters_dir, summary)
    print(report.summary_table(summary))
    if recipe.output.push_to_hub:
        from .hub import push_outputs

        push_outputs(recipe)


if __name__ == "__main__":
    sys.exit(main())
