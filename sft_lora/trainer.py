"""The recipe's SFTConfig, LoraConfig and BitsAndBytesConfig put into an SFTTrainer, once its LoRA targets are known
to exist, and the subclass that evaluates each data source on its own and, on CPU too, scores only labelled
positions."""

import contextlib
import dataclasses
import os
import re
import types
from pathlib import Path

import torch
from trl import SFTTrainer

from .callbacks import CheckpointRecord, GracefulStop, RecipeWinsOnResume, parent_stops_workers
from .config import Recipe, RecipeError
from .text import first_line, shortened
from .values import suggest

OVERALL = "eval"  # key of the whole eval set among the eval datasets; per-source keys are "eval/<source>"
# The one private TRL name sft_lora relies on: the device test with which TRL's fused LM head
# (`trl.trainer.utils.add_fused_lm_head`) scores only labelled positions. tests/test_perf.py fails if TRL renames it.
TRL_DEVICE_TEST = "_use_triton"


def source_metric(source: str) -> str:
    """The metric prefix of one source's eval: `eval_<source>`, logged as `eval/<source>_loss` by TensorBoard/wandb."""
    return "eval_" + re.sub(r"\s+", "_", source.strip())


class _NoEvalDicts:
    """Mixed into the Trainer's console printer: eval dicts (`evaluate` prints one line) and the end-of-training
    speed dict (the summary table shows it) are not printed; they stay in the log history, TensorBoard and wandb."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (logs and any(key.startswith("eval_") or key == "train_runtime" for key in logs)):
            super().on_log(args, state, control, logs=logs, **kwargs)


class SourceEvalSFTTrainer(SFTTrainer):
    """Evaluates the whole eval set (`eval_loss`, as usual) then each source (`eval_<source>_loss`). Trainer's dict
    of eval datasets would rename the overall loss to `eval_<name>_loss` (breaking `metric_for_best_model`'s
    default); evaluating each prepared set by its key keeps `eval_loss`."""

    source_prefix: str | None = None
    printed_eval: int | None = None

    def __init__(self, *args, **kwargs) -> None:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        super().__init__(*args, **kwargs)
        for kind in (ProgressCallback, PrinterCallback):  # the one Trainer added (disable_tqdm), made compact
            if self.pop_callback(kind):
                self.add_callback(type(f"Compact{kind.__name__}", (_NoEvalDicts, kind), {}))
        score_labelled_positions_only(getattr(self.model, "get_base_model", lambda: self.model)())  # under PEFT

    def get_train_dataloader(self):
        return parent_stops_workers(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return parent_stops_workers(super().get_eval_dataloader(eval_dataset))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        per_source = eval_dataset is None and isinstance(self.eval_dataset, dict)
        metrics = super().evaluate(OVERALL if per_source else eval_dataset, ignore_keys, metric_key_prefix)
        sources = [key.removeprefix(OVERALL + "/") for key in self.eval_dataset if key != OVERALL] if per_source else []
        # each eval dataloader draws a seed from the global RNG: without the fork, reporting per source would change
        # the dropout masks of every later step, and so the trained weights
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            for source in sources:  # none is empty: build_trainer splits the eval set by the sources it holds
                self.source_prefix = source_metric(source)
                try:
                    metrics.update(super().evaluate(f"{OVERALL}/{source}", ignore_keys, self.source_prefix))
                finally:
                    self.source_prefix = None
        if eval_dataset is None and (name := self.args.metric_for_best_model) and (
                metric := f"eval_{name.removeprefix('eval_')}") not in metrics:  # at step 0 (eval_on_start), not as
            raise RecipeError(f"training.metric_for_best_model: '{name}' is not a metric this run's evaluation logs"
                              f"{suggest(metric, list(metrics))}")  # Trainer's KeyError after the first interval
        if eval_dataset is None and self.is_world_process_zero() and self.printed_eval != self.state.global_step:
            from tqdm.auto import tqdm

            # one line, below a running progress bar: `eval at step 20: loss 2.3456 (arith_en 2.1012, translate …)`
            per = [f"{shortened(s, 34, middle=True)} {metrics[key]:.4f}" for s in sources  # one printable line
                   if (key := source_metric(s) + "_loss") in metrics]
            tqdm.write(f"eval at step {self.state.global_step}: loss {metrics.get('eval_loss', float('nan')):.4f}"
                       + (f" ({', '.join(per)})" if per else ""))
            self.printed_eval = self.state.global_step  # the evaluation after training repeats the last one
        return metrics

    # Trainer's private names, used here alone: as Trainer, keeping each trainable parameter's dtype. PEFT's
    # load_adapter upcasts an adapter that TRL trains in bfloat16 (QLoRA) to float32: a resumed run trained in another
    # precision, the best checkpoint was saved again as float32 (test_train's QLoRA tests fail if Trainer renames them).
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with self._dtypes_kept():
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        with self._dtypes_kept():
            super()._load_best_model()

    def load_best_as_at_the_end(self) -> None:
        """`load_best_model_at_end` as Trainer does it at the end of a run it trains: a resume from the run's last step
        trains nothing, and kept the last step's weights where the run it continues ends with the best's."""
        if self.args.load_best_model_at_end and os.path.isdir(self.state.best_model_checkpoint or ""):
            self._load_best_model()

    @contextlib.contextmanager
    def _dtypes_kept(self):
        dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
        yield
        for name, p in self.model.named_parameters():
            if dtypes.get(name, p.dtype) != p.dtype:
                p.data = p.data.to(dtypes[name])

    def create_model_card(self, *args, **kwargs) -> None:
        """None in the checkpoint root: TRL's card names no base model; each checkpoint gets sft_lora's (report.py)."""

    def log(self, logs, start_time=None):
        # TRL logs its eval metrics (entropy, token accuracy) as eval_* whatever the prefix; name them per source
        # so they do not overwrite the overall eval_* curves.
        if self.source_prefix is not None:
            for key, values in self._metrics["eval"].items():
                logs[f"{self.source_prefix}_{key}"] = sum(values) / len(values)
            self._metrics["eval"].clear()
        super().log(logs, start_time)


def build_trainer(recipe: Recipe, tokenizer, data, eval_dataset=None, resume_from: str | None = None,
                  fingerprint: dict | None = None):
    """An `SFTTrainer` loading the base model itself (4-bit for QLoRA) under the LoRA adapter, with checkpoint
    records and the SIGTERM/SIGINT stop. `data`: the run's `prepare.Prepared`, or chat records (and `eval_dataset`);
    `resume_from`: the checkpoint `train` will resume from (its run's length tells this run's end from a longer's)."""
    from peft.utils.error import NoMatchingPeftModuleError
    from transformers.integrations import TensorBoardCallback

    from .decisions import decide_activation_checkpointing
    from .model import check_target_modules, name_the_cpu_to_deepspeed
    from .prepare import Prepared, prepare_datasets
    from .resume import checkpoint_state

    check_target_modules(recipe)  # a wrong target name fails before any weight is downloaded or loaded
    name_the_cpu_to_deepspeed()
    if not isinstance(data, Prepared):
        data = prepare_datasets(recipe.training, tokenizer, data, eval_dataset)
    decide_activation_checkpointing(recipe, data.train)
    # data.args: the trainer's copy of recipe.training, adapted to the prepared data; the decision goes on it too
    args = dataclasses.replace(data.args, activation_checkpointing=recipe.training.activation_checkpointing)
    eval_sets = per_source_eval_sets(recipe, data.eval)
    try:
        trainer = SourceEvalSFTTrainer(
            model=_absolute(recipe.model.name_or_path), args=args, train_dataset=data.train, eval_dataset=eval_sets,
            processing_class=tokenizer, peft_config=recipe.lora, quantization_config=recipe.quantization,
            callbacks=[GracefulStop(),  # before the record: a stop request triggers the save it then records
                       CheckpointRecord(recipe, data.records_by_source, fingerprint),
                       RecipeWinsOnResume(checkpoint_state(resume_from).get("max_steps") if resume_from else None)])
    except NoMatchingPeftModuleError as exc:  # when the architecture could not be checked beforehand
        raise RecipeError(f"{recipe.at('lora.target_modules')}: lora.target_modules: {first_line(exc)}") from None
    except OSError as exc:  # from_pretrained: missing files, no safetensors weights, no network for a hub id
        raise RecipeError(f"{recipe.model.name_or_path}: cannot load the model ({first_line(exc)}); check "
                          "model.name_or_path, the network or HF_TOKEN") from None
    # TensorBoard writes to `{checkpoint_dir}/runs`; unpinned, an eval before training (the writer is not yet set
    # up) goes to `./runs` in the working directory and the rest to a dated folder under the checkpoints.
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(recipe.checkpoint_dir / "runs")
    # bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-BF16 CPU kernel in the first eval forward and never
    # back; training forwards after it run a kernel with no backward (LoRA gradients off by ~30 %, a warning
    # that "may lead to silently incorrect behavior"). Off for this model's layers: evaluation uses the plain kernel.
    for module in trainer.model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return trainer


def per_source_eval_sets(recipe: Recipe, evaluation):
    """The eval set, or with report.eval_per_source and several sources {OVERALL: all, "eval/<source>": …}."""
    column = evaluation["source"] if evaluation is not None and recipe.report.eval_per_source else []
    sources = sorted(set(column))  # one source: its loss is the overall loss
    if len(sources) < 2:
        return evaluation
    check_source_metrics(sources)
    return {OVERALL: evaluation, **{f"{OVERALL}/{s}": evaluation.select([i for i, v in enumerate(column) if v == s])
                                    for s in sources}}


def check_source_metrics(sources) -> None:
    """RecipeError when two eval sources would log under one metric name (one loss for both); --check says it too."""
    named: dict[str, str] = {}
    for source in sorted(sources):
        if (other := named.setdefault(source_metric(source), source)) != source:
            raise RecipeError(f"sources '{other}' and '{source}' share the eval metric {source_metric(source)}_loss "
                              "(whitespace becomes '_'); rename one, or set report.eval_per_source: false")


def _absolute(name_or_path: str) -> str:
    """A local model directory as an absolute path: PEFT writes it into adapter_config.json as the base model, which
    merge and chat then load from whatever directory they run in."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else name_or_path


def score_labelled_positions_only(model) -> None:
    """Make TRL's fused LM head on `model` score only labelled positions on CPU too, as on Triton devices: TRL scores
    every position elsewhere to keep tile shapes fixed for compiled backends (Neuron); on eager CPU that costs +26 %
    time per token on the benchmark job (README, Performance). The forward TRL bound is bound again, to this model
    only, with a device test that also says yes on CPU; a no-op if it no longer consults `TRL_DEVICE_TEST`."""
    fused = getattr(model.forward, "__func__", None)
    if fused is None or TRL_DEVICE_TEST not in fused.__code__.co_names or TRL_DEVICE_TEST not in fused.__globals__:
        return
    use_triton = fused.__globals__[TRL_DEVICE_TEST]
    scope = {**fused.__globals__, TRL_DEVICE_TEST: lambda device: device.type == "cpu" or use_triton(device)}
    rebound = types.FunctionType(fused.__code__, scope, fused.__name__, fused.__defaults__, fused.__closure__)
    rebound.__kwdefaults__ = fused.__kwdefaults__
    model.forward = types.MethodType(rebound, model)


def configure_wandb(recipe: Recipe) -> None:
    """wandb offline unless a key or login exists (no network never crashes); no wandb or a bad key: one line now."""
    import importlib.util

    if "wandb" not in recipe.training.report_to:
        return
    if importlib.util.find_spec("wandb") is None:
        raise RecipeError(f"{recipe.at('training.report_to')}: training.report_to includes wandb, which is not "
                          "installed; pip install wandb or set training.report_to: none")
    mode, key = recipe.wandb.mode, os.environ.get("WANDB_API_KEY")
    if mode == "auto":
        netrc = Path.home() / ".netrc"
        logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
        mode = "online" if key or logged_in else "offline"
    for name, dotted, value in (("WANDB_PROJECT", "wandb.project", recipe.wandb.project),
                                ("WANDB_MODE", "wandb.mode", mode)):
        # the environment's value wins over a default; one the recipe names wins, as wandb.init's arguments do
        named = dotted in recipe.where and getattr(recipe.wandb, dotted.removeprefix("wandb.")) != "auto"
        if os.environ.setdefault(name, value) != value and named:
            print(f"notice: {recipe.at(dotted)}: {dotted}: {value} wins over {name}={os.environ[name]}")
            os.environ[name] = value
    if key is not None and os.environ["WANDB_MODE"] == "online":
        from wandb.sdk.lib.wbauth.validation import check_api_key  # what wandb.init checks first

        if problem := check_api_key(key):
            raise RecipeError(f"WANDB_API_KEY (environment): {problem} Fix it, or set wandb.mode: offline")
