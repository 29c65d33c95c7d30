"""Hugging Face SwitchTransformers import and export.

The HF model is the reference for the forward math: converted weights must
give equal logits and loss, with and without dropped tokens (HF's capacity
is per sequence), for ReLU and gated-GELU FFNs and tied and untied heads.
Plus round trips, the `convert` / `score` CLI, refusals of bad input, and
a training run used as a model: scored, exported, evaluated and decoded.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=wrong-import-position
from safetensors.numpy import load_file, save_file
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersAttention)
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

from switch_jax.checkpoints import model_format
from switch_jax.cli import main as cli
from switch_jax.model import losses
from switch_jax.config import get_config
from switch_jax.checkpoints import hf
from switch_jax.errors import UserError
from switch_jax.model.layers import relative_position_bucket
from switch_jax.model.encoder_decoder import EncoderDecoder
from switch_jax.model.param_count import abstract_params

VOCAB, D, F, E = 96, 32, 64, 4
# Right-padded batch: row 1 and 2 have padding in both inputs and targets.
_RNG = np.random.default_rng(0)
INPUTS = _RNG.integers(2, VOCAB, (3, 13)).astype(np.int32)
TARGETS = _RNG.integers(2, VOCAB, (3, 11)).astype(np.int32)
INPUTS[1, 9:], TARGETS[1, 7:], INPUTS[2, 5:], TARGETS[2, 3:] = 0, 0, 0, 0
DECODER_INPUTS = np.concatenate([np.zeros((3, 1), np.int32), TARGETS[:, :-1]], axis=1)
MAX_DIFFS = {}  # measured parity, printed at the end of the module for the record


def _hf_model(act="relu", tie=True, capacity=64, seed=0, **overrides):
  """A random HF model, 3 encoder and 2 decoder blocks, block 1 sparse in both."""
  kw = dict(vocab_size=VOCAB, d_model=D, d_ff=F, d_kv=16, num_heads=2, num_layers=3,
            num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
            num_experts=E, expert_capacity=capacity, router_jitter_noise=0.0, dropout_rate=0.0,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=tie)
  kw.update(overrides)
  torch.manual_seed(seed)
  model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**kw)).eval()
  if act == "gated-gelu":  # HF's Switch has no gated FFN: swap in T5's (gelu_new, wi_0/wi_1)
    t5 = transformers.T5Config(d_model=D, d_ff=F, dropout_rate=0.0, feed_forward_proj="gated-gelu")

    def gated():
      ffn = T5DenseGatedActDense(t5)
      for linear in (ffn.wi_0, ffn.wi_1, ffn.wo):
        torch.nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
      return ffn

    for stack in (model.encoder, model.decoder):
      for block in stack.block:
        ff = block.layer[-1]
        if ff.is_sparse:
          for j in range(E):
            ff.mlp.experts[f"expert_{j}"] = gated()
        else:
          ff.mlp = gated()
    model.config.dense_act_fn = "gated-gelu"
  if not tie:  # HF 5.x unties these too; released checkpoints hold copies of `shared`
    with torch.no_grad():
      model.encoder.embed_tokens.weight.copy_(model.shared.weight)
      model.decoder.embed_tokens.weight.copy_(model.shared.weight)
  return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """(act, tie, capacity) -> (HF model, its save_pretrained directory), cached."""
  cache = {}

  def get(act="relu", tie=True, capacity=64):
    if (act, tie, capacity) not in cache:
      model = _hf_model(act, tie, capacity)
      path = tmp_path_factory.mktemp(f"hf_{act}_{tie}_{capacity}")
      model.save_pretrained(path)
      cache[act, tie, capacity] = (model, path)
    return cache[act, tie, capacity]

  yield get
  print("\nmax abs differences vs HF:", json.dumps(MAX_DIFFS, indent=1))


@pytest.fixture(scope="module")
def checkpoint(hf_dir, tmp_path_factory):
  """Our checkpoint of the capacity-2 ReLU model."""
  path = tmp_path_factory.mktemp("converted") / "ckpt"
  model_format.save_model(path, *hf.load_hf_dir(hf_dir("relu", True, 2)[1]))
  return path


def _hf_forward(model, inputs, targets):
  """HF logits and its CE loss (no router terms without output_router_logits)."""
  decoder_inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(inputs, dtype=torch.long),
                attention_mask=torch.tensor(inputs > 0, dtype=torch.long),
                decoder_input_ids=torch.tensor(decoder_inputs, dtype=torch.long),
                labels=torch.tensor(np.where(targets > 0, targets, -100), dtype=torch.long))
  return out.logits.numpy(), float(out.loss)


def _our_forward(config, params):
  apply = jax.jit(lambda p: EncoderDecoder(config).apply(
      {"params": p}, INPUTS, DECODER_INPUTS, TARGETS, deterministic=True, mutable=["moe"]))
  logits, state = apply(params)
  return np.asarray(logits), float(losses.router_metrics(state["moe"])["fraction_dropped"])


@pytest.mark.parametrize("act,tie,capacity", [("relu", True, 64), ("relu", False, 2),
                                              ("gated-gelu", True, 2),
                                              ("gated-gelu", False, 64)])
def test_logits_and_loss_match_hf(hf_dir, act, tie, capacity):
  model, path = hf_dir(act, tie, capacity)
  config, params = hf.load_hf_dir(path)
  assert (config.ffn_activation, config.tie_embeddings) == (
      {"relu": "relu", "gated-gelu": "geglu"}[act], tie)
  assert (config.expert_capacity, config.group_size, config.sparse_every,
          config.sparse_offset) == (capacity, None, 2, 1)
  hf_logits, hf_loss = _hf_forward(model, INPUTS, TARGETS)
  logits, dropped = _our_forward(config, params)
  real = TARGETS > 0  # padded positions differ by design (we mask padded queries)
  nll, _ = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(TARGETS))
  loss = float(jnp.sum(nll) / real.sum())
  logit_diff = float(np.abs(logits - hf_logits)[real].max())
  MAX_DIFFS[f"{act}/tie={tie}/capacity={capacity}"] = {
      "logits": logit_diff, "loss": abs(loss - hf_loss), "fraction_dropped": dropped}
  assert logit_diff < 1e-4
  assert abs(loss - hf_loss) < 1e-4
  if capacity < INPUTS.shape[1]:
    assert dropped > 0.2  # capacity 2 of 4 experts for up to 13 tokens
  else:
    assert abs(dropped) < 1e-6  # 1 - kept / assigned, in float32


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (16, 64), (6, 20)])
def test_relative_position_bucket_matches_hf(bidirectional, num_buckets, max_distance):
  rel = np.arange(-300, 301)
  ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
  hf_bucket = getattr(SwitchTransformersAttention, "_relative_position_bucket")
  theirs = hf_bucket(torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
                     max_distance=max_distance).numpy()
  np.testing.assert_array_equal(ours, theirs)
  assert (ours.min(), ours.max()) == (0, num_buckets - 1)  # distances reach every bucket


def _random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.unbox(abstract_params(config)))
  flat = {p: rng.normal(size=leaf.shape).astype(np.float32) for p, leaf in flat.items()}
  return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("act,tie", [("relu", True), ("geglu", False)])
def test_round_trip_ours_hf_ours_is_identity(tmp_path, act, tie):
  config = get_config("tiny_switch", vocab_size=VOCAB, ffn_activation=act, tie_embeddings=tie,
                      num_encoder_layers=3, group_size=None, expert_capacity=6,
                      ignore_padding_tokens=False, router_z_loss_factor=2e-3)
  params = _random_params(config)
  assert hf.config_from_hf(hf.config_to_hf(config)) == config
  back = hf.hf_to_params(hf.params_to_hf(params, config), config)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  hf.save_hf_dir(tmp_path / "hf", config, params)
  config2, params2 = hf.load_hf_dir(tmp_path / "hf")
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_config_mapping():
  config = hf.config_from_hf({"model_type": "switch_transformers", "num_layers": 12,
                              "num_sparse_encoder_layers": 6, "num_sparse_decoder_layers": 6,
                              "router_aux_loss_coef": 1e-3, "router_jitter_noise": 0.01})
  assert config.sparse_layers(12) == (1, 3, 5, 7, 9, 11)
  assert config.aux_loss_factor == pytest.approx(2e-3)  # two stacks, averaged over layers
  assert config.jitter_noise == 0.01 and config.dropout_rate == 0.1  # HF defaults
  # google/switch-base-8's config.json (transformers 4.26 era keys).
  base8 = hf.config_from_hf({
      "d_ff": 3072, "d_kv": 64, "d_model": 768, "decoder_sparse_step": 2, "dropout_rate": 0.1,
      "encoder_sparse_step": 2, "expert_capacity": 64, "is_gated_act": False,
      "num_decoder_layers": 12, "num_experts": 8, "num_heads": 12, "num_layers": 12,
      "num_sparse_decoder_layers": 6, "num_sparse_encoder_layers": 6, "router_type":
      "tokens_masked", "vocab_size": 32128, "dense_act_fn": "relu"})
  shape_fields = ("vocab_size", "d_model", "d_ff", "num_heads", "head_dim", "num_encoder_layers",
                  "num_decoder_layers", "ffn_activation", "tie_embeddings", "num_experts",
                  "sparse_every", "sparse_offset")
  named = get_config("switch_base_8")
  assert [getattr(base8, f) for f in shape_fields] == [getattr(named, f) for f in shape_fields]
  every_layer = hf.config_from_hf({"num_layers": 3, "num_sparse_encoder_layers": 3,
                                   "num_sparse_decoder_layers": 3})
  assert (every_layer.sparse_every, every_layer.sparse_offset) == (1, 0)
  # step 4 in a 2-layer encoder and a 4-layer decoder: block 1 only, i.e. every=4.
  odd = hf.config_from_hf({"num_layers": 2, "num_sparse_encoder_layers": 1,
                           "num_decoder_layers": 4, "num_sparse_decoder_layers": 1})
  assert odd.sparse_layers(2) == (1,) and odd.sparse_layers(4) == (1,)
  with pytest.raises(UserError, match="num_sparse_encoder_layers"):
    hf.config_from_hf({"num_layers": 4, "num_sparse_encoder_layers": 2,
                       "num_sparse_decoder_layers": 1})
  for bad, field in (({"router_bias": True}, "router_bias"),
                     ({"dense_act_fn": "silu"}, "dense_act_fn"),
                     ({"router_dtype": "float16"}, "router_dtype"),
                     ({"model_type": "t5"}, "model_type"),
                     ({"expert_capacity": 0}, "expert_capacity"),
                     ({"d_model": 2.5}, "d_model"), ({"num_experts": 0}, "num_experts"),
                     ({"router_type": "experts_choice"}, "router_type")):
    with pytest.raises(UserError, match=field):
      hf.config_from_hf(bad)


def test_export_loads_in_hf_with_equal_logits(tmp_path, hf_dir):
  for tie in (True, False):
    model, path = hf_dir("relu", tie, 2)
    config, params = hf.load_hf_dir(path)
    hf.save_hf_dir(tmp_path / f"export_{tie}", config, params)
    reloaded = SwitchTransformersForConditionalGeneration.from_pretrained(
        tmp_path / f"export_{tie}").eval()
    want, _ = _hf_forward(model, INPUTS, TARGETS)
    got, _ = _hf_forward(reloaded, INPUTS, TARGETS)
    np.testing.assert_array_equal(got, want)


def _write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


def test_cli_convert_score_and_export(tmp_path, hf_dir, capsys):
  model, path = hf_dir("relu", True, 2)  # capacity 2: tokens are dropped
  out = tmp_path / "ckpt"
  assert cli.main(["convert", "--from", "hf", "--hf_dir", str(path), "--out", str(out)]) == 0
  config, params = model_format.load_model(out)
  assert model_format.load_metadata(out)["source"].startswith("hf:")
  _, want = hf.load_hf_dir(path)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), want)

  examples = [{"inputs": list(map(int, INPUTS[i][INPUTS[i] > 0])),
               "targets": list(map(int, TARGETS[i][TARGETS[i] > 0]))} for i in range(3)]
  # Lengths 9..13 and 9..11: both batches of 3 pad to 16, so one compile.
  examples.append({"inputs": list(range(5, 15)), "targets": list(range(20, 29)),
                   "id": "extra keys are ignored"})
  file = _write_jsonl(tmp_path / "examples.jsonl", examples)
  capsys.readouterr()
  assert cli.main(["score", "--checkpoint", str(out), "--examples", str(file),
                   "--batch_size", "3"]) == 0
  scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert len(scored) == 4
  worst = 0.0
  for example, result in zip(examples, scored):
    inputs, targets = np.array([example["inputs"]]), np.array([example["targets"]])
    hf_logits, _ = _hf_forward(model, inputs, targets)  # alone: no padding at all
    log_probs = torch.log_softmax(torch.tensor(hf_logits[0]), -1).numpy()
    hf_nll = -float(log_probs[np.arange(targets.shape[1]), targets[0]].sum())
    assert result["tokens"] == targets.shape[1]
    worst = max(worst, abs(result["loss"] - hf_nll))
  MAX_DIFFS["score summed NLL"] = worst
  assert worst < 1e-4 * max(len(e["targets"]) for e in examples)

  scores_file = tmp_path / "scores.jsonl"
  assert cli.main(["score", "--checkpoint", str(out), "--examples", str(file), "--out",
                   str(scores_file), "--batch_size", "3"]) == 0
  assert [json.loads(line) for line in scores_file.read_text().splitlines()] == scored

  exported = tmp_path / "hf_export"
  assert cli.main(["convert", "--to", "hf", "--checkpoint", str(out), "--out",
                   str(exported)]) == 0
  assert cli.main(["convert", "--to", "hf", "--checkpoint", str(out), "--out",
                   str(exported)]) == 2  # refuses to overwrite
  original = load_file(path / "model.safetensors")
  assert set(load_file(exported / "model.safetensors")) == set(original)


class _Evil:
  """Unpickling this would run code (make a directory); a weights-only load
  must refuse it."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def _break(kind, src, dst):
  """Writes a broken copy of the HF directory `src` at `dst`."""
  if kind == "missing dir":
    return
  dst.mkdir()
  config = json.loads((src / "config.json").read_text())
  tensors = load_file(src / "model.safetensors")
  if kind == "missing weights":
    tensors = None
  elif kind == "missing config":
    config = None
  elif kind == "wrong shape":
    tensors["decoder.block.1.layer.2.mlp.experts.expert_3.wo.weight"] = np.zeros((D, F + 1),
                                                                                np.float32)
  elif kind == "missing tensor":
    del tensors["encoder.block.2.layer.0.SelfAttention.k.weight"]
  elif kind == "unexpected tensor":
    tensors["encoder.block.1.layer.1.mlp.router.classifier.bias"] = np.zeros(E, np.float32)
  elif kind == "router_bias":
    config["router_bias"] = True
  elif kind == "untied copy differs":
    config["tie_word_embeddings"] = False
    tensors["lm_head.weight"] = tensors["shared.weight"].copy()
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"] + 1
  elif kind == "pickle":
    torch.save({"shared.weight": torch.zeros(VOCAB, D), "evil": _Evil(dst.parent / "pwned")},
               dst / "pytorch_model.bin")
    tensors = None
  if config is not None:
    (dst / "config.json").write_text(json.dumps(config))
  if tensors is not None:
    save_file(tensors, str(dst / "model.safetensors"))


