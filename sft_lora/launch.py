"""Which accelerate launch a recipe runs under, and the recipe × launch combinations known to fail (each in one line
with its fix, the issue threads cited inline): checked against the config file a recipe names before launching, and
again inside the launched processes against what accelerate actually set up; one run at a time per checkpoint
directory."""

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import recipe_yaml
from .config import Recipe, RecipeError
from .text import first_line, say

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"


def resolve_config(name: str, where: str = "accelerate_config") -> Path:
    """An accelerate config by short name (`zero3` → accelerate_configs/zero3.yaml) or by path."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise RecipeError(f"{where}: '{name}' not found; use an existing file or one of: {shipped}")


def read_config(path: Path) -> dict[str, Any]:
    """An accelerate config file as a dict (the shape `accelerate config` writes)."""
    config = recipe_yaml.parse(path.read_text(encoding="utf-8"), str(path))[0] or {}  # file:line, as a recipe
    if not isinstance(config, dict):
        raise RecipeError(f"{path}: an accelerate config must be a mapping")
    return config


def config_from_environment() -> dict[str, Any]:
    """What `accelerate launch` set up for this process, in the shape of a config file."""
    env = os.environ
    config: dict[str, Any] = {"distributed_type": "NO", "num_processes": int(env.get("WORLD_SIZE", "1")),
                              "mixed_precision": env.get("ACCELERATE_MIXED_PRECISION", "no")}
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":  # what check_launch reads (None: not fixed)
        config.update(distributed_type="DEEPSPEED", deepspeed_config={
            "zero_stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")),
            "gradient_accumulation_steps": env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")})
    elif env.get("ACCELERATE_USE_FSDP") == "true":
        config.update(distributed_type="FSDP", fsdp_config={
            "fsdp_version": int(env.get("FSDP_VERSION", "1")),
            "fsdp_activation_checkpointing": env.get("FSDP_ACTIVATION_CHECKPOINTING") == "true",
            "fsdp_use_orig_params": env.get("FSDP_USE_ORIG_PARAMS", "true") == "true"})
    elif config["num_processes"] > 1:
        config["distributed_type"] = "MULTI_GPU"
    return config


def check_launch(recipe: Recipe, config: dict[str, Any], where: str) -> None:
    """Raise RecipeError for a recipe × accelerate-config combination known to fail or to train wrongly."""
    try:
        _check_pair(recipe, config, where)
    except RecipeError:
        raise
    except (ValueError, TypeError, OSError) as exc:  # `num_processes: two`, a DeepSpeed file that is no JSON …
        raise RecipeError(f"{where}: not a valid accelerate config ({first_line(exc)}); compare it with the "
                          "shipped ones in accelerate_configs/") from None


def _check_pair(recipe: Recipe, config: dict[str, Any], where: str) -> None:
    kind, ds = str(config.get("distributed_type", "NO")).upper(), config.get("deepspeed_config") or {}
    stage = int(ds.get("zero_stage", 0))
    name = f"DeepSpeed ZeRO-{stage}" if kind == "DEEPSPEED" else kind
    training, quant = recipe.training, recipe.quantization
    processes, machines = int(config.get("num_processes") or 1), int(config.get("num_machines") or 1)
    # QLoRA with sharded weights needs the 4-bit storage dtype to equal the float dtype that ZeRO-3/FSDP flatten
    # (PEFT docs "Use PEFT QLoRA and DeepSpeed with ZeRO3"; huggingface/peft#2016, transformers#29266).
    if quant is not None and name in ("FSDP", "DeepSpeed ZeRO-3"):
        compute = str(quant.bnb_4bit_compute_dtype).removeprefix("torch.")
        if str(quant.bnb_4bit_quant_storage).removeprefix("torch.") != compute:
            raise RecipeError(f"{where}: QLoRA under {name} needs quantization.bnb_4bit_quant_storage: "
                              f"{compute} (equal to bnb_4bit_compute_dtype); add it to the recipe")
    # accelerate hands a multi-machine DeepSpeed launch other than `standard` (pdsh, …) the whole environment by
    # appending it to ./.deepspeed_env (accelerate/commands/launch.py `deepspeed_launcher`): HF_TOKEN included.
    launcher = ds.get("deepspeed_multinode_launcher", "pdsh")
    if kind == "DEEPSPEED" and machines > 1 and launcher != "standard":
        raise RecipeError(f"{where}: the {launcher} launcher makes accelerate write the whole environment (HF_TOKEN, "
                          "WANDB_API_KEY …) to ./.deepspeed_env; set deepspeed_multinode_launcher: standard and run "
                          "the command on every machine (accelerate_configs/multi_node.yaml)")
    # A device map places whole layers on devices itself; DeepSpeed/FSDP/DDP place them instead
    # ("DeepSpeed Zero-3 is not compatible with ... passing a device_map": peft#306, accelerate#2543).
    if recipe.model.device_map is not None and (kind != "NO" or processes > 1):
        raise RecipeError(f"{where}: model.device_map={recipe.model.device_map!r} cannot be used under "
                          f"{name}; remove model.device_map (each process loads its own copy or shard)")
    # Precision is decided twice (recipe and accelerate config); when they disagree one silently wins.
    mixed = str(config.get("mixed_precision") or "no")
    wanted = "bf16" if training.bf16 else "fp16" if training.fp16 else "no"
    if mixed != "no" and mixed != wanted:
        fix = (f"set mixed_precision: \"{wanted}\" in the config, or use accelerate_config=cpu_ddp" if training.use_cpu
               else f"set training.{mixed}: true or mixed_precision: \"{wanted}\" in the config")  # no GPU: no bf16
        raise RecipeError(f"{where}: the accelerate config asks mixed_precision {mixed} but the recipe trains in "
                          f"{'fp32' if wanted == 'no' else wanted}{' on the CPU' if training.use_cpu else ''}; {fix}")
    if kind == "DEEPSPEED":
        _check_deepspeed_batch(config, training, processes, where)
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        # Checkpointing twice recomputes every layer twice; transformers refuses the pair at step 0.
        if fsdp.get("fsdp_activation_checkpointing") and training.activation_checkpointing:
            raise RecipeError(f"{where}: fsdp_activation_checkpointing and training.activation_checkpointing are "
                              "both on; set training.activation_checkpointing: false")
        # FSDP1 flattens frozen base and trainable LoRA weights together unless the original parameters are kept
        # ("FlatParameter requires uniform requires_grad": PEFT docs, accelerate#1740).
        if int(fsdp.get("fsdp_version", 1)) == 1 and fsdp.get("fsdp_use_orig_params") is False and quant is None:
            raise RecipeError(f"{where}: LoRA under FSDP1 needs fsdp_use_orig_params: true (or fsdp_version: 2)")
    if processes % machines:
        raise RecipeError(f"{where}: num_processes {processes} is not a multiple of num_machines {machines}")
    if int(config.get("machine_rank") or 0) >= machines:
        raise RecipeError(f"{where}: machine_rank must be below num_machines {machines}")


def relaunch(recipe: Recipe, argv: list[str], resume: str | None, force: bool) -> None:
    """This command again under `accelerate launch`, checked first as its processes will check it (the pair, the
    checkpoint to resume from or the checkpoints a fresh start would mix with): a refusal is one line, exit 2, not one
    per process, the launcher's traceback and exit 1."""
    from unittest import mock

    from .resume import check_fresh_start, check_full_state, finished, select_checkpoint
    with exclusive(recipe):  # another run writing there: said now
        pass
    path = resolve_config(recipe.accelerate_config, f"{recipe.at('accelerate_config')}: accelerate_config")
    check_launch(recipe, config := read_config(path), str(path))
    kind, zero = str(config.get("distributed_type", "NO")).upper(), (config.get("deepspeed_config") or {})
    with mock.patch.dict(os.environ, {  # what `accelerate launch` sets in each process, which the fingerprint reads
            "WORLD_SIZE": str(config.get("num_processes") or 1), "ACCELERATE_USE_FSDP": str(kind == "FSDP").lower(),
            "ACCELERATE_USE_DEEPSPEED": str(kind == "DEEPSPEED").lower(),
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(zero.get("zero_stage", 2))}), contextlib.redirect_stdout(None):
        if not resume:
            check_fresh_start(recipe)  # rank 0 says it later
        elif not finished(recipe, checkpoint := select_checkpoint(recipe, resume, force)):
            check_full_state(checkpoint, force)
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(path), "-m", "sft_lora.run", *argv]
    print("launching:", " ".join(command), flush=True)
    os.environ["SFT_LORA_LAUNCHED"] = "1"  # the launched processes train instead of launching again
    os.execv(command[0], command)


