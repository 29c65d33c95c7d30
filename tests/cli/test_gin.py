"""Every gin file parses and finalizes; model files equal the named configs;
missing REQUIRED macros and bad bindings fail with a message naming the fix."""

from pathlib import Path

import gin
import pytest

from switch_jax.cli import gin_config
from switch_jax.config import NAMED_CONFIGS
from switch_jax.errors import UserError
from switch_jax.cli.resources import gin_dir

GIN = gin_dir()
MODEL_FILES = sorted(p.stem for p in (GIN / "models").glob("*.gin"))
RUN_FILES = sorted(p.name for p in (GIN / "runs").glob("*.gin"))
REQUIRED = ['MODEL_DIR = "/tmp/x"', 'MIXTURE_OR_TASK_NAME = "embedded_span_corruption"',
            "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}", "TRAIN_STEPS = 10",
            'INITIAL_CHECKPOINT_PATH = "/tmp/ckpt"', 'CHECKPOINT_PATH = "/tmp/ckpt"',
            'TEACHER_CHECKPOINT_PATH = "/tmp/teacher"', 'INFER_OUTPUT_FILE = "/tmp/p.jsonl"']


def _model_config():
  return gin.get_configurable("ModelConfig")()


def test_every_named_config_has_a_model_file():
  assert set(MODEL_FILES) == set(NAMED_CONFIGS)


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_file_equals_named_config(name):
  gin_config.parse([f"models/{name}.gin"], [])
  assert _model_config() == NAMED_CONFIGS[name]


@pytest.mark.parametrize("run_file", RUN_FILES)
def test_run_files_parse_and_finalize(run_file):
  gin_config.parse(["models/tiny_switch.gin", f"runs/{run_file}", "precision/bfloat16.gin",
                    "mesh/cpu8.gin"], REQUIRED)
  gin.finalize()
  assert _model_config().dtype == "bfloat16"
  if run_file in ("pretrain.gin", "finetune.gin", "distill.gin", "upcycle.gin"):
    assert gin_config.query("train.mesh_shape") == (2, 4, 1)
    assert gin_config.query("train.model_dir") == "/tmp/x"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(GIN)) for d in ("precision", "mesh")
                                        for p in (GIN / d).glob("*.gin")))
def test_precision_and_mesh_files_parse(path):
  gin_config.parse(["models/tiny_dense.gin", "runs/pretrain.gin", path], REQUIRED[:4])
  gin.finalize()