@pytest.mark.parametrize("kind,message", [
    ("missing dir", "does not exist"), ("missing weights", "no weights found"),
    ("missing config", "no config.json"), ("wrong shape", "expert_3.wo.weight has shape"),
    ("missing tensor", "missing encoder.block.2.layer.0.SelfAttention.k.weight"),
    ("unexpected tensor", "unexpected encoder.block.1.layer.1.mlp.router.classifier.bias"),
    ("router_bias", "router_bias"), ("untied copy differs", "encoder.embed_tokens.weight"),
    ("pickle", "weights_only")])
def test_convert_refuses_bad_input_and_writes_nothing(tmp_path, hf_dir, capsys, kind, message):
  _, src = hf_dir("relu", True, 2)
  broken, out = tmp_path / "broken", tmp_path / "out"
  _break(kind, src, broken)
  capsys.readouterr()
  assert cli.main(["convert", "--from", "hf", "--hf_dir", str(broken), "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err
  # Nothing written: no output, no temporary, and no directory made by the pickle.
  assert sorted(p.name for p in tmp_path.iterdir()) == (["broken"] if kind != "missing dir" else [])


def test_reads_pytorch_bin_and_sharded_safetensors(tmp_path, hf_dir):
  model, path = hf_dir("relu", False, 64)
  _, want = hf.load_hf_dir(path)
  bin_dir, sharded = tmp_path / "bin", tmp_path / "sharded"
  for d in (bin_dir, sharded):
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
  state = model.state_dict()  # holds the embedding copies and lm_head
  torch.save(state, bin_dir / "pytorch_model.bin")
  tensors = load_file(path / "model.safetensors")
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    save_file({k: tensors[k] for k in part}, str(sharded / f"model-{i}.safetensors"))
    weight_map.update({k: f"model-{i}.safetensors" for k in part})
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  for d in (bin_dir, sharded):
    _, got = hf.load_hf_dir(d)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  (sharded / "model-1.safetensors").unlink()
  with pytest.raises(UserError, match="model-1.safetensors: shard listed"):
    hf.load_hf_dir(sharded)


def test_convert_flag_combinations(tmp_path, capsys):
  out = ["--out", str(tmp_path / "o")]
  for argv, message in ((["--from", "hf", *out], "--from hf needs --hf_dir"),
                        (["--to", "hf", *out], "--to hf needs --checkpoint"),
                        (["--to", "hf", "--checkpoint", str(tmp_path), "--hf_dir", str(tmp_path),
                          *out], "--hf_dir goes with --from hf")):
    assert cli.main(["convert", *argv]) == 2
    assert message in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_checkpoint_save_and_load_errors(tmp_path):
  config = get_config("tiny_switch", vocab_size=VOCAB, num_encoder_layers=1)
  params = _random_params(config)
  path = model_format.save_model(tmp_path / "m", config, params, {"source": "test"})
  config2, params2 = model_format.load_model(path)
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params2), params)
  with pytest.raises(UserError, match="not empty"):
    model_format.save_model(path, config, params)
  model_format.save_model(path, config, params, overwrite=True)
  with pytest.raises(UserError, match="does not match its config"):  # nothing is written
    model_format.save_model(tmp_path / "bad", config.replace(d_ff=2 * F), params)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
  (path / "config.json").write_text(config.replace(d_ff=2 * F).to_json())
  with pytest.raises(UserError, match="has shape"):
    model_format.load_model(path)
  with pytest.raises(UserError, match="does not exist"):
    model_format.load_model(tmp_path / "nope")
  (path / "config.json").unlink()
  with pytest.raises(UserError, match="no config.json"):
    model_format.load_model(path)


