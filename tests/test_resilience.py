"""Surviving kills: SIGKILL at random steps, half-written and foreign checkpoints, SIGTERM/SIGINT.

The runs are real child processes (`tests/children.py`); the tiny model, 12 steps, a checkpoint every 2.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from sft_lora.config import RecipeError, load_recipe
from sft_lora.resume import RECORD, incomplete_reason, select_checkpoint

from .children import Child, run
from .conftest import ROOT, SAMPLE, write_recipe

pytestmark = pytest.mark.slow

MAX_STEPS, SAVE_STEPS = 12, 2
KILL_TRIALS = int(os.environ.get("SFT_LORA_KILL_TRIALS", "6"))


def _recipe(directory: Path, model: Path, **training) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_recipe(directory, model, data={"eval_split": None}, training={
        "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "logging_steps": 1, "disable_tqdm": True, **training})


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(next(directory.glob("final_model/*/*/lora_adapters")) / "adapter_model.safetensors")


def _checkpoints(directory: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in directory.glob("checkpoints/*/*/lora/checkpoint-*")}


def _logged_steps(checkpoint: Path) -> list[int]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry["step"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """The uninterrupted run, in a child process like the runs it is compared with."""
    directory = tmp_path_factory.mktemp("reference")
    code, child = run([str(_recipe(directory, tiny_model))], directory / "log")
    assert code == 0, child.err()[-3000:]
    return directory, _adapter(directory)


def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_adapter(reference, tiny_model, tmp_path):
    """Acceptance: killed with SIGKILL at random points (mid-step or mid-save), resumed, KILL_TRIALS times."""
    _, expected = reference
    rng = random.Random(os.environ.get("SFT_LORA_KILL_SEED", "issue-5"))
    kills = mid_save = 0
    for trial in range(KILL_TRIALS):
        directory = tmp_path / f"trial{trial}"
        recipe = str(_recipe(directory, tiny_model))
        argv, done = [recipe], 0
        for attempt in range(rng.choice((1, 2))):  # some trials are killed again while resuming
            if done >= MAX_STEPS - 2:
                break
            target = rng.randint(done + 1, MAX_STEPS - 2)
            child = Child(argv, directory / f"log{attempt}")
            child.wait_for(lambda child=child, target=target, done=done: done + child.steps_done() >= target)
            time.sleep(rng.uniform(0.0, 0.2))  # anywhere within the next step or the save after it
            os.kill(child.pid, signal.SIGKILL)
            assert child.join() == -signal.SIGKILL, f"trial {trial}: the run ended before the kill"
            kills += 1
            seen = done + child.steps_done()  # a resumed run logs from the step after its checkpoint
            checkpoints = _checkpoints(directory)
            complete = [s for s, p in checkpoints.items() if incomplete_reason(p) is None]
            broken = [s for s, p in checkpoints.items() if incomplete_reason(p) is not None]
            mid_save += bool(broken)
            last = max(complete, default=0)
            # No completed step is lost beyond the last checkpoint: every checkpoint whose step was followed by
            # a logged step had finished saving and is usable; only the one being written can be incomplete.
            assert last >= SAVE_STEPS * ((seen - 1) // SAVE_STEPS), (trial, seen, sorted(complete), broken)
            assert all(step > last for step in broken), (trial, sorted(complete), broken)
            done = last
            argv = [recipe, "--resume"] if last else [recipe]
        code, child = run(argv, directory / "final")
        assert code == 0, child.err()[-3000:]
        if done:
            assert f"resuming from {_checkpoints(directory)[done]}" in child.out()
        # Every step 1..12 happened exactly once in the history the finished run carries.
        assert _logged_steps(_checkpoints(directory)[MAX_STEPS]) == list(range(1, MAX_STEPS + 1))
        got = _adapter(directory)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"trial {trial}: adapter differs"
    print(f"\nkill test: {KILL_TRIALS} trials, {kills} SIGKILLs, {mid_save} left an incomplete checkpoint; "
          "all resumed to an adapter identical to the uninterrupted run")


def _copy_run(reference: Path, directory: Path, model: Path) -> Path:
    """A recipe writing under `directory`, which starts with a copy of the reference run's checkpoints."""
    shutil.copytree(reference / "checkpoints", directory / "checkpoints")
    return _recipe(directory, model)


