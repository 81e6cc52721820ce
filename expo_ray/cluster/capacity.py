"""What the Ray cluster can ever hold: its node types, how many of each, and what one node offers.

Shard tasks and engines ask Ray for resources on ONE node (CPU, GPU, memory). On an autoscaling
cluster the nodes that satisfy a request may not exist yet, so "what is live now" is the wrong
yardstick: a request is judged against the node types the autoscaler can start (their resources
and ``max_workers``), and only on a cluster without an autoscaler against the live nodes. A
request that no node type can ever satisfy would wait forever in Ray's queue; :meth:`Capacity.check`
refuses it at once with one line naming the resource, the amount and the largest node.

Where the node types come from, first found wins:
1. the autoscaling config the cluster's autoscaler runs with (the ``--autoscaling-config`` of the
   monitor on the head node, where `ray job submit` runs drivers; the cluster launcher's
   ``~/ray_bootstrap_config.yaml``), or the file named by ``EXPO_RAY_AUTOSCALING_CONFIG``;
2. otherwise the live nodes (counted as they are; nothing can be added).
A node type that does not declare ``memory`` (the autoscaler does not require it) is not judged
on memory: declare it (bytes) to have memory requests judged before such a node runs. When an
autoscaler runs but its config cannot be read (e.g. KubeRay's autoscaler sidecar), nothing is
refused and the engine count is the live one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExpoError

log = logging.getLogger("expo_ray")
UNBOUNDED = 1 << 20  # "as many nodes as wanted": a node type without max_workers
RESOURCES = ("GPU", "CPU", "memory")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict          # per node: CPU, GPU, memory (bytes), custom resources
    max_count: int           # nodes of this type the cluster can hold at once


@dataclass(frozen=True)
class Capacity:
    node_types: tuple[NodeType, ...]
    source: str              # "autoscaler" | "live nodes" | "live nodes (autoscaler config unreadable)"

    @property
    def judged(self) -> bool:
        """Whether requests can be judged (False: an autoscaler whose node types are unknown)."""
        return "unreadable" not in self.source

    def per_node(self, request: dict, node: NodeType) -> int:
        """How many copies of ``request`` one node of this type holds."""
        counts = []
        for key, amount in request.items():
            if amount and _known(node, key):
                counts.append(int(node.resources.get(key, 0) // amount))
        return min(counts) if counts else UNBOUNDED

    def fits(self, request: dict) -> bool:
        return any(self.per_node(request, n) >= 1 for n in self.node_types)

    def largest(self, request: dict) -> tuple[str, NodeType | None]:
        """The first resource of ``request`` no node type has enough of, and the node type with the most of it."""
        for key in [k for k in RESOURCES if k in request] + [k for k in request if k not in RESOURCES]:
            if request[key] and not any(n.resources.get(key, 0) >= request[key] or not _known(n, key)
                                        for n in self.node_types):
                return key, max(self.node_types, key=lambda n: n.resources.get(key, 0), default=None)
        return "", None

    def check(self, request: dict, what: str) -> None:
        """Raise ExpoError when no node the cluster can ever have satisfies ``request``."""
        request = {k: v for k, v in request.items() if v}
        if not self.judged or self.fits(request):
            return
        key, node = self.largest(request)
        if not key:  # each resource fits somewhere, but never all on one node
            raise ExpoError(f"{what} asks for {describe(request)} on one node; no node type of the cluster "
                            f"({self.source}) has all of it: {self.summary()}")
        has = describe({key: node.resources.get(key, 0)}) if node else "none"
        raise ExpoError(f"{what} asks for {describe({key: request[key]})} on one node, but the largest node "
                        f"of the cluster ({self.source}) has {has}" + (f" ({node.name})" if node else ""))

    def slots(self, request: dict) -> int:
        """How many copies of ``request`` the cluster can hold at once, grown to its maximum."""
        return sum(self.per_node(request, n) * n.max_count for n in self.node_types)

    def nodes_holding(self, request: dict) -> int:
        """How many nodes that can hold ``request`` the cluster can have at once."""
        return sum(n.max_count for n in self.node_types if self.per_node(request, n) >= 1)

    def holds_together(self, requests: list[dict]) -> bool:
        """Whether the cluster can hold all ``requests`` at the same time (first fit, largest first)."""
        free = [{"memory": math.inf, **n.resources} for n in self.node_types
                for _ in range(min(n.max_count, len(requests)))]
        for req in sorted(requests, key=lambda r: -sum(v for k, v in r.items() if k == "GPU")):
            for node in free:
                if all(node.get(k, 0) >= v for k, v in req.items() if v):
                    for k, v in req.items():
                        node[k] = node.get(k, 0) - v
                    break
            else:
                return False
        return True

    def summary(self) -> str:
        return "; ".join(f"{n.name} x{'any' if n.max_count >= UNBOUNDED else n.max_count}: "
                         f"{describe({k: n.resources.get(k, 0) for k in RESOURCES})}" for n in self.node_types)


def _known(node: NodeType, key: str) -> bool:
    """Whether a node type says how much of ``key`` it has (undeclared memory: unknown, not zero)."""
    return key != "memory" or key in node.resources


def describe(resources: dict) -> str:
    parts = []
    for key, value in resources.items():
        if key in ("memory", "object_store_memory"):
            parts.append(f"{value / 2**30:.1f} GiB of {key}")
        else:
            parts.append(f"{value:g} {key}")
    return ", ".join(parts)


def cluster_capacity(ray) -> Capacity:
    """The capacity of the connected cluster (see the module docstring)."""
    live = [n for n in ray.nodes() if n.get("Alive")]
    config = _autoscaling_config()
    if config is not None:
        types = node_types_from_config(config, live)
        if types:
            return Capacity(tuple(types), "autoscaler")
        return Capacity(_live_types(live), "live nodes (autoscaler config unreadable)")
    return Capacity(_live_types(live), "live nodes (autoscaler config unreadable)" if _autoscaler_running()
                    else "live nodes")


def _live_types(live: list[dict]) -> tuple[NodeType, ...]:
    grouped: dict[str, list] = {}
    for n in live:
        res = {k: v for k, v in n.get("Resources", {}).items() if not k.startswith("node:")}
        grouped.setdefault(json.dumps(res, sort_keys=True), []).append(res)
    return tuple(NodeType(f"live node{'s' if len(g) > 1 else ''}", g[0], len(g)) for g in grouped.values())


def node_types_from_config(config: dict, live: list[dict] = ()) -> list[NodeType]:
    """Node types of a Ray autoscaling config (``available_node_types``); the head type is what the live head has."""
    types = []
    head_type = config.get("head_node_type")
    cluster_max = config.get("max_workers")
    for name, spec in (config.get("available_node_types") or {}).items():
        if name != head_type and not spec.get("resources"):
            return []  # filled in by the cloud provider at run time: unknown here
        resources = dict(spec.get("resources") or {})
        if name == head_type:
            head = next((n for n in live if "node:__internal_head__" in n.get("Resources", {})), None)
            if head is not None:
                resources = {k: v for k, v in head["Resources"].items() if not k.startswith("node:")}
            count = 1
        else:
            count = spec.get("max_workers", cluster_max if cluster_max is not None else UNBOUNDED)
            if cluster_max is not None:
                count = min(count, cluster_max)
        if count > 0:
            types.append(NodeType(name, resources, int(count)))
    return types


def _autoscaling_config() -> dict | None:
    path = os.environ.get("EXPO_RAY_AUTOSCALING_CONFIG") or _monitor_config_path()
    if not path:
        launcher = Path.home() / "ray_bootstrap_config.yaml"
        path = str(launcher) if launcher.is_file() else None
    if not path:
        return None
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.debug("cannot read the autoscaling config %s: %s", path, exc)
        return None
    return config if isinstance(config, dict) else None


def _monitor_config_path() -> str | None:
    """The --autoscaling-config of the autoscaler monitor of the connected cluster, if it runs here."""
    try:
        import psutil
        import ray

        gcs_port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
    except Exception:  # noqa: BLE001 - not connected, or no psutil: no config from here
        return None
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not any(part.endswith("monitor.py") for part in cmd):
            continue
        if not any(part.startswith("--gcs-address=") and part.rpartition(":")[2] == gcs_port for part in cmd):
            continue
        for part in cmd:
            if part.startswith("--autoscaling-config="):
                return part.split("=", 1)[1]
    return None


def _autoscaler_running() -> bool:
    """Whether an autoscaler can add nodes. A plain local instance runs a read-only one whose node
    types are its live nodes (named ``node_<id>``): that one cannot."""
    try:
        from ray._private import ray_constants
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
    except Exception:  # noqa: BLE001 - no status published: no autoscaler
        return False
    report = status.get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    return any(not re.fullmatch(r"node_[0-9a-f]{56}", t) for t in types)


def engine_request(actor_options: dict) -> dict:
    """The per-node resources an engine actor's Ray options ask for."""
    return {"GPU": actor_options.get("num_gpus", 0), "CPU": actor_options.get("num_cpus", 1),
            "memory": actor_options.get("memory", 0)}