@pytest.mark.parametrize("line,message", [
    ("not json", "examples.jsonl:2: not valid JSON"),
    ('{"inputs": [3]}', 'examples.jsonl:2: expected an object with "inputs" and "targets"'),
    ('{"inputs": [3, 0], "targets": [4]}', "examples.jsonl:2: 'inputs' contains id 0"),
    ('{"inputs": [3], "targets": []}', "examples.jsonl:2: 'targets' must be a non-empty"),
    (f'{{"inputs": [3], "targets": [{VOCAB}]}}', f"examples.jsonl:2: token id {VOCAB}"),
    ("", "examples.jsonl:2: empty line")])
def test_score_rejects_bad_jsonl(tmp_path, checkpoint, capsys, line, message):
  ckpt = checkpoint
  file = _write_jsonl(tmp_path / "examples.jsonl", [{"inputs": [3], "targets": [4]}, line])
  capsys.readouterr()
  assert cli.main(["score", "--checkpoint", str(ckpt), "--examples", str(file), "--out",
                   str(tmp_path / "scores.jsonl")]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "scores.jsonl").exists()



_TRAINED = {}  # what training the `trained_run` printed and returned


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
  """A tiny ReLU Switch model trained 2 steps: MODEL_DIR with checkpoints/2.
  No validation files are bound (they are optional for training)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  import gin  # pylint: disable=import-outside-toplevel
  from switch_jax.cli import gin_config  # pylint: disable=import-outside-toplevel
  root, vocab = corpus
  run = tmp_path_factory.mktemp("trained") / "run"
  gin_config.parse(["models/tiny_switch_relu.gin", "runs/pretrain.gin"], [
      f'MODEL_DIR = "{run}"', 'MIXTURE_OR_TASK_NAME = "local_span_corruption"',
      "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", "TRAIN_STEPS = 2", "BATCH_SIZE = 8",
      f'local_files.train = "{root / "train.txt"}"', f'local_vocabulary_path.path = "{vocab}"',
      "ModelConfig.vocab_size = 256", "EvalConfig.period = 1", "LoopConfig.log_period = 1",
      "CheckpointConfig.async_save = False", "make_optimizer.name = 'adam'"])
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    _TRAINED["summary"] = gin.get_configurable("train")()
  _TRAINED["printed"] = printed.getvalue()
  return run


def test_training_without_validation_files_runs_no_eval_and_says_so_once(trained_run):
  assert _TRAINED["summary"]["step"] == 2 and "eval" not in _TRAINED["summary"]
  said = [line for line in _TRAINED["printed"].splitlines() if "local_files.validation" in line]
  assert len(said) == 1 and said[0].startswith("No evaluation during training:"), said
  assert (trained_run / "checkpoints" / "2").is_dir()


def test_a_training_run_is_a_model_for_score_and_export(trained_run, tmp_path, capsys):
  """The run's MODEL_DIR and its step directory go wherever a converted
  checkpoint goes: score, export to HF, and HF's logits equal ours."""
  step_dir = trained_run / "checkpoints" / "2"
  examples = _write_jsonl(tmp_path / "examples.jsonl", [
      {"inputs": list(map(int, INPUTS[i][INPUTS[i] > 0])),
       "targets": list(map(int, TARGETS[i][TARGETS[i] > 0]))} for i in range(3)])
  scores = []
  for path in (trained_run, step_dir):
    capsys.readouterr()
    assert cli.main(["score", "--checkpoint", str(path), "--examples", str(examples)]) == 0
    scores.append([json.loads(line)["loss"] for line in capsys.readouterr().out.splitlines()])
  assert scores[0] == scores[1] and len(scores[0]) == 3 and all(np.isfinite(scores[0]))
  assert model_format.resolve(trained_run) == model_format.resolve(trained_run / "checkpoints") == (
      model_format.resolve(step_dir)) == model_format.ModelSource(step_dir, 2)
  config, params = model_format.load_model(trained_run)

  # Export (HF capacity 64: nothing dropped) and load it in transformers.
  assert cli.main(["convert", "--to", "hf", "--checkpoint", str(step_dir), "--out",
                   str(tmp_path / "hf"), "--expert_capacity", "64"]) == 0
  reloaded = SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  hf_logits, _ = _hf_forward(reloaded, INPUTS, TARGETS)
  logits, dropped = _our_forward(config.replace(expert_capacity=64), params)
  MAX_DIFFS["trained run exported"] = float(np.abs(logits - hf_logits)[TARGETS > 0].max())
  assert MAX_DIFFS["trained run exported"] < 1e-4 and dropped == 0.0