def test_resume_skips_incomplete_checkpoints_and_continues_from_the_last_complete_one(reference, tiny_model,
                                                                                     tmp_path):
    ref_dir, expected = reference
    recipe = _copy_run(ref_dir, tmp_path, tiny_model)
    checkpoints = _checkpoints(tmp_path)
    with open(checkpoints[12] / "optimizer.pt", "r+b") as handle:  # cut short (a copy interrupted, a full disk)
        handle.truncate(100)
    (checkpoints[10] / RECORD).unlink()  # the process died while saving: the record is written last
    (checkpoints[8] / "scheduler.pt").unlink()  # a file missing
    for step in (12, 10, 8):
        assert incomplete_reason(checkpoints[step]) is not None
    with pytest.raises(RecipeError, match="incomplete checkpoint .*pass --force-resume"):
        select_checkpoint(load_recipe(recipe), str(checkpoints[10]))
    for not_one in (checkpoints[10].parent, tmp_path):  # the checkpoint root, or any directory: said as such first
        with pytest.raises(RecipeError, match=r"not a checkpoint directory \(no trainer_state.json\); check --resume"):
            select_checkpoint(load_recipe(recipe), str(not_one))

    code, child = run([str(recipe), "--resume"], tmp_path / "log")
    assert code == 0, child.err()[-3000:]
    notices = [line for line in child.out().splitlines() if line.startswith("notice: skipping")]
    assert len(notices) == 3, child.out()
    assert "optimizer.pt has 100 bytes" in notices[0] and f"no {RECORD}" in notices[1]
    assert "scheduler.pt is missing" in notices[2]
    assert f"resuming from {checkpoints[6]}" in child.out()
    got = _adapter(tmp_path)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert incomplete_reason(checkpoints[12]) is None  # rewritten by the resumed run, record and all


def test_resume_refuses_a_checkpoint_from_another_recipe_or_data_unless_forced(reference, tiny_model, tmp_path,
                                                                              capsys):
    ref_dir, _ = reference
    recipe = _copy_run(ref_dir, tmp_path, tiny_model)
    last = str(_checkpoints(tmp_path)[MAX_STEPS])
    # What may change on resume: outputs, logging, save cadence, the run's length, the data's path.
    data_copy = tmp_path / "moved.jsonl"
    shutil.copy(ROOT / "data" / "sample.jsonl", data_copy)
    neutral = ["training.max_steps=20", "training.save_steps=4", "training.logging_steps=5",
               "wandb.run_name=longer", f"output.dir={tmp_path}/elsewhere", f"data.path={data_copy}"]
    assert select_checkpoint(load_recipe(recipe, neutral), "auto") == last
    # What may not: anything that shapes the trained weights, and the data's content.
    for override, expected in [("lora.r=4", "lora.r: 8 -> 4"), ("training.learning_rate=1e-3",
                                                                 "training.learning_rate: 0.003 -> 0.001"),
                               ("data.system_prompt=Be brief.", "data.system_prompt: None -> 'Be brief.'")]:
        with pytest.raises(RecipeError) as info:
            select_checkpoint(load_recipe(recipe, [override]), "auto")
        assert f"made from a different recipe ({expected})" in str(info.value) and "--force-resume" in str(
            info.value)
    lines = data_copy.read_text(encoding="utf-8").splitlines()
    data_copy.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # one record fewer
    with pytest.raises(RecipeError, match="made from different data"):
        select_checkpoint(load_recipe(recipe, [f"data.path={data_copy}"]), "auto")
    # Forced: used, with a notice.
    capsys.readouterr()
    assert select_checkpoint(load_recipe(recipe, ["lora.r=4"]), "auto", force=True) == last
    assert "resuming anyway (--force-resume)" in capsys.readouterr().out