@pytest.mark.parametrize("run_file,required", [
    ("eval.gin", ["CHECKPOINT_PATH", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS"]),
    ("infer.gin", ["CHECKPOINT_PATH", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS",
                   "INFER_OUTPUT_FILE"])])
def test_eval_and_infer_files_name_their_required_flags(run_file, required):
  # README and `switch-jax eval`'s docstring cite these files.
  with pytest.raises(UserError) as raised:
    gin_config.parse([f"runs/{run_file}"], [])
  message = str(raised.value)
  assert message.startswith(f"gin: {', '.join(sorted(required))} must be set (marked %gin.REQUIRED)")
  for name in required:
    assert gin_config.REQUIRED_HINTS[name] in message
  gin_config.parse([f"runs/{run_file}", "mesh/cpu8.gin"], REQUIRED)
  function, scope = {"eval.gin": ("evaluate", "eval"), "infer.gin": ("infer", "infer")}[run_file]
  assert gin_config.query(f"{function}.checkpoint_path") == "/tmp/ckpt"
  assert gin_config.query(f"{function}.mesh_shape") == (2, 4, 1)
  assert gin_config.query(f"{scope}/DatasetConfig.mixture_or_task_name") == (
      "embedded_span_corruption")
  assert gin_config.query(f"{scope}/DatasetConfig.split") == "validation"
  if function == "infer":
    assert gin_config.query("infer.output_file") == "/tmp/p.jsonl"


def test_finetune_resets_to_the_paper_settings():
  gin_config.parse(["models/tiny_switch.gin", "runs/finetune.gin"], REQUIRED)
  cfg = _model_config()
  assert (cfg.dropout_rate, cfg.expert_dropout) == (0.1, 0.4)
  assert gin_config.query("InitConfig.checkpoint_path") == "/tmp/ckpt"


def test_each_knob_is_one_binding():
  bindings = ["ModelConfig.train_capacity_factor = 1.0", "ModelConfig.router = 'top2'",
              "ModelConfig.num_experts = 16", "ModelConfig.aux_loss_factor = 0.001",
              "ModelConfig.router_z_loss_factor = 0.001", "ModelConfig.expert_dropout_rate = 0.3",
              "ModelConfig.dtype = 'bfloat16'"]
  gin_config.parse(["models/tiny_switch.gin", "runs/pretrain.gin"], REQUIRED[:4] + bindings)
  cfg = _model_config()
  assert (cfg.train_capacity_factor, cfg.router, cfg.num_experts, cfg.aux_loss_factor,
          cfg.router_z_loss_factor, cfg.expert_dropout, cfg.dtype) == (
              1.0, "top2", 16, 0.001, 0.001, 0.3, "bfloat16")


def test_missing_required_macro_names_the_flag():
  with pytest.raises(UserError, match=r"MODEL_DIR, TRAIN_STEPS must be set.*--gin.MODEL_DIR="):
    gin_config.parse(["models/tiny_switch.gin", "runs/pretrain.gin"], REQUIRED[1:3])


@pytest.mark.parametrize("binding,message", [
    ("ModelConfig.num_expert = 8", "doesn't have a parameter named 'num_expert'"),
    ("NoSuchThing.x = 1", "No configurable matching 'NoSuchThing'"),
    ("ModelConfig.num_experts = (", "gin:"),
])
def test_bad_bindings_are_user_errors(binding, message):
  with pytest.raises(UserError, match=message):
    gin_config.parse(["models/tiny_switch.gin"], [binding])


def test_missing_gin_file_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="no file 'nope.gin'"):
    gin_config.parse(["nope.gin"], [])
  own = Path(tmp_path) / "mine.gin"
  own.write_text("include 'models/tiny_dense.gin'\nModelConfig.d_model = 48\n")
  gin_config.parse([str(own)], [])
  assert _model_config().d_model == 48


def test_includes_resolve_when_the_working_directory_has_a_runs_folder(tmp_path, monkeypatch):
  # The quickstart and experiments write ./runs; gin's package lookup of
  # 'runs/pretrain.gin' (an include of runs/finetune.gin) found that folder as
  # a namespace package and crashed with a TypeError.
  (tmp_path / "runs").mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  gin_config.parse(["runs/finetune.gin"], ['MODEL_DIR = "/tmp/m"', 'MIXTURE_OR_TASK_NAME = "t"',
                                           "TASK_FEATURE_LENGTHS = {}", "TRAIN_STEPS = 1",
                                           'INITIAL_CHECKPOINT_PATH = "/tmp/c"'])
  assert gin_config.query("BATCH_SIZE/macro.value") == 128


def _parser(command):
  import argparse  # pylint: disable=import-outside-toplevel
  import importlib  # pylint: disable=import-outside-toplevel
  from switch_jax.cli import main as cli  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog=command)
  importlib.import_module(cli.SUBCOMMANDS[command][0]).add_arguments(parser)
  return parser


@pytest.mark.parametrize("command", ["train", "eval", "infer", "plan"])
def test_one_spelling_for_emulated_devices_and_the_mesh(command):
  extra = ["--model", "tiny_switch", "--batch_size", "8"] if command == "plan" else []
  new = _parser(command).parse_args([*extra, "--num_cpu_devices=4", "--mesh_shape=2,2,1"])
  old = _parser(command).parse_args([*extra, "--emulate_devices=4", "--mesh=2,2,1"])
  assert (new.num_cpu_devices, new.mesh_shape) == (old.num_cpu_devices, old.mesh_shape) == (
      4, "2,2,1")
  text = " ".join(_parser(command).format_help().split())
  assert "--emulate_devices is a deprecated alias" in text
  assert "--mesh is a deprecated alias" in text


