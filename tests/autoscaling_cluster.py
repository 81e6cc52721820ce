"""A simulated multi-node autoscaling Ray cluster on this machine, with Ray's real autoscaler.

What ``ray.cluster_utils.AutoscalingCluster`` does, without its ``ray stop --force`` (which would
stop every Ray instance on the machine) and without its default config (not shipped in the Ray
wheel): a head started with ``--autoscaling-config``, Ray's fake multi-node provider launching
worker "nodes" (separate raylets on this machine, each with the resources its node type
declares, fake GPUs included), and the autoscaler v2 starting and removing them on demand. Ports,
temp dir and token are this cluster's own (see :class:`tests.ray_head.RayHead`).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ray_head import RayHead

HEAD_ID = "f" * 51 + "00000"  # the fake provider's id of the head node
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


class AutoscalingCluster(RayHead):
    def __init__(self, worker_node_types: dict, head_cpus: int = 0, idle_timeout_minutes: float = 0.2):
        super().__init__(num_cpus=head_cpus)
        self.worker_node_types = worker_node_types
        self.idle_timeout_minutes = idle_timeout_minutes

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def config(self) -> dict:
        return {
            "cluster_name": "expo-ray-test", "max_workers": 8, "head_node_type": "ray.head.default",
            "provider": {"type": "external", "module": PROVIDER, "gcs_address": self.gcs_address,
                         "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "launch_multiple": True, "head_node_id": HEAD_ID},
            "available_node_types": {"ray.head.default": {"resources": {"CPU": self.num_cpus}, "node_config": {},
                                                          "max_workers": 0},
                                     **{name: {"node_config": {}, **spec}
                                        for name, spec in self.worker_node_types.items()}},
            "upscaling_speed": 1.0, "idle_timeout_minutes": self.idle_timeout_minutes, "auth": {}, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }

    def env(self) -> dict:
        return dict(super().env(), RAY_ADDRESS=self.gcs_address, RAY_enable_autoscaler_v2="1")

    def start(self) -> "AutoscalingCluster":
        path = Path(self.temp_dir) / "autoscaling.yaml"
        path.write_text(json.dumps(self.config()))
        self.extra_args = (f"--autoscaling-config={path}",)
        self.extra_env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_ADDRESS": "",
                          "RAY_CLOUD_INSTANCE_ID": HEAD_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD_ID}
        super().start()
        return self

    @classmethod
    def started(cls, worker_node_types: dict, attempts: int = 2) -> "AutoscalingCluster":
        """A started cluster; `ray start` is tried again when its raylet missed Ray's fixed 30 s
        registration window (seen on an overloaded machine)."""
        for attempt in range(attempts):
            try:
                return cls(worker_node_types).start()
            except RuntimeError:
                if attempt == attempts - 1:
                    raise

    def ray_list(self, what: str, *filters: str, detail: bool = False) -> list[dict]:
        """`ray list <what>` of this cluster (the state API), as dicts."""
        cmd = ["ray", "list", what, "--format", "json", "--limit", "10000", "--address", self.address]
        cmd += ["--detail"] if detail else []
        for f in filters:
            cmd += ["--filter", f]
        run = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"ray list {what} failed: {run.stderr[-2000:]}")
        return json.loads(run.stdout)