def test_the_fingerprint_covers_every_file_the_recipe_names_and_upstream_defaults(make_recipe, tmp_path,
                                                                                  monkeypatch):
    from sft_lora.fingerprint import check_fingerprint, fingerprint, weights_view

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}", encoding="utf-8")
    path = make_recipe(data={"chat_template": str(template)})
    recipe = load_recipe(path)
    saved = fingerprint(recipe)
    assert set(saved["files_sha256"]) == {"data.path", "data.chat_template", "model.tokenizer"}
    view = weights_view(recipe)
    assert view["training.adam_beta2"] == 0.999  # an upstream default the recipe never names is compared too
    assert not [k for k in view if k.startswith(("training.logging", "training.save", "output.", "wandb."))]
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / RECORD).write_text(json.dumps(saved), encoding="utf-8")
    check_fingerprint(checkpoint, load_recipe(path, ["training.logging_steps=7",  # neutral: accepted
                                                     "training.ddp_find_unused_parameters=false"]))
    # a record made before a key was found neutral holds it: no difference (every checkpoint made before
    # ddp_find_unused_parameters became neutral was refused as "a different recipe")
    (checkpoint / RECORD).write_text(json.dumps({**saved, "weights_view": {
        **saved["weights_view"], "training.ddp_find_unused_parameters": None}}), encoding="utf-8")
    check_fingerprint(checkpoint, load_recipe(path))
    # a checkpoint from when wrapped packing was made padding-free: the difference inside a mapping is shown (cut at
    # 40 characters, it read as a dtype change), and how to continue that run
    (checkpoint / RECORD).write_text(json.dumps({**saved, "weights_view": {
        **saved["weights_view"], "training.padding_free": True, "training.packing": True,
        "training.packing_strategy": "wrapped", "training.model_init_kwargs": {
            **saved["weights_view"]["training.model_init_kwargs"], "attn_implementation": "flash_attention_9"}}}),
        encoding="utf-8")
    wrapped = load_recipe(path, ["training.packing=true", "training.packing_strategy=wrapped"])
    with pytest.raises(RecipeError, match=r"\(training.model_init_kwargs.attn_implementation: 'flash_attention_9' "
                       r"-> '<unset>', training.padding_free: True -> False\); the recipe sets none of these: a "
                       r"default or sft_lora's own choice changed since \(an upgrade\?\); to continue as it was "
                       r"trained, set training.padding_free=true;"):
        check_fingerprint(checkpoint, wrapped)
    (checkpoint / RECORD).write_text(json.dumps(saved), encoding="utf-8")
    # another number of processes: another global batch, so other steps and epochs (a 1-process run resumed under 2
    # finished "48 steps (1 epoch)" of a 2-epoch run, exit 0); a record from before world_size was 1 process
    recipe = load_recipe(path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch sets it in each process
    with pytest.raises(RecipeError, match=r"made from another launch \(world_size: 1 -> 2\); resume with the "
                       r"recipe \(and accelerate config: processes, DeepSpeed/FSDP\)"):
        check_fingerprint(checkpoint, recipe)
    monkeypatch.delenv("WORLD_SIZE")
    (checkpoint / RECORD).write_text(json.dumps({**saved, "weights_view": {
        k: v for k, v in saved["weights_view"].items() if k != "world_size"}}), encoding="utf-8")
    check_fingerprint(checkpoint, load_recipe(path))
    (checkpoint / RECORD).write_text(json.dumps(saved), encoding="utf-8")
    template.write_text(template.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # same path, new content
    with pytest.raises(RecipeError, match="made from a different chat template"):
        check_fingerprint(checkpoint, load_recipe(path))
    data = saved["files_sha256"]["data.path"]  # a data mix: each file's content, with its weight and source
    mixed = [fingerprint(load_recipe(path, [f"data.path=[{SAMPLE}, {{path: {SAMPLE}, weight: {w}}}]"]))
             for w in (0.5, 0.25)]
    assert [m["files_sha256"]["data.path"] for m in mixed] == [f"{data}+{data}*0.5@None", f"{data}+{data}*0.25@None"]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_saves_a_checkpoint_at_the_next_step_and_exits_143(tiny_model, tmp_path, stop):
    """Acceptance: a real `python -m sft_lora.run` process, SIGTERM mid-training; SIGHUP (the terminal closed) too:
    it ended the run at once, with no checkpoint."""
    recipe = _recipe(tmp_path, tiny_model, max_steps=500, save_steps=1000)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "sft_lora.run", str(recipe)], cwd=ROOT, env=env,
                                   stdout=out, stderr=err)
        seen = 0
        while seen < 2 and process.poll() is None:
            time.sleep(0.01)
            seen = (tmp_path / "out").read_text().count("{'loss'")
        process.send_signal(stop)
        code = process.wait(timeout=300)
    stderr = (tmp_path / "err").read_text()
    assert code == 128 + stop, stderr[-3000:]
    checkpoints = _checkpoints(tmp_path)
    assert len(checkpoints) == 1, "one checkpoint, made for the signal (save_steps is 1000)"
    (step, checkpoint), = checkpoints.items()
    assert seen <= step < 500 and incomplete_reason(checkpoint) is None
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert f"interrupted: stopped by {stop.name} at step {step}; checkpoint saved to {checkpoint}" in stderr
    # the exact command, naming the checkpoint just saved (a bare --resume took the newest complete one, which may
    # be another, longer run's)
    assert f"to continue: {sys.executable} -m sft_lora.run {recipe} --resume {checkpoint}\n" in stderr
    assert not (tmp_path / "final_model").exists(), "an unfinished run writes no final adapters"
    # The checkpoint resumes: two more steps.
    code, child = run([str(recipe), f"training.max_steps={step + 2}", "--resume"], tmp_path / "resume")
    assert code == 0, child.err()[-3000:]
    assert f"resuming from {checkpoint}" in child.out() and f"trained to step {step + 2}" in child.out()


