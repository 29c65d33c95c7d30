"""The GKE path: the Service and Indexed Job `switch-jax launch gke` writes,
checked against the Kubernetes API schema offline (kubernetes-validate ships
the schemas), the slice shapes, and the command each pod runs."""

import os
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from switch_jax.cli import gke, launch
from switch_jax.cli import main as cli
from switch_jax.errors import UserError

GIN_FILES = ["models/switch_base_8.gin", "runs/pretrain.gin", "mesh/expert_parallel.gin"]
BINDINGS = {"MIXTURE_OR_TASK_NAME": '"c4_span_corruption"', "TRAIN_STEPS": 100000,
            "MESH_SHAPE": "(-1, 8, 1)"}
IMAGE = "us-docker.pkg.dev/my-project/ml/switch-jax:0.1.0"
# Kubernetes minor versions GKE offers (oldest and newest the schemas hold).
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _manifests(**overrides):
  kwargs = dict(name="switch-base-8", accelerator_type="v5litepod-16", image=IMAGE,
                gin_files=GIN_FILES, gin_bindings=BINDINGS, model_dir="gs://my-bucket/run",
                tfds_data_dir="gs://my-bucket/tfds")
  kwargs.update(overrides)
  return gke.manifests(**kwargs)


@pytest.mark.parametrize("accelerator_type, accelerator, topology, hosts, chips", [
    ("v4-8", "tpu-v4-podslice", "2x2x1", 1, 4),
    ("v4-16", "tpu-v4-podslice", "2x2x2", 2, 4),
    ("v4-32", "tpu-v4-podslice", "2x2x4", 4, 4),
    ("v4-128", "tpu-v4-podslice", "4x4x4", 16, 4),
    ("v5p-64", "tpu-v5p-slice", "2x4x4", 8, 4),
    ("v5litepod-8", "tpu-v5-lite-podslice", "2x4", 1, 8),
    ("v5litepod-16", "tpu-v5-lite-podslice", "4x4", 4, 4),
    ("v5litepod-256", "tpu-v5-lite-podslice", "16x16", 64, 4),
    ("v6e-32", "tpu-v6e-slice", "4x8", 8, 4)])
def test_slice_shapes(accelerator_type, accelerator, topology, hosts, chips):
  assert gke.slice_shape(accelerator_type) == gke.SliceShape(accelerator, topology, hosts, chips)


def test_a_topology_can_be_chosen_if_it_holds_the_chips():
  assert gke.slice_shape("v4-32", "1x4x4").topology == "1x4x4"
  for bad, message in (("4x4", "in 3 dimensions"), ("2x2x2", "does not hold the 16 chips"),
                       ("2 x 2", "expected e.g.")):
    with pytest.raises(UserError, match=message):
      gke.slice_shape("v4-32", bad)
  with pytest.raises(UserError, match="GKE TPU node pools here are"):
    gke.slice_shape("v3-32")
  with pytest.raises(UserError, match="power of two"):
    gke.slice_shape("v4-24")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overrides", [{}, {"accelerator_type": "v4-16", "spot": True},
                                       {"accelerator_type": "v6e-8", "package": "switch-jax==0.1.0"}])
def test_the_manifests_are_valid_kubernetes_objects(version, overrides):
  for document in _manifests(**overrides):
    kubernetes_validate.validate(document, version, strict=True)  # raises if not


def test_the_validator_refuses_what_kubernetes_would():
  service, job = _manifests()
  job["spec"]["completions"] = "four"
  with pytest.raises(kubernetes_validate.ValidationError, match="four"):
    kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)
  service["spec"]["headless"] = True
  with pytest.raises(kubernetes_validate.ValidationError, match="headless"):
    kubernetes_validate.validate(service, K8S_VERSIONS[0], strict=True)


def test_one_pod_per_host_on_the_slice_node_pool_found_through_the_headless_service():
  service, job = _manifests(spot=True)
  spec, pod = job["spec"], job["spec"]["template"]["spec"]
  assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
  assert spec["backoffLimit"] == 0
  # GKE injects TPU_WORKER_ID/TPU_WORKER_HOSTNAMES only into Indexed Jobs with a subdomain.
  assert service["spec"] == {"clusterIP": "None", "selector": {"job-name": "switch-base-8"}}
  assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "4x4",
                                 "cloud.google.com/gke-spot": "true"}
  (container,) = pod["containers"]
  assert container["resources"] == {"requests": {"google.com/tpu": 4},
                                    "limits": {"google.com/tpu": 4}}
  assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] == 300