def test_train_mesh_flag_overrides_the_mesh_file_and_the_error_names_the_device_flag(
    tmp_path, capsys):
  from switch_jax.cli import main as cli  # pylint: disable=import-outside-toplevel
  code = cli.main(["train", "--gin_file=models/tiny_switch.gin", "--gin_file=runs/pretrain.gin",
                   "--gin_file=mesh/cpu8.gin", "--mesh_shape=16,1,1",
                   *[f"--gin.{b.replace(' = ', '=', 1)}" for b in REQUIRED[:4]],
                   f'--gin.MODEL_DIR="{tmp_path / "run"}"'])
  err = capsys.readouterr().err
  assert code == 2 and "mesh shape (16, 1, 1) needs a multiple of 16 devices, but 8" in err
  assert "--num_cpu_devices=16" in err and "Traceback" not in err
  assert not (tmp_path / "run").exists()


def test_mesh_file_without_enough_devices_names_the_flag():
  from switch_jax import partitioning  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match="mesh/cpu8.gin needs --num_cpu_devices=8"):
    partitioning.resolve_mesh_shape((2, 4, 1), 1)


def test_gin_bindings_flag_as_in_t5x(capsys):
  from switch_jax.cli import main as cli  # pylint: disable=import-outside-toplevel
  from switch_jax.cli.commands import gin_flags  # pylint: disable=import-outside-toplevel
  code = cli.main(["train", "--gin_file=models/tiny_switch.gin", "--gin_file=runs/pretrain.gin",
                   "--gin_bindings=MODEL_DIR = '/tmp/x'", "--gin_bindings", "TRAIN_STEPS = 3"])
  err = capsys.readouterr().err
  assert code == 2
  assert "gin: MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS must be set" in err, err
  assert gin_flags.split_gin_flags(
      ["--gin.A=1", "--gin_bindings=B = 'x'", "--gin_bindings", "C = (1, 2)", "--other"]) == (
          ["--other"], ["A = 1", "B = 'x'", "C = (1, 2)"])


@pytest.mark.parametrize("binding,value", [("MODEL_DIR = /tmp/x", "/tmp/x"),
                                           ("make_optimizer.name = adam", "adam")])
def test_an_unquoted_string_gets_a_hint_naming_the_binding(binding, value):
  name = binding.split(" = ")[0]
  with pytest.raises(UserError) as raised:
    gin_config.parse(["models/tiny_switch.gin", "runs/pretrain.gin"], [binding])
  assert (f"the binding `{name} = {value}` needs quotes around its string, escaped for the "
          f'shell: --gin.{name}=\\"{value}\\"') in str(raised.value)


@pytest.mark.parametrize("old,new", [("train.eval_period = 500", "EvalConfig.period"),
                                     ("train.initialization = 'upcycle'", "InitConfig.mode")])
def test_a_setting_train_took_itself_names_its_new_binding(old, new):
  with pytest.raises(UserError, match=rf"{old.split(' = ')[0]} is now {new}"):
    gin_config.parse(["models/tiny_switch.gin", "runs/pretrain.gin"], REQUIRED[:4] + [old])


def test_run_files_bind_every_group_of_train_settings():
  gin_config.parse(["models/tiny_switch.gin", "runs/distill.gin"], REQUIRED)
  assert gin_config.query("DistillConfig.teacher_checkpoint_path") == "/tmp/teacher"
  assert gin_config.query("InitConfig.mode") == "shared"
  for group in ("loop", "evaluation", "checkpoint", "step_config", "init", "distill"):
    assert gin.query_parameter(f"train.{group}").selector.endswith("Config"), group