def test_every_rank_stops_at_the_step_the_reduced_stop_flag_names(monkeypatch):
    """A signal handled just after a step's all-reduce waits for the next step's: read at once, it stopped that rank
    alone while the others went on into the next step's collective (gloo: "collective mismatch", no checkpoint)."""
    import types

    from transformers import TrainerControl

    import sft_lora.callbacks
    from sft_lora.callbacks import GracefulStop

    stop = GracefulStop()

    def all_reduce(flag, op):  # the other rank had no signal; this one's handler runs right after the collective
        stop.signum = signal.SIGTERM

    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda: 2,
                                 all_reduce=all_reduce, ReduceOp=types.SimpleNamespace(MAX="max"))
    monkeypatch.setattr(sft_lora.callbacks, "dist", fake)
    args, control = types.SimpleNamespace(device="cpu"), TrainerControl()
    stop.on_step_end(args, None, control)
    assert not control.should_training_stop and stop.stopped is None, "this step's reduced flag said: no signal"
    fake.all_reduce = lambda flag, op: None  # the next step: this rank's flag, the maximum
    stop.on_step_end(args, None, control)
    assert control.should_training_stop and control.should_save and stop.stopped == signal.SIGTERM


class _BlockAtStep3(TrainerCallback):
    """Blocks the training loop at step 3 until `release` exists: a very long step."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            (self.directory / "blocked").touch()
            while not (self.directory / "release").exists():
                time.sleep(0.02)


def _block_at_step_3(directory: str) -> None:
    """Child setup: every trainer built in this process gets `_BlockAtStep3`."""
    import sft_lora.trainer

    original = sft_lora.trainer.build_trainer

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(_BlockAtStep3(directory))
        return trainer

    sft_lora.trainer.build_trainer = build


@pytest.mark.parametrize("then", ["signal again", "let the step finish"])
def test_sigint_stops_at_the_step_boundary_and_a_second_signal_exits_at_once(tiny_model, tmp_path, then):
    import functools

    recipe = write_recipe(tmp_path, tiny_model, data={"eval_split": 0.15}, training={
        "max_steps": 500, "save_steps": 1000, "logging_steps": 1, "disable_tqdm": True, "eval_strategy": "steps",
        "eval_steps": 4})  # an evaluation due at the step that stops
    child = Child([str(recipe)], tmp_path / "log", setup=functools.partial(_block_at_step_3, str(tmp_path)))
    assert child.wait_for(lambda: (tmp_path / "blocked").exists()), child.err()[-3000:]
    os.kill(child.pid, signal.SIGINT)
    assert child.wait_for(lambda: "SIGINT: saving a checkpoint after this step" in child.err())
    assert child.process.is_alive(), "the first signal does not end the run"
    if then == "signal again":
        os.kill(child.pid, signal.SIGINT)
        assert child.join() == 130
        assert "SIGINT again: exiting now without saving" in child.err()
        assert _checkpoints(tmp_path) == {}, "nothing saved: the second signal does not wait for the step"
    else:
        (tmp_path / "release").touch()
        assert child.join() == 130
        # Step 3 was past its stop check when the signal came; the stop happened at the end of step 4.
        assert list(_checkpoints(tmp_path)) == [4] and incomplete_reason(_checkpoints(tmp_path)[4]) is None
        assert "interrupted: stopped by SIGINT at step 4" in child.err()
        # no evaluation on the way out (Trainer runs it before the save; a preemption's grace period may not last)
        history = json.loads((_checkpoints(tmp_path)[4] / "trainer_state.json").read_text())["log_history"]
        assert [log["step"] for log in history if "eval_loss" in log] == [0]
    assert not (tmp_path / "final_model").exists()


def _block_while_tokenizing(directory: str, after: int = 0) -> None:
    """Child setup: every tokenizing batch past the first `after` of a process (in datasets' worker processes) marks
    that it started, then waits."""
    import sft_lora.prepare

    tokenize, done = sft_lora.prepare.tokenize_conversations, []

    def slow(*args, **kwargs):
        if len(done) >= after:
            Path(directory, "tokenizing").touch()
            time.sleep(120)
        done.append(True)
        return tokenize(*args, **kwargs)

    sft_lora.prepare.tokenize_conversations = slow


def _own_group_blocking_while_tokenizing(directory: str, after: int = 0) -> None:
    os.setpgid(0, 0)  # Ctrl-C in a terminal signals the whole foreground group: here the child's alone
    _block_while_tokenizing(directory, after)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_worker_processes_tokenize_ends_the_run_in_one_line(tiny_model, tmp_path, stop):
    """With training.dataset_num_proc: 2 the workers inherited the handler that turns SIGTERM into an exception: the
    pool's own SIGTERM to them raised it inside them, and the run hung until SIGKILL. Ctrl-C reaches the workers too
    (the terminal signals the group): each printed its KeyboardInterrupt traceback above the one line. The shards
    the workers were writing stayed in the prepared-data cache."""
    import functools

    data = tmp_path / "d.jsonl"  # 3 batches of 1,000 a worker: each has written one when the second blocks
    data.write_text(SAMPLE.read_text(encoding="utf-8") * 27, encoding="utf-8")
    recipe = write_recipe(tmp_path, tiny_model, data={"path": str(data), "eval_split": 0},
                          training={"dataset_num_proc": 2})
    setup = _own_group_blocking_while_tokenizing if stop == signal.SIGINT else _block_while_tokenizing
    child = Child([str(recipe)], tmp_path / "log", env={"SFT_LORA_CACHE": str(tmp_path / "cache")},
                  setup=functools.partial(setup, str(tmp_path), after=1))
    assert child.wait_for(lambda: (tmp_path / "tokenizing").exists()), child.err()[-3000:]
    (os.killpg if stop == signal.SIGINT else os.kill)(child.pid, stop)
    assert child.join(timeout=60) == 128 + stop, child.err()[-3000:]
    assert f"interrupted: {stop.name} outside the training loop; finished outputs are kept" in child.err()
    assert "Traceback" not in child.err()
    assert not list((tmp_path / "cache").rglob("tmp*")), "each worker's unfinished shard is removed"


def _own_group_and_slow_dataloader_workers(directory: str) -> None:
    """Child setup: a process group of its own (a signal to it reaches the dataloader workers, as scancel's does), and
    workers that mark that they are starting, then take 2 s there (after torch's handlers, before the worker's init)."""
    import multiprocessing

    from torch.utils.data._utils import signal_handling

    os.setpgid(0, 0)
    multiprocessing.set_start_method("fork", force=True)  # as in `python -m sft_lora.run` (a forkserver's child here)
    set_handlers = signal_handling._set_worker_signal_handlers

    def slow(*args):
        set_handlers(*args)
        Path(directory, "worker starting").touch()
        time.sleep(2)

    signal_handling._set_worker_signal_handlers = slow


def test_sigterm_to_the_process_group_with_dataloader_workers_saves_a_checkpoint(tiny_model, tmp_path):
    """SIGTERM to the whole group (scancel, systemd, a closed terminal) killed the dataloader workers too: "DataLoader
    worker killed by signal: Terminated", exit 1, no checkpoint; a worker still starting died of it even after they
    learnt to let it pass."""
    import functools

    recipe = _recipe(tmp_path, tiny_model, max_steps=500, save_steps=1000, dataloader_num_workers=2)
    child = Child([str(recipe)], tmp_path / "log",
                  setup=functools.partial(_own_group_and_slow_dataloader_workers, str(tmp_path)))
    assert child.wait_for(lambda: (tmp_path / "worker starting").exists()), child.err()[-3000:]
    os.killpg(child.pid, signal.SIGTERM)
    assert child.join(timeout=120) == 143, child.err()[-3000:]
    (step, checkpoint), = _checkpoints(tmp_path).items()
    assert f"interrupted: stopped by SIGTERM at step {step}; checkpoint saved to {checkpoint}" in child.err()
    assert incomplete_reason(checkpoint) is None and "Traceback" not in child.err()


def test_dataloader_workers_are_set_up_once_however_often_a_loader_is_handed_out():
    """With dataloader_persistent_workers Trainer hands the same eval loader out at each evaluation: each wrapped the
    worker init again, one more layer per evaluation."""
    from sft_lora.callbacks import _worker_passes_stop_signals, parent_stops_workers

    loader = torch.utils.data.DataLoader(range(4), num_workers=1)
    assert parent_stops_workers(parent_stops_workers(loader)) is loader
    assert loader.worker_init_fn.func is _worker_passes_stop_signals and loader.worker_init_fn.args == (None,)
    assert list(loader) == [torch.tensor([n]) for n in range(4)]  # the workers start and serve as before


def test_signals_nohup_ignores_stay_ignored():
    """`nohup` ignores SIGHUP so that training outlives the terminal: sft_lora's handlers took it back, and closing
    the terminal stopped the run (in training with a checkpoint, outside it at once)."""
    from sft_lora.atomic import signals_interrupt
    from sft_lora.callbacks import GracefulStop

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # not ignored: taken
            stop = GracefulStop()
            stop.on_train_begin(None, None, None)
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            stop.restore()
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_the_fingerprint_sees_eos_token_and_the_base_models_tokenizer(tiny_model, tmp_path):
    """TrainingArguments.to_dict() hides every *_token field as "<EOS_TOKEN>", so a changed training.eos_token (other
    labels) resumed silently; so did an edited tokenizer or chat template inside a local model.name_or_path."""
    from sft_lora.fingerprint import check_fingerprint, fingerprint

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    path = write_recipe(tmp_path, model)
    saved = fingerprint(load_recipe(path))
    assert saved["weights_view"]["training.eos_token"] is None and "hub_token" not in str(saved["weights_view"])
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / RECORD).write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"made from a different recipe \(training.eos_token: None -> '<pad>'\)"):
        check_fingerprint(checkpoint, load_recipe(path, ["training.eos_token=<pad>"]))
    template = model / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8").replace("<|", "[["), encoding="utf-8")
    with pytest.raises(RecipeError, match="made from a different tokenizer or chat template in model.name_or_path"):
        check_fingerprint(checkpoint, load_recipe(path))
    # records written before: the placeholder and no tokenizer hash; nothing to compare them with, so accepted
    old = {**saved, "files_sha256": {k: v for k, v in saved["files_sha256"].items() if k != "model.tokenizer"},
           "weights_view": {**saved["weights_view"], "training.eos_token": "<EOS_TOKEN>"}}
    (checkpoint / RECORD).write_text(json.dumps(old), encoding="utf-8")
    check_fingerprint(checkpoint, load_recipe(path, ["training.eos_token=<pad>"]))


def test_checkpoints_vouch_for_the_data_as_read_not_as_edited_while_preparing(tiny_model, tmp_path, monkeypatch):
    """The fingerprint was taken once the data was prepared (minutes at 1 M records): a data file edited meanwhile
    was recorded as the checkpoints' data, so --resume accepted the edit and refused the data trained on."""
    import sft_lora.prepare as prepare_module
    import sft_lora.run as run_module
    from sft_lora.fingerprint import file_sha256

    data = tmp_path / "d.jsonl"
    shutil.copy(SAMPLE, data)
    trained = file_sha256(data)
    read = prepare_module.load_inputs

    def read_then_edit(recipe):
        inputs = read(recipe)
        data.write_text(data.read_text(encoding="utf-8") + '{"input": "edited", "output": "meanwhile"}\n',
                        encoding="utf-8")
        return inputs

    monkeypatch.setattr(prepare_module, "load_inputs", read_then_edit)
    path = write_recipe(tmp_path, tiny_model, data={"path": str(data), "eval_split": None},
                        training={"max_steps": 2, "save_steps": 2}, report={"smoke_prompts": 0})
    assert run_module.main([str(path)]) == 0
    record = json.loads((_checkpoints(tmp_path)[2] / RECORD).read_text(encoding="utf-8"))
    assert record["files_sha256"]["data.path"] == trained != file_sha256(data)


def test_what_a_killed_writer_left_is_removed_by_the_next_write_and_a_live_ones_is_not(tmp_path):
    """A merge killed by SIGKILL left `lora_merged.tmp-PID` (GBs for an 8B model) that nothing removed; directories
    of the user's with such names (a backup `lora_merged.tmp-keep`, `.old-2024`) are never touched."""
    from sft_lora.atomic import PARTIAL, atomic_dir

    dead = subprocess.Popen(["true"])
    dead.wait()
    final = tmp_path / "lora_merged"
    final.mkdir()
    killed = final.with_name(f"lora_merged.tmp-{dead.pid}")
    alive = final.with_name(f"lora_merged.tmp-{os.getppid()}")
    users = [final.with_name(f"lora_merged.{name}") for name in ("tmp-keep", "old-2024", f"tmp-{dead.pid + 1}")]
    for path in (killed, alive, *users):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    for path in (killed, alive):  # what atomic_dir writes into its own
        (path / PARTIAL).touch()
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert not killed.exists() and alive.is_dir() and all(path.is_dir() for path in users)
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors"]
    assert (final / "model.safetensors").read_bytes() == b"whole"
    # a file's too: a killed writer's sft_lora_recipe.tmp-PID.yaml stayed in its checkpoint, and the checkpoint's
    # next record listed it among the checkpoint's files
    from sft_lora.atomic import write_atomic

    recipe = tmp_path / "sft_lora_recipe.yaml"
    killed, alive = (tmp_path / f"sft_lora_recipe.tmp-{pid}.yaml" for pid in (dead.pid, os.getppid()))
    users = [tmp_path / "sft_lora_recipe.tmp-notes.yaml", tmp_path / "sft_lora_recipe.tmp-1.json"]
    for path in (killed, alive, *users):
        path.write_text("x", encoding="utf-8")
    write_atomic(recipe, "whole")
    assert not killed.exists() and alive.exists() and all(p.exists() for p in users)


def test_a_checkpoint_saved_again_over_one_killed_while_writing_its_record_is_complete(tmp_path, tiny_model):
    """Killed while writing checkpoint-6's record, a run left `sft_lora_checkpoint.tmp-PID.json` there; the resumed
    run saved checkpoint-6 again and listed that file in the new record, whose own write then removed it: the
    checkpoint read as incomplete ("missing") and a later resume went back further (test_sigkill_… caught it)."""
    from types import SimpleNamespace

    from sft_lora.callbacks import CheckpointRecord

    dead = subprocess.Popen(["true"])
    dead.wait()
    recipe = load_recipe(_recipe(tmp_path, tiny_model))
    checkpoint = recipe.checkpoint_dir / "checkpoint-6"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    (checkpoint / RECORD.replace(".json", f".tmp-{dead.pid}.json")).write_text('{"step": 6, "fi')  # cut short
    state = SimpleNamespace(global_step=6, is_world_process_zero=True, log_history=[])
    CheckpointRecord(recipe).on_save(SimpleNamespace(output_dir=str(recipe.checkpoint_dir)), state, None)
    assert incomplete_reason(checkpoint) is None
    assert sorted(json.loads((checkpoint / RECORD).read_text())["files"]) == [
        "README.md", "adapter_model.safetensors", "sft_lora_recipe.yaml", "trainer_state.json"]


def test_a_run_that_builds_its_tiny_model_fingerprints_its_tokenizer(tmp_path):
    """The fingerprint was taken before the tiny model was built: the run's checkpoints named no tokenizer, so an
    edited tokenizer or chat template in it resumed silently."""
    from sft_lora.run import main

    path = write_recipe(tmp_path, tmp_path / "tiny", model={"build_tiny": True}, data={"eval_split": None},
                        training={"max_steps": 2, "save_steps": 2}, report={"smoke_prompts": 0})
    assert main([str(path)]) == 0
    record = json.loads((_checkpoints(tmp_path)[2] / RECORD).read_text(encoding="utf-8"))
    assert "model.tokenizer" in record["files_sha256"]
    template = tmp_path / "tiny" / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8").replace("<|", "[["), encoding="utf-8")
    with pytest.raises(RecipeError, match="made from a different tokenizer or chat template in model.name_or_path"):
        select_checkpoint(load_recipe(path, ["training.max_steps=4"]), "auto")
