"""A GKE JobSet that runs `s2flash train` on every host of a TPU slice or a GPU node pool.

    python -m launch.gke --name sprint --image IMAGE (--tpu-type v5litepod-16 | --gpu-type nvidia-h100-80gb \
        --gpus-per-node 8 --nodes 4) [--gcs-bucket BUCKET] \
        --config configs/sana_sprint.py:0.6b --out /gcs/runs/sprint data.path=/gcs/data [--dry-run]

The manifest is piped into `kubectl apply -f -`; --dry-run prints it and applies nothing
(`... --dry-run | kubectl apply -f -` is the same launch). One pod per host, all from one Indexed
Job: pod i gets S2FLASH_PROCESS_ID from its completion index (the same index GKE gives the TPU
worker), the coordinator is pod 0 by its JobSet DNS name. A failed or preempted pod fails the
whole set (backoffLimit 0) and JobSet restarts every pod (up to --max-restarts); the train command
has --resume, so the restarted job continues from its newest checkpoint. The image must hold this
source tree in --workdir (configs are read from there) with the package installed; the run
directory and data must be on storage every pod mounts: --gcs-bucket mounts a bucket at /gcs with
the GCS FUSE CSI driver (the pods' service account needs access to it).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from launch.job import (
    PROCESS_ID,
    LaunchError,
    TrainCommand,
    add_train_arguments,
    check_layout,
    join_env,
    positive,
    train_command,
)
from launch.shell import submit
from launch.tpu_slices import TpuSlice, tpu_slice

REPLICATED_JOB = "workers"
COORDINATOR_PORT = 8476
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
GCS_MOUNT = "/gcs"


def coordinator_address(name: str, port: int = COORDINATOR_PORT) -> str:
    """Pod 0 of the JobSet: JobSet names pods <jobset>-<replicated job>-<job index>-<pod index> under
    the subdomain <jobset> when DNS hostnames are enabled."""
    return f"{name}-{REPLICATED_JOB}-0-0.{name}:{port}"


def accelerator_spec(tpu: TpuSlice | None, gpu_type: str | None, gpus_per_node: int) -> tuple[dict, dict]:
    """(node selector, resource limits) of one host."""
    if tpu is not None:
        return ({"cloud.google.com/gke-tpu-accelerator": tpu.generation.gke_accelerator,
                 "cloud.google.com/gke-tpu-topology": tpu.gke_topology},
                {"google.com/tpu": tpu.devices_per_host})
    return {"cloud.google.com/gke-accelerator": gpu_type}, {"nvidia.com/gpu": gpus_per_node}


def _env_entry(name: str, value: str) -> dict:
    if name == PROCESS_ID:  # each pod's own: the field its value names
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": value}}}
    return {"name": name, "value": value}


def manifest(command: TrainCommand, *, name: str, image: str, hosts: int, node_selector: dict, limits: dict,
             workdir: str = "/app", gcs_bucket: str | None = None, service_account: str | None = None,
             max_restarts: int = 3, one_node_pool: bool = False) -> dict:
    """The JobSet as a dict (rendered to YAML by `render`). one_node_pool: place all pods on one
    node pool that runs nothing else (a TPU slice is one node pool)."""
    variables = join_env(coordinator_address(name), hosts, COMPLETION_INDEX)
    env = [_env_entry(key, value) for key, value in variables.items()]
    container = {"name": "train", "image": image, "workingDir": workdir, "command": command.argv(), "env": env,
                 "ports": [{"containerPort": COORDINATOR_PORT}], "resources": {"limits": limits}}
    pod_spec = {"restartPolicy": "Never", "nodeSelector": node_selector, "containers": [container]}
    pod_metadata = {}
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if gcs_bucket:
        pod_metadata["annotations"] = {"gke-gcsfuse/volumes": "true"}
        container["volumeMounts"] = [{"name": "gcs", "mountPath": GCS_MOUNT}]
        pod_spec["volumes"] = [{"name": "gcs", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "volumeAttributes": {
            "bucketName": gcs_bucket, "mountOptions": "implicit-dirs"}}}]
    job = {"parallelism": hosts, "completions": hosts, "completionMode": "Indexed", "backoffLimit": 0,
           "template": {**({"metadata": pod_metadata} if pod_metadata else {}), "spec": pod_spec}}
    metadata = {"name": name}
    if one_node_pool:
        metadata["annotations"] = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata,
            "spec": {"failurePolicy": {"maxRestarts": max_restarts}, "network": {"enableDNSHostnames": True},
                     "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job}}]}}


def render(jobset: dict) -> str:
    return "# rendered by launch.gke, applied with kubectl apply -f -\n" + yaml.safe_dump(jobset, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.gke", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="JobSet name (also the pods' DNS subdomain)")
    parser.add_argument("--image", required=True, help="container image with this source tree and the package")
    hardware = parser.add_mutually_exclusive_group(required=True)
    hardware.add_argument("--tpu-type", help="TPU slice, e.g. v5litepod-16 (one pod per host)")
    hardware.add_argument("--gpu-type", help="GKE accelerator label, e.g. nvidia-h100-80gb (one pod per node)")
    parser.add_argument("--nodes", type=int, default=1, help="GPU nodes (with --gpu-type)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (with --gpu-type)")
    parser.add_argument("--workdir", default="/app", help="the source tree inside the image (default: /app)")
    parser.add_argument("--gcs-bucket", default=None, help=f"mount this bucket at {GCS_MOUNT} in every pod")
    parser.add_argument("--service-account", default=None, help="Kubernetes service account of the pods")
    parser.add_argument("--max-restarts", type=int, default=3, help="JobSet restarts after a failure or preemption")
    add_train_arguments(parser, python="python")
    args = parser.parse_args(argv)
    try:
        if args.tpu_type:
            tpu = tpu_slice(args.tpu_type)
            hosts, devices, what = tpu.hosts, tpu.devices_per_host, tpu.describe()
        else:
            tpu = None
            hosts, devices = positive("--nodes", args.nodes), positive("--gpus-per-node", args.gpus_per_node)
            what = f"{hosts} {args.gpu_type} node{'s' if hosts > 1 else ''}"
        command = train_command(args)
        check_layout(command, processes=hosts, devices_per_process=devices, what=what)
    except LaunchError as e:
        print(f"launch.gke: error: {e}", file=sys.stderr)
        return 2
    node_selector, limits = accelerator_spec(tpu, args.gpu_type, devices)
    jobset = manifest(command, name=args.name, image=args.image, hosts=hosts, node_selector=node_selector,
                      limits=limits, workdir=args.workdir, gcs_bucket=args.gcs_bucket,
                      service_account=args.service_account, max_restarts=args.max_restarts,
                      one_node_pool=tpu is not None)
    return submit(render(jobset), ["kubectl", "apply", "-f", "-"], dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