def test_every_checkpoint_flag_has_one_resolver(trained_run, tmp_path, capsys):
  """score, convert, eval and infer refuse a directory that holds no model
  with the same message, naming what was looked for; an unfinished save is
  skipped for the newest complete step, and a run without one says so."""
  empty = tmp_path / "empty"
  empty.mkdir()
  examples = _write_jsonl(tmp_path / "examples.jsonl", [{"inputs": [3], "targets": [4]}])
  for argv in (["score", "--examples", str(examples)],
               ["convert", "--to", "hf", "--out", str(tmp_path / "hf")],
               ["eval", "--task", "glue_rte_v002"],
               ["infer", "--input_file", str(examples), "--vocab", "byte",
                "--output", str(tmp_path / "out.jsonl")]):
    capsys.readouterr()
    assert cli.main([*argv, "--checkpoint", str(empty)]) == 2, argv
    err = capsys.readouterr().err
    assert (f"{empty} is not a model: looked for metadata.json (a model checkpoint from "
            "`switch-jax convert`), params/ with meta/ (a training step) and "
            "checkpoints/<step>/ (a training run's MODEL_DIR); found none") in err, (argv, err)
  run = tmp_path / "run"
  (run / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(UserError, match=f"training run {run} has no complete checkpoint"):
    model_format.resolve(run)
  shutil.copytree(trained_run / "checkpoints" / "2", run / "checkpoints" / "2")
  assert model_format.resolve(run) == model_format.ModelSource(run / "checkpoints" / "2", 2)
  with pytest.raises(UserError, match="does not exist"):
    model_format.resolve(tmp_path / "nope")


def test_eval_and_infer_gin_files_read_a_training_run(trained_run, corpus, tmp_path, capsys):
  """The commands README cites: `eval --gin_file=runs/eval.gin` and `infer
  --gin_file=runs/infer.gin`, given the run's MODEL_DIR."""
  root, vocab = corpus
  common = [f'--gin.CHECKPOINT_PATH="{trained_run}"',
            '--gin.MIXTURE_OR_TASK_NAME="local_span_corruption"',
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.BATCH_SIZE=8",
            f'--gin.local_files.validation="{root / "validation.txt"}"',
            f'--gin.local_vocabulary_path.path="{vocab}"']
  capsys.readouterr()
  assert cli.main(["eval", "--gin_file=runs/eval.gin", *common, "--gin.evaluate.max_examples=8",
                   f'--gin.EVAL_OUTPUT_DIR="{tmp_path / "eval"}"']) == 0
  results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
  assert results["step"] == 2 and results["split"] == "validation"
  assert 0 < results["metrics"]["num_tokens"] <= 8 * 8 and np.isfinite(results["metrics"]["loss"])
  output = tmp_path / "predictions.jsonl"
  assert cli.main(["infer", "--gin_file=runs/infer.gin", *common, "--max_examples=3",
                   f'--gin.INFER_OUTPUT_FILE="{output}"']) == 0
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  # Span corruption keeps no target text, so the lines have no "target".
  assert len(lines) == 3 and all(set(r) == {"input", "prediction", "tokens"} for r in lines)