def test_every_pod_runs_the_train_command_of_the_tpu_vms():
  (container,) = _manifests()[1]["spec"]["template"]["spec"]["containers"]
  vm = launch.tpu_train_command("my-tpu", "us-central2-b", "my-project", GIN_FILES, BINDINGS,
                                "gs://my-bucket/run", "gs://my-bucket/tfds")
  vm_argv = shlex.split(vm[-1][len("--command="):])
  assert container["command"] == ["python", *vm_argv[1:]]
  assert container["command"][3:5] == ["train", "--distributed"]
  (container,) = _manifests(package="switch-jax==0.1.0")[1]["spec"]["template"]["spec"][
      "containers"]
  assert container["command"][:2] == ["bash", "-c"]
  install, train = container["command"][2].split(" && exec ")
  assert shlex.split(install) == ["python", "-m", "pip", "install", "switch-jax[tpu]==0.1.0"]
  assert shlex.split(train) == ["python", *vm_argv[1:]]


@pytest.mark.parametrize("overrides, message", [
    ({"package": "dist/switch_jax-0.1.0-py3-none-any.whl"}, "cannot read a local file"),
    ({"model_dir": "runs/x"}, "must be an absolute path"),
    ({"name": "Switch_Base"}, "not valid"),
    ({"image": "my image"}, "expected a reference"),
    ({"grace_seconds": -1}, "grace period")])
def test_bad_input_is_refused_before_anything_is_written(overrides, message, tmp_path,
                                                        monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "dist").mkdir()
  (tmp_path / "dist" / "switch_jax-0.1.0-py3-none-any.whl").write_bytes(b"")
  with pytest.raises(UserError, match=message):
    _manifests(**overrides)


def test_a_shared_file_system_path_is_a_model_dir_too():
  (container,) = _manifests(model_dir="/gcs/my-bucket/run")[1]["spec"]["template"]["spec"][
      "containers"]
  assert '--gin.MODEL_DIR="/gcs/my-bucket/run"' in container["command"]


ARGV = ["launch", "gke", "--name=switch-base-8", "--accelerator_type=v5litepod-16",
        f"--image={IMAGE}", *[f"--gin_file={f}" for f in GIN_FILES],
        *[f"--gin={k}={v}" for k, v in BINDINGS.items()], "--model_dir=gs://my-bucket/run",
        "--tfds_data_dir=gs://my-bucket/tfds"]


def test_the_dry_run_prints_the_manifests_as_yaml(capsys):
  assert cli.main([*ARGV, "--dry_run"]) == 0
  printed = list(yaml.safe_load_all(capsys.readouterr().out))
  expected = _manifests(gin_bindings={k: str(v) for k, v in BINDINGS.items()})
  assert printed == expected


def test_without_dry_run_kubectl_applies_the_same_yaml(tmp_path, monkeypatch, capsys):
  kubectl = tmp_path / "kubectl"
  kubectl.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/argv\ncat > {tmp_path}/stdin\n")
  kubectl.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  assert cli.main(ARGV) == 0
  assert (tmp_path / "argv").read_text() == "apply -f -\n"
  assert cli.main([*ARGV, "--dry_run"]) == 0
  assert (tmp_path / "stdin").read_text() == capsys.readouterr().out
  monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
  assert cli.main(ARGV) != 0
  assert "kubectl is not on PATH" in capsys.readouterr().err


def test_docs_pod_md_shows_what_the_command_prints(capsys):
  docs = (Path(__file__).resolve().parents[2] / "docs" / "pod.md").read_text()
  block = docs.split("<!-- gke output -->\n```yaml\n", 1)[1].split("```", 1)[0]
  command = docs[:docs.index("<!-- gke output -->")].rsplit("```bash\n", 1)[1].split("```")[0]
  argv = shlex.split(command.replace("\\\n", " "))
  assert argv[:3] == ["switch-jax", "launch", "gke"]
  assert cli.main(argv[1:]) == 0
  assert capsys.readouterr().out == block