def check_this_launch(recipe: Recipe) -> None:
    """Check what accelerate actually set up for this process (also when launched by hand)."""
    from accelerate import PartialState

    # accelerate's one-process launcher exports MASTER_ADDR only when more processes were asked (`--num_processes
    # 2` without a GPU, or with --cpu): it started one, which would train alone while the user waits for two.
    if {"MASTER_ADDR", "ACCELERATE_MIXED_PRECISION"} <= os.environ.keys() and "WORLD_SIZE" not in os.environ:
        raise RecipeError("accelerate launch was asked for several processes but started 1 (its one-process launcher "
                          "runs where there is no GPU or with --cpu); use accelerate_config=cpu_ddp or accelerate "
                          "launch --multi_gpu --num_processes N")
    check_launch(recipe, config_from_environment(), "accelerate launch")
    check_process_group(PartialState().num_processes)
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and PartialState().distributed_type.name != "FSDP":
        say("notice: accelerate shards with FSDP on GPUs only; here the fsdp config trains as DDP (each process "
            "holds the whole model)")


@contextlib.contextmanager
def exclusive(recipe: Recipe) -> Iterator[None]:
    """Hold the run's checkpoint and output directories while it trains: a second run into either on this machine
    stops in one line on every rank (two at once wrote into the same checkpoints, each record vouching for the
    other's weights, and the last to finish replaced the other's adapters). Lock files in /tmp (else the temp
    directory), named by the directories, held with flock by the main process (released however it ends)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state, problem = PartialState(), None
    with contextlib.ExitStack() as held:
        if state.is_main_process:
            for directory, key in ((recipe.checkpoint_dir, "output.checkpoint_dir"), (recipe.run_dir, "output.dir")):
                problem = problem or _lock(held, directory, key)
        if state.num_processes > 1:  # the other ranks stop with it, not at a barrier with a traceback
            problem = broadcast_object_list([problem])[0]
        if problem:
            raise RecipeError(problem)
        yield


def _lock(held: contextlib.ExitStack, directory: Path, key: str) -> str | None:
    """Lock `directory` for this process (until `held` closes); what stops the run when another holds it, else None."""
    import fcntl
    import tempfile

    name = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    # /tmp whatever TMPDIR says: a per-job TMPDIR (SLURM) gave two runs into one directory two locks
    path = Path("/tmp" if os.access("/tmp", os.W_OK | os.X_OK) else tempfile.gettempdir()) / f"sft_lora-{name}.lock"
    try:
        handle = held.enter_context(open(path, "a+", encoding="utf-8"))
    except OSError as exc:  # no usable temp directory: train unguarded rather than not at all
        print(f"notice: {path}: cannot create the run lock ({exc.strerror}); another run into {directory} would not be "
              "stopped (set TMPDIR to a writable directory)")
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        return (f"{directory}: another run is writing into it (process {handle.read()}); wait for it to end, or set "
                f"{key} elsewhere")
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return None


def launched_processes() -> int:
    """The processes the launcher started (WORLD_SIZE, which accelerate and torchrun set in each); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_process_group(world_size: int) -> None:
    """Processes started by a launcher that did not join one process group would each train alone and write the
    same outputs (seen with `accelerate launch --cpu --num_processes 2`, and multi-GPU configs on a CPU box)."""
    launched = launched_processes()
    if launched > 1 and world_size != launched:
        raise RecipeError(f"launcher started {launched} processes but they formed a group of {world_size}; on a "
                          "machine without a GPU keep training.use_cpu: true and a MULTI_GPU or DEEPSPEED config")


def _check_deepspeed_batch(config: dict[str, Any], training, processes: int, where: str) -> None:
    """DeepSpeed requires train_batch_size = micro batch × accumulation × world size; numbers fixed in the
    accelerate or DeepSpeed config must agree with the recipe's, or DeepSpeed stops at start-up."""
    ds = dict(config.get("deepspeed_config") or {})
    if ds.get("deepspeed_config_file"):
        ds.update(json.loads(Path(ds["deepspeed_config_file"]).read_text(encoding="utf-8")))
    micro, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    fixed = {"gradient_accumulation_steps": accumulation, "train_micro_batch_size_per_gpu": micro,
             "train_batch_size": micro * accumulation * processes}
    for key, expected in fixed.items():
        if (value := ds.get(key)) not in (None, "auto", "none") and int(value) != expected:
            raise RecipeError(f"{where}: DeepSpeed {key}={value} but the recipe gives {expected} "
                              f"(per_device_train_batch_size {micro} × gradient_accumulation_steps {accumulation} "
                              f"× {processes} processes); set it to \"auto\"")

